"""The demo's trained helpers, cached beside the world: FPO's SAE and SePO's oracle. Each records
the settings it was trained with (`demo_settings.json` in its directory) and is trained again when
a run asks for other settings (a 20-step oracle is never reused by a full run).

    sae_dir = demo_sae(world, overrides, steps=300, force=False, recipe=RECIPES / "demo.yaml")
    oracle_dir = demo_oracle(world, oracle="small", seed=0, nproc=1, overrides=[...], force=False, ...)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sparsepo.atomic import atomic_write

log = logging.getLogger("sparsepo.demo")
SETTINGS = "demo_settings.json"
SAE_KEYS = ("sae.", "data.", "model.", "reference.path", "train.seed", "train.precision")
"""The overrides that change the demo SAE (its model, layer, data, seed); the rest do not."""


def reusable(out: Path, done_marker: str, settings: dict) -> bool:
    """Whether `out` holds a finished artefact trained with exactly `settings` (logs why not)."""
    if not (out / done_marker).is_file():
        return False
    path = out / SETTINGS
    old = json.loads(path.read_text()) if path.is_file() else None
    if old == settings:
        return True
    log.warning("%s was trained with %s, this run asks for %s: training it again", out, old or "unrecorded settings",
                settings)
    return False


def demo_sae(world, overrides: list[str], *, steps: int, force: bool, recipe: Path) -> Path:
    """The demo's SAE on the SFT model's layer sae.layer (default 1), `steps` optimiser steps."""
    from sparsepo.config import load_config
    from sparsepo.sae import SIDECAR
    from sparsepo.sae.runtime import train_for_run

    out = Path(world.root) / "sae"
    settings = {"steps": steps, "overrides": [o for o in overrides if o.startswith(SAE_KEYS)]}
    if force or not reusable(out, SIDECAR, settings):
        cfg = load_config(recipe, [f"model.path={world.sft_dir}", f"data.path={world.train_path}", f"sae.path={out}",
                                   *overrides])
        train_for_run(cfg, out, steps=steps)  # 300: 0.997 explained variance on the default world
        atomic_write(out / SETTINGS, json.dumps(settings, indent=1))
    return out


def demo_oracle(world, *, oracle: str, seed: int, nproc: int, overrides: list[str], force: bool, recipe: Path,
                launch) -> Path:
    """SePO's demo oracle: DPO on a seeded half of the pairs, from the small SFT model (`oracle="small"`)
    or the policy's; the training overrides (not method.* / reference.*) are its own."""
    from sparsepo.oracle_train import train_oracle

    out = Path(world.root) / ("oracle-small" if oracle == "small" else "oracle")
    keep = [o for o in overrides if not o.startswith(("method.", "reference.", "logging.output_dir"))]
    settings = {"oracle": oracle, "seed": seed, "nproc": nproc, "fraction": 0.5, "overrides": keep}
    if force or not reusable(out, "oracle.json", settings):
        if oracle == "small":
            from sparsepo.demo.small import prepare_small_sft

            start = prepare_small_sft(world, force=force)
        else:
            start = world.sft_dir
        train_oracle(str(recipe), out, launch=launch, fraction=0.5, nproc=nproc, seed=seed, model=str(start),
                     overrides=[f"data.path={world.train_path}", "logging.overwrite=true", *keep])
        atomic_write(out / SETTINGS, json.dumps(settings, indent=1))
    return out
