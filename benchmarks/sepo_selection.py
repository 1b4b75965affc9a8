"""What SePO's selection keeps, and where a trained policy moved: is the end-of-sequence token selected?

    python benchmarks/sepo_selection.py --world runs/demo/world --oracle runs/demo/world/oracle \
        [--policy runs/demo/run-sepo/final] [method.exclude_eos=true ...] [--out sel.json]

Scores every training pair of the demo world with the oracle pair (`reference.oracle.OraclePair`, the
scorer SePO trains on), selects with `losses.common.select_tokens` under the run's SePO params
(config overrides apply), and reports per side: the fraction of responses whose eos is selected, the
share of selected tokens that are eos, and the eos score's mean rank among the candidates (0 = first
picked). With --policy: the mean change in log p(eos) at the responses' end, policy − SFT model, per side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsepo.cli import RECIPES
from sparsepo.config import load_config
from sparsepo.data import collate_pairs, gather_rows, load_preference_dataset
from sparsepo.losses.common import select_tokens
from sparsepo.models import load_frozen_model, load_tokenizer
from sparsepo.recipe import write_for_method
from sparsepo.reference.oracle import OraclePair, read_manifest
from sparsepo.reference.scoring import score


def _end_logps(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return score(logits, batch.input_ids, batch.response_mask, ("token_logps",), topk=None)["token_logps"]


@torch.no_grad()
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", required=True)
    ap.add_argument("--oracle", required=True)
    ap.add_argument("--policy")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    world = Path(a.world)
    recipe = write_for_method(RECIPES / "demo.yaml", "sepo", Path(a.oracle) / "selection_recipe.yaml")
    cfg = load_config(recipe, [f"model.path={world / 'sft'}", f"data.path={world / 'data' / 'train.jsonl'}",
                               f"reference.oracle={a.oracle}", *a.overrides])
    p = cfg.method.params
    tok = load_tokenizer(str(world / "sft"))
    ds, _ = load_preference_dataset(cfg.data, tok, run_dir=None)
    pair = OraclePair.load(read_manifest(a.oracle))
    models = (load_frozen_model(a.policy), load_frozen_model(str(world / "sft"))) if a.policy else None
    stats = {side: dict(responses=0, ended=0, eos_selected=0, selected=0, eos_rank=0.0, candidates=0, dlogp_eos=0.0)
             for side in ("chosen", "rejected")}
    for start in range(0, len(ds), a.batch_size):
        batch = collate_pairs(gather_rows(ds, list(range(start, min(start + a.batch_size, len(ds))))),
                              tok.pad_token_id)
        b = batch.num_pairs
        scores = pair.token_scores(batch)
        eos = (batch.input_ids == tok.eos_token_id) & (batch.response_mask != 0)
        exclude = eos if getattr(p, "exclude_eos", False) else None
        d_eos = (_end_logps(models[0], batch) - _end_logps(models[1], batch)) if models else None
        for side, rows, largest in (("chosen", slice(0, b), True), ("rejected", slice(b, 2 * b), False)):
            m, s, e = batch.response_mask[rows], scores[rows], eos[rows]
            kw = dict(rounding=p.rounding, min_tokens=p.min_tokens, skip_first_token=p.skip_first_token)
            if exclude is not None:
                kw["exclude"] = exclude[rows]
            sel = select_tokens(s, m, p.rho, largest=largest, **kw)
            st = stats[side]
            st["responses"] += b
            st["ended"] += int(e.any(-1).sum())
            st["eos_selected"] += int((sel.bool() & e).any(-1).sum())
            st["selected"] += int(sel.sum())
            rank_key = torch.where(m != 0, s if largest else -s, torch.tensor(float("-inf")))
            rank = (rank_key.unsqueeze(-1) < rank_key.unsqueeze(-2)).sum(-1)  # (B,T): tokens ranked before
            n = (m != 0).sum(-1).clamp(min=1)
            ended = e.any(-1)
            st["eos_rank"] += float(((rank * e).sum(-1).float() / n)[ended].sum())
            st["candidates"] += int((m != 0).sum())
            if d_eos is not None:
                st["dlogp_eos"] += float((d_eos[rows] * e).sum())
    out = {"rho": p.rho, "exclude_eos": bool(getattr(p, "exclude_eos", False)), "pairs": len(ds)}
    for side, st in stats.items():
        out[side] = {"eos_selected_fraction": st["eos_selected"] / max(st["ended"], 1),
                     "eos_share_of_selected": st["eos_selected"] / max(st["selected"], 1),
                     "eos_relative_rank": st["eos_rank"] / max(st["ended"], 1),
                     "responses_ending_in_eos": st["ended"] / max(st["responses"], 1),
                     "mean_response_tokens": st["candidates"] / max(st["responses"], 1)}
        if models:
            out[side]["policy_minus_sft_logp_eos"] = st["dlogp_eos"] / max(st["ended"], 1)
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
