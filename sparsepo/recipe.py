"""Recipes (YAML run configs) re-targeted at another method.

    raw = for_method(yaml.safe_load(open("sparsepo/recipes/demo.yaml")), "sepo")

A recipe's `method:` section holds the hyper-parameters of the method it was written for (the demo
recipe's DPO `beta`); another method's params may lack them, and the config refuses unknown keys.
`for_method` keeps only the keys the target method's params have.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from sparsepo.atomic import atomic_write


def for_method(raw: dict | None, method: str) -> dict:
    """A copy of the recipe mapping `raw` whose method section names `method` and keeps only the
    keys that method's params dataclass has."""
    from sparsepo.losses import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).params_cls)}
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    section = out.get("method") or {}
    out["method"] = {"name": method, **{k: v for k, v in section.items() if k in fields}}
    return out


def write_for_method(src: str | Path, method: str, dst: str | Path) -> Path:
    """Write `src` re-targeted at `method` (see `for_method`) to `dst`; returns dst."""
    raw = yaml.safe_load(Path(src).read_text())
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(dst, f"# {src}, for method {method} (sparsepo.recipe.for_method)\n"
                        + yaml.safe_dump(for_method(raw, method), sort_keys=False))
