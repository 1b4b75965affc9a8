"""Worker for tests/test_pipeline_reference.py: score batches through a PipelineScorer.

Launched with `torchrun --nproc_per_node N` (world = stages x replicas). Replica r scores batches
r, r + R, r + 2R, ... (the test passes a multiple of R); middle stages pass None. Each last-stage
rank writes out/scores_rank{rank}.pt = {batch index: {field: tensor}}; every rank writes
out/info_rank{rank}.json. With --sae DIR --sae-layer L --sae-k K the pipeline carries decoder layer L
to the last stage, which alone loads the SAE (a loader callable) and adds feature_ids/values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from sparsepo.data.batching import collate_pairs
from sparsepo.engine.dist import shutdown
from sparsepo.engine.pipeline import PipelineScorer
from sparsepo.reference.stages import HeadStage


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", required=True, help="torch.save'd list of row lists (collate_pairs input)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--topk", type=int, required=True)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--partition", default="uniform")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--sae", default=None, help="SAE directory (sparsepo.sae.save_sae)")
    ap.add_argument("--sae-layer", type=int, default=None)
    ap.add_argument("--sae-k", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=0, help="model.logits_chunk (0: full logits on the last stage)")
    args = ap.parse_args()

    def load_features():
        from sparsepo.sae.runtime import SAEFeatures
        from sparsepo.sae import load_sae

        return SAEFeatures(load_sae(args.sae), layer=args.sae_layer, k=args.sae_k)

    t0 = time.perf_counter()
    scorer = PipelineScorer.from_pretrained(args.model, num_stages=args.stages, topk=args.topk,
                                            precision=args.precision, partition=args.partition,
                                            micro_batches=args.micro_batches,
                                            feature_layer=args.sae_layer if args.sae else None,
                                            features=load_features if args.sae else None, chunk=args.chunk)
    t_build = time.perf_counter() - t0
    all_rows = torch.load(args.batches)
    batches = [collate_pairs(rows, pad_id=0) for rows in all_rows]
    r, n_rep = scorer.replica_index, scorer.num_replicas
    if len(batches) % n_rep:
        raise SystemExit(f"{len(batches)} batches for {n_rep} replicas")
    scores: dict[int, dict[str, torch.Tensor]] = {}
    t1 = time.perf_counter()
    for rnd in range(len(batches) // n_rep):
        index = rnd * n_rep + r
        ro = scorer.score(batches[index] if scorer.needs_batch else None)
        if scorer.is_last_stage:
            scores[index] = {name: getattr(ro, name).detach().cpu() for name in ro.present()}
            scores[index]["example_ids"] = list(ro.example_ids)
        else:
            assert ro is None
    t_score = time.perf_counter() - t1
    rank = dist.get_rank()
    if scorer.is_last_stage:
        torch.save(scores, os.path.join(args.out, f"scores_rank{rank}.pt"))
    info = {"rank": rank, "stage": scorer.stage_id, "replica": r, "num_stages": scorer.num_stages,
            "num_replicas": n_rep, "is_last_stage": scorer.is_last_stage,
            "last_stage_ranks": scorer.last_stage_global_ranks(),
            "first_stage_ranks": scorer.first_stage_global_ranks(),
            "parts": scorer.parts,
            "stage_params": sum(p.numel() for p in scorer.engine.module.parameters()),
            "feature_layer": scorer.feature_layer, "holds_sae": scorer.features is not None,
            "sae_lens_imported": "sae_lens" in sys.modules, "outputs": list(scorer.outputs),
            "build_s": t_build, "score_s": t_score,
            "head_chunks": [m.head.chunk for m in scorer.engine.module.modules() if isinstance(m, HeadStage)]}
    with open(os.path.join(args.out, f"info_rank{rank}.json"), "w") as f:
        json.dump(info, f)
    shutdown(0)  # the gloo exit crash fix (docs/field_notes.md, "Exit crash"): barrier, destroy, flush, hard exit


if __name__ == "__main__":
    main()
