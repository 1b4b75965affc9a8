"""What a resume compares of the config: the checkpoint's config (sparsepo.json) against this run's,
less what may change between an interrupted run and its resume, with the rules for options added or
renamed since the checkpoint was written (`config_differences`, used by `checkpoint.check_compatible`)."""

from __future__ import annotations

import dataclasses
import json
import os

from sparsepo.config import RunConfig, to_dict

# Sections / keys that may change between the interrupted run and its resume.
_MAY_DIFFER = {"logging", "checkpoint"}
_MAY_DIFFER_KEYS = {("train", "max_steps"), ("train", "epochs"), ("reference", "timeout_s"),
                    ("reference", "window"), ("data", "num_proc"), ("data", "cache_dir"),
                    # the data is compared by fingerprint, the batch split by the global batch below
                    ("data", "path"), ("reference", "cache_dir"),
                    ("train", "micro_batch_size"), ("train", "grad_accum"), ("train", "train_batch_size"),
                    # the lean and the plain log-prob paths give the same numbers (tests/test_logprobs*.py)
                    ("model", "logits_chunk"),
                    # a resume may raise the tolerance of the non-finite guard (sparsepo.guard)
                    ("train", "max_nonfinite_steps"),
                    # kernels, not maths: the same update up to float rounding
                    ("model", "attn_implementation"), ("optim", "implementation"),
                    # evaluation reads the policy, never changes it (eval.fraction changes the data: fingerprint)
                    ("eval", "path"), ("eval", "every_steps"), ("eval", "batch_size")}
_PATH_KEYS = {("model", "path"), ("model", "tokenizer"), ("reference", "path"), ("reference", "oracle"),
              ("sae", "path")}


def comparable(cfg_dict: dict) -> dict:
    """The config as a resume compares it. Paths compare absolute: configs now store them so, and a
    checkpoint written with a relative path (older sparsepo) still resumes from the same directory."""
    def value(s, k, v):
        return os.path.abspath(v) if (s, k) in _PATH_KEYS and isinstance(v, str) and v else v

    return {s: {k: value(s, k, v) for k, v in body.items() if (s, k) not in _MAY_DIFFER_KEYS}
            for s, body in cfg_dict.items() if s not in _MAY_DIFFER}


def _new_key_at_default(cfg: RunConfig, section: str, key: str, then: dict, now: dict) -> bool:
    """A key the checkpoint's config lacks (written by an older sparsepo, before the option existed)
    whose value now is the option's default: options are added so that their default is the old
    behaviour, so the run continues as it was trained."""
    if section not in then or key in then[section] or key not in now.get(section, {}):
        return False
    body = getattr(cfg, section)
    fields = dataclasses.fields(body.params if section == "method" else body)
    default = next((f.default for f in fields if f.name == key), dataclasses.MISSING)
    meant = getattr(body.params, "absent_key_value", None) if section == "method" else None
    if meant is not None and (old := meant(key, then[section])) is not dataclasses.MISSING:
        default = old  # the option's old behaviour is not its default now (WPO's cap: `losses.knobs.WPOKnob`)
    return default is not dataclasses.MISSING and json.loads(json.dumps(default, default=str)) == now[section][key]


def _was(cfg: RunConfig, section: str, key: str, then: dict) -> str:
    """The checkpoint's section.key as a resume error shows it, or what an older sparsepo meant by its absence."""
    old, meant = then.get(section, {}), getattr(cfg.method.params, "absent_key_value", None)
    was = meant(key, old) if section == "method" and key not in old and meant else dataclasses.MISSING
    return repr(old.get(key, None)) if was is dataclasses.MISSING else f"absent (then {was!r})"


def config_differences(cfg: RunConfig, then_config: dict) -> list[str]:
    """`section.key: then -> now` for each setting that differs between the checkpoint's config and
    `cfg` and that a resume may not change; [] when the run can continue."""
    # compare what sparsepo.json can hold (tuples -> lists, paths -> str), as it was written
    now = comparable(json.loads(json.dumps(to_dict(cfg), default=str)))
    then = comparable(then_config)
    for old, new in getattr(cfg.method.params, "renamed_keys", {}).items():  # a method key renamed since
        if "method" in then and old in then["method"] and new not in then["method"]:
            then["method"][new] = then["method"].pop(old)
    keys = [(s, k) for s in sorted(set(now) | set(then)) for k in sorted(set(now.get(s, {})) | set(then.get(s, {})))]
    missing = object()
    return [f"{s}.{k}: {_was(cfg, s, k, then)} -> {now.get(s, {}).get(k, None)!r}" for s, k in keys
            if then.get(s, {}).get(k, missing) != now.get(s, {}).get(k, missing)
            and not _new_key_at_default(cfg, s, k, then, now)]
