"""`sparsepo sepo train-oracle`: SePO's oracle, trained as a normal DPO run of our own trainer.

    sparsepo sepo train-oracle --config run.yaml --out runs/oracle [--fraction 0.5] [--model DIR] [overrides]
    sparsepo train --config run.yaml method.name=sepo reference.oracle=runs/oracle

1. Data: with --fraction F < 1, a seeded F of the pairs goes to DIR/data.jsonl and the rest to
   DIR/heldout.jsonl; with F = 1 the oracle sees every pair (held-out pairs: --heldout FILE).
2. `sparsepo.train` (ZeRO-3, checkpoints, TensorBoard) with method.name=dpo, model.path = the
   oracle's starting model (--model, default the config's model.path) and reference.path = the
   same model, into DIR/run. The oracle's reference is its own starting model.
3. Held-out preference accuracy: the fraction of held-out pairs where the oracle's DPO implicit
   reward β·Σ_t r_t (r_t = log π_oracle − log π_oracle_ref, scored by `reference.oracle.OraclePair`)
   is higher for the chosen response than for the rejected one.
4. DIR/oracle.json: {"oracle": DIR/run/final, "reference": the starting model, "fraction": F,
   "heldout_accuracy": ..., ...}, written last, so a half-trained oracle is never taken for one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import yaml

from sparsepo.atomic import atomic_write
from sparsepo.recipe import for_method
from sparsepo.reference.oracle import MANIFEST, OracleManifest, OraclePair

log = logging.getLogger("sparsepo")


def split_pairs(cfg_data, out: Path, fraction: float, seed: int) -> tuple[Path, Path]:
    """Write a seeded `fraction` of the pairs to out/data.jsonl and the rest to out/heldout.jsonl."""
    from sparsepo.data.sources import load_rows

    rows, _ = load_rows(cfg_data.path, cfg_data.format, split=cfg_data.split, cache_dir=cfg_data.cache_dir)
    n = len(rows)
    keep = min(max(1, round(fraction * n)), n - 1)
    if n < 2:
        raise ValueError(f"{cfg_data.path}: {n} pair(s) cannot be split into an oracle fraction and held-out pairs")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[:keep])
    paths = out / "data.jsonl", out / "heldout.jsonl"
    for path, want in zip(paths, (True, False)):
        lines = [json.dumps(rows[i], ensure_ascii=False) + "\n" for i in range(n) if (i in chosen) == want]
        atomic_write(path, "".join(lines))
    log.info("oracle data: %d of %d pairs (fraction %.3g, seed %d) -> %s; %d held out -> %s",
             keep, n, fraction, seed, paths[0], n - keep, paths[1])
    return paths


def preference_accuracy(pair: OraclePair, cfg_data, tokenizer, *, batch_size: int) -> tuple[float, int]:
    """Fraction of the pairs in `cfg_data` whose oracle implicit reward Σ_t r_t is higher for chosen."""
    from sparsepo.data import collate_pairs, gather_rows, load_preference_dataset

    dataset, _ = load_preference_dataset(cfg_data, tokenizer, run_dir=None)
    wins = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_pairs(gather_rows(dataset, list(range(start, min(start + batch_size, len(dataset))))),
                              tokenizer.pad_token_id)
        reward = pair.token_scores(batch).sum(-1)
        b = batch.num_pairs
        wins += int((reward[:b] > reward[b:]).sum())
    return wins / max(len(dataset), 1), len(dataset)


def train_oracle(config: str | None, out: str | Path, *, launch, fraction: float = 1.0, model: str | None = None,
                 heldout: str | None = None, overrides: list[str] = (), nproc: int = 1, seed: int | None = None) -> dict:
    """Steps 1-4 of the module docstring; returns the manifest (also written to out/oracle.json).
    `launch(config, overrides, nproc=)` runs a training job (`sparsepo.cli.launch_train`) and
    returns its exit code."""
    from sparsepo.config import load_config
    from sparsepo.models import load_tokenizer

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction {fraction} must be in (0, 1]")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(Path(config).read_text()) if config else {}
    raw = for_method(raw, "dpo")
    if isinstance(raw.get("reference"), dict):
        raw["reference"].pop("oracle", None)
    recipe = atomic_write(out / "oracle_config.yaml", f"# the oracle's DPO run (from {config})\n"
                          + yaml.safe_dump(raw, sort_keys=False))
    user = load_config(recipe, list(overrides))
    # stored absolute, as the config stores paths: the manifest is read from other working directories
    start = str(Path(model).resolve()) if model and Path(model).exists() else str(model or user.model.path)
    seed = user.train.seed if seed is None else seed
    forced = [f"model.path={start}", f"reference.path={start}", "method.name=dpo", f"logging.output_dir={out / 'run'}",
              "reference.mode=cache", f"reference.cache_dir={out / 'ref_cache'}", "topology.reference_ranks=0"]
    if model and not user.model.tokenizer:
        forced.append(f"model.tokenizer={start}")
    held = Path(heldout) if heldout else None
    if fraction < 1.0:
        data_path, held = split_pairs(user.data, out, fraction, seed)
        forced += [f"data.path={data_path}", "data.format=jsonl"]
    code = launch(str(recipe), [*overrides, *forced], nproc=nproc)
    if code != 0:
        raise RuntimeError(f"oracle DPO training failed (exit {code}); its run directory is {out / 'run'}")
    cfg = load_config(recipe, [*overrides, *forced])
    final = out / "run" / "final"
    pair = OraclePair.load(OracleManifest(directory=str(out), oracle=str(final), reference=start),
                           precision=cfg.train.precision)
    tokenizer = load_tokenizer(str(final))
    data = dataclasses.replace(cfg.data, path=str(held), format="auto") if held else cfg.data
    accuracy, n = preference_accuracy(pair, data, tokenizer, batch_size=cfg.reference.batch_size)
    manifest = {"oracle": str(final), "reference": start, "fraction": fraction,
                "heldout_accuracy": accuracy if held else None, "heldout_pairs": n if held else 0,
                "heldout_path": str(held) if held else None, "seed": seed,
                **({} if held else {"train_accuracy": accuracy, "train_pairs": n})}
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
    what = f"held-out preference accuracy {accuracy:.1%} on {n} pairs" if held else \
        f"training-pair preference accuracy {accuracy:.1%} on {n} pairs (no held-out pairs: use --fraction < 1 or --heldout)"
    print(f"SePO oracle in {out}: {what}; train the policy with reference.oracle={out}")
    return manifest
