"""Loading, saving, fingerprinting and checking SAEs.

An SAE directory is sae-lens' format (`cfg.json` + `sae_weights.safetensors`, loadable with
`sae_lens.SAE.load_from_disk`) plus our sidecar `sparsepo_sae.json`:

    {"format": 1, "layer": ℓ, "hook_name": "blocks.ℓ.hook_resid_post", "hook_module": "model.layers.ℓ",
     "sae_fingerprint": "...", "model_fingerprint": "..." | null, "stats": {...}}

written last and atomically; `load_sae` refuses weights whose fingerprint no longer matches it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from sparsepo.atomic import atomic_write

SIDECAR = "sparsepo_sae.json"
SIDECAR_FORMAT = 1
# Config fields that change what an SAE computes (metadata, device and dtype do not; the weights'
# dtype is hashed with the weights).
_IGNORED_CFG = ("metadata", "device", "dtype")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def load_sae(source: str, *, sae_id: str | None = None, device: str = "cpu", dtype: str | None = None,
             verify: bool = True):
    """A frozen (eval, requires_grad False) sae-lens SAE.

    `source` is a local sae-lens directory (`SAE.load_from_disk`) or, with `sae_id`, a sae-lens
    release id (`SAE.from_pretrained`, which needs the hub or its local cache). A directory's
    sidecar, if any, is attached as `sae.sparsepo_meta` and (with `verify`) checked against the
    weights.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if sae_id is not None:
            raise ValueError(f"{path} is a local SAE directory; sae_id={sae_id!r} only applies to a "
                             f"sae-lens release id: drop sae.sae_id")
        return _load_dir(path, device=device, dtype=dtype, verify=verify)
    if sae_id is None or _looks_like_path(source):
        raise FileNotFoundError(
            f"SAE directory {path} does not exist (expected cfg.json + sae_weights.safetensors from "
            f"sae-lens or `sparsepo sae train`); for a sae-lens release, pass its id with sae_id")
    from sae_lens import SAE

    try:
        sae = SAE.from_pretrained(source, sae_id, device=device, dtype=dtype or "float32")
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; say which SAE and why
        raise RuntimeError(f"could not load sae-lens release {source!r} / sae_id {sae_id!r} "
                           f"(needs the Hugging Face hub or its cache): {err}") from err
    sae.sparsepo_meta = {}
    sae.sparsepo_source = f"{source}:{sae_id}"
    return _freeze(sae)


def _load_dir(path: Path, *, device: str, dtype: str | None, verify: bool):
    from sae_lens import SAE

    missing = [f for f in ("cfg.json", "sae_weights.safetensors") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a sae-lens SAE directory: missing {', '.join(missing)}")
    try:
        sae = SAE.load_from_disk(path, device=device, dtype=dtype)
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"could not read the SAE in {path}: {type(err).__name__}: {err}") from err
    meta: dict[str, Any] = {}
    if (path / SIDECAR).is_file():
        try:
            meta = json.loads((path / SIDECAR).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RuntimeError(f"unreadable {path / SIDECAR}: {err}") from err
        want = meta.get("sae_fingerprint")
        if verify and want and dtype is None and sae_fingerprint(sae) != want:
            raise RuntimeError(f"the weights in {path} do not match its {SIDECAR} (a partial write or an "
                               f"edited file): save the SAE again")
    sae.sparsepo_meta = meta
    sae.sparsepo_source = str(path)
    return _freeze(sae)


def _freeze(sae):
    sae.requires_grad_(False)
    sae.eval()
    return sae


def sae_fingerprint(sae) -> str:
    """sha256 over the SAE's defining config (d_in, d_sae, architecture, k, ...) and its weights."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in sae.cfg.to_dict().items() if k not in _IGNORED_CFG}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(sae.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sae_hook_layer(sae) -> int | None:
    """The decoder layer whose output this SAE reads, from our sidecar or sae-lens' hook name.

    sae-lens (TransformerLens) names: `blocks.ℓ.hook_resid_post` is the output of layer ℓ, and
    `blocks.ℓ.hook_resid_pre` that of layer ℓ−1. HF-style `layers.ℓ` means layer ℓ's output.
    Returns None when nothing says; raises for a hook that is not a layer's residual output.
    """
    meta = getattr(sae, "sparsepo_meta", None) or {}
    if meta.get("layer") is not None:
        return int(meta["layer"])
    name = sae.cfg.metadata.hook_name
    if not name:
        return None
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", name):
        layer = int(m.group(1)) - (m.group(2) == "pre")
        if layer < 0:
            raise ValueError(f"SAE reads {name} (the embeddings), not a decoder layer's output; "
                             f"FPO needs a residual-stream SAE after a decoder layer")
        return layer
    if m := re.fullmatch(r"(?:model\.)?layers\.(\d+)", name):
        return int(m.group(1))
    if re.match(r"blocks\.\d+\.", name):
        raise ValueError(f"SAE reads {name}, not the residual stream after a decoder layer "
                         f"(hook_resid_post); FPO's hook captures decoder-layer outputs")
    return None


def check_sae_compatible(sae, *, d_model: int, layer: int, num_layers: int,
                         expected_fingerprint: str | None = None,
                         model_fingerprint: str | None = None) -> None:
    """Refuse an SAE that cannot serve FPO at `layer` of a model of width `d_model`.

    `expected_fingerprint`: the SAE fingerprint the reference cache was built with.
    `model_fingerprint`: the policy/reference model's; compared with the sidecar's when both exist.
    """
    where = getattr(sae, "sparsepo_source", "this SAE")
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE {where} has d_in={sae.cfg.d_in} but the model's hidden size is {d_model}: "
                         f"it was trained on another model; set sae.path to an SAE for this model or "
                         f"train one with `sparsepo sae train`")
    if not 0 <= layer < num_layers:
        raise ValueError(f"sae.layer={layer} is out of range for a model with {num_layers} decoder layers: "
                         f"set sae.layer to 0..{num_layers - 1}")
    sae_layer = sae_hook_layer(sae)
    if sae_layer is not None and sae_layer != layer:
        hook = (getattr(sae, "sparsepo_meta", None) or {}).get("hook_name") or sae.cfg.metadata.hook_name
        raise ValueError(f"SAE {where} was trained on layer {sae_layer} ({hook}) but sae.layer={layer}: "
                         f"set sae.layer={sae_layer} or use an SAE trained on layer {layer}")
    recorded = (getattr(sae, "sparsepo_meta", None) or {}).get("model_fingerprint")
    if model_fingerprint and recorded and recorded != model_fingerprint:
        raise ValueError(f"SAE {where} was trained on activations of model {recorded[:16]}, not this model "
                         f"({model_fingerprint[:16]}): train an SAE for this model with `sparsepo sae train`")
    if expected_fingerprint is not None:
        actual = sae_fingerprint(sae)
        if actual != expected_fingerprint:
            raise ValueError(f"SAE fingerprint {actual[:16]} of {where} differs from the one the reference "
                             f"cache was built with ({expected_fingerprint[:16]}): the cached features come "
                             f"from another SAE; point sae.path at that SAE or rebuild the cache "
                             f"(`sparsepo precompute`)")


def save_sae(sae, directory: str | Path, *, layer: int, model_fingerprint: str | None = None,
             stats: dict | None = None) -> Path:
    """Save an inference SAE in sae-lens' format plus the sidecar (written last, atomically)."""
    directory = Path(directory)
    hook_name = f"blocks.{layer}.hook_resid_post"
    known = sae_hook_layer(sae)
    if known is not None and known != layer:
        raise ValueError(f"this SAE reads layer {known}; saving it as layer {layer} would mislabel it")
    sae.cfg.metadata.hook_name = hook_name
    sae.save_model(directory)
    meta = {
        "format": SIDECAR_FORMAT,
        "layer": layer,
        "hook_name": hook_name,
        "hook_module": f"model.layers.{layer}",
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "sae_fingerprint": sae_fingerprint(sae),
        "model_fingerprint": model_fingerprint,
        "stats": stats or {},
    }
    atomic_write(directory / SIDECAR, json.dumps(meta, indent=2, sort_keys=True, default=float) + "\n")
    sae.sparsepo_meta = meta
    sae.sparsepo_source = str(directory)
    return directory
