"""YAML + dotted overrides -> RunConfig, with refusals that name the key, its source and the fix;
and the way back (to_dict, the resolved config.yaml in a run directory)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sparsepo.atomic import atomic_write
from sparsepo.config.generation import check_generation
from sparsepo.config.lora import check_lora
from sparsepo.config.paths import absolute_local_paths
from sparsepo.config.sections import _CHOICES, ConfigError, MethodConfig, RunConfig
from sparsepo.trackers import REPORT_TO

_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in _SECTIONS}


def _nearest(key: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r} in {source}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{key}' in {source} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if origin is list:  # a list of choices; one value alone is a list of one (logging.report_to=wandb)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' in {source} must be a list (e.g. [a, b]), got {value!r}")
        return [_coerce(v, typing.get_args(tp)[0], key, source) for v in value]
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        value = _as_float(value, key, source)  # YAML 1.1 reads `1e-4` (no dot) as a string
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' in {source} is {value!r}: every float setting must be finite "
                          f"(1e400 overflows to inf; did you mean a negative exponent, e.g. 1e-4?)")
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(
            f"'{key}' in {source} must be {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _as_float(value: int | str, key: str, source: str) -> Any:
    """An int or a numeric string as a float (a string that is no number is returned unchanged)."""
    try:
        return float(value)
    except ValueError:
        return value
    except OverflowError:  # an int beyond a double
        raise ConfigError(f"'{key}' in {source} is too large for a float: {str(value)[:20]}...") from None


def _build(cls: type, raw: dict, prefix: str, sources: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        source = sources.get(dotted, sources.get(prefix, "<defaults>"))
        if key not in names:
            raise ConfigError(
                f"unknown key '{dotted}' in {source}.{_nearest(key, names)} "
                f"Valid keys of '{prefix}': {', '.join(names)}"
            )
        value = _coerce(value, hints[key], dotted, source)
        choices = _CHOICES.get((prefix, key))
        if choices and value not in choices:
            raise ConfigError(
                f"'{dotted}' in {source} is {value!r}; choose one of: {', '.join(choices)}."
                f"{_nearest(str(value), choices)}"
            )
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid '{prefix}' section in {source}: {e}") from e


def _build_method(raw: dict, sources: dict[str, str]) -> MethodConfig:
    from sparsepo.losses import METHODS

    from sparsepo.losses import get_method

    raw = dict(raw)
    name = raw.pop("name", "dpo")
    source = sources.get("method.name", sources.get("method", "<defaults>"))
    names = list(name) if isinstance(name, (list, tuple)) else [name]
    for one in names:
        if not isinstance(one, str) or one not in METHODS:
            raise ConfigError(
                f"unknown method '{one}' ('method.name' in {source}).{_nearest(str(one), METHODS)} "
                f"Valid methods: {', '.join(METHODS)}; a list of them (with method.weights) is their weighted sum"
            )
    try:
        spec = get_method(names if isinstance(name, (list, tuple)) else name)
    except ValueError as e:
        raise ConfigError(f"'method.name' in {source}: {e}") from e
    params = _build(spec.params_cls, raw, "method", sources)
    return MethodConfig(name=names if isinstance(name, (list, tuple)) else name, params=params)


def _drop_keys_of_the_replaced_method(raw: dict, sources: dict[str, str], file_method, source: str) -> None:
    """An override of method.name (`method.name=simpo` on a DPO recipe): the file's method keys that
    the file's method takes but the new one does not are dropped, with one warning naming them. A key
    neither method takes (a typo) is left for `_build` to refuse; the override's own keys are kept."""
    import logging
    import os

    from sparsepo.losses import get_method

    body = raw.get("method")
    if not isinstance(body, dict) or not sources.get("method.name", "").startswith("command-line"):
        return
    try:
        old, new = (set(f.name for f in dataclasses.fields(get_method(m).params_cls))
                    for m in (file_method, body.get("name")))
    except (ValueError, TypeError, KeyError):
        return  # an unknown name: _build_method refuses it, naming it
    dropped = [k for k in body if k != "name" and k in old and k not in new
               and not sources.get(f"method.{k}", "").startswith("command-line")]
    for k in dropped:
        del body[k]
    if dropped and os.environ.get("RANK", "0") == "0":  # one warning per launch, not one per rank
        logging.getLogger("sparsepo").warning(
            "method.name=%s (command line) takes no %s: dropped from %s's %s settings",
            body.get("name"), ", ".join(f"method.{k}" for k in dropped), source, file_method)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`method.beta=0.05` -> ("method.beta", 0.05); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. method.beta=0.05)")
    key, _, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if key.count(".") != 1:
        raise ConfigError(f"override '{text}': the key must be section.key (e.g. optim.lr=1e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from e
    return key, parsed


def config_from_dict(raw: dict, *, source: str = "<dict>", overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Build and validate a RunConfig from a nested dict plus dotted overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    sources: dict[str, str] = {}
    for section, body in raw.items():
        sources[section] = source
        if isinstance(body, dict):
            for key in body:
                sources[f"{section}.{key}"] = source
    file_method = raw.get("method", {}).get("name", "dpo") if isinstance(raw.get("method"), dict) else "dpo"
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        sources[key] = f"command-line override '{text}'"
        sources.setdefault(key.partition(".")[0], sources[key])  # a section only the override names
    _drop_keys_of_the_replaced_method(raw, sources, file_method, source)
    classes = _section_classes()
    kwargs = {}
    for section, body in raw.items():
        if section not in classes:
            raise ConfigError(
                f"unknown section '{section}' in {sources[section]}.{_nearest(section, classes)} "
                f"Valid sections: {', '.join(classes)}"
            )
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"section '{section}' in {sources[section]} must be a mapping, got {body!r}")
        if section == "method":
            kwargs[section] = _build_method(body, sources)
        else:
            kwargs[section] = _build(classes[section], body, section, sources)
    cfg = RunConfig(**kwargs)
    absolute_local_paths(cfg)
    validate(cfg, source=source, sources=sources)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Load a YAML run config (or the defaults when path is None) and apply dotted overrides."""
    if path is None:
        return config_from_dict({}, source="<defaults>", overrides=overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return config_from_dict(raw, source=str(path), overrides=overrides)


def validate(cfg: RunConfig, *, source: str = "<config>", sources: dict[str, str] | None = None) -> None:
    """Refuse combinations that cannot run, naming the keys and the fix. `sources`: where each dotted
    key was set (the file, or the command-line override), so a one-key refusal names its origin."""
    from sparsepo.losses import get_method
    from sparsepo.losses.fpo import mode_problem as fpo_mode_problem
    from sparsepo.follow import sync_problem

    def at(key: str) -> str:
        return (sources or {}).get(key, source)

    spec = get_method(cfg.method.name)
    d, r, t = cfg.data, cfg.reference, cfg.train
    if d.max_prompt_length >= d.max_length:
        raise ConfigError(
            f"data.max_prompt_length={d.max_prompt_length} must be < data.max_length={d.max_length} "
            f"({source}): leave room for the response."
        )
    for key, value in (("train.micro_batch_size", t.micro_batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.epochs", t.epochs), ("reference.batch_size", r.batch_size),
                       ("reference.topk", r.topk), ("reference.window", r.window),
                       ("reference.shard_size", r.shard_size), ("data.max_length", d.max_length)):
        if value < 1:
            raise ConfigError(f"{key}={value} in {at(key)} must be >= 1")
    if t.max_nonfinite_steps < 0:
        raise ConfigError(f"train.max_nonfinite_steps={t.max_nonfinite_steps} in {at('train.max_nonfinite_steps')} "
                          f"must be >= 0")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} in {at('train.max_steps')} must be >= 1 "
                          f"(or null for whole epochs)")
    if not 0.0 <= d.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction={d.max_skip_fraction} in {at('data.max_skip_fraction')} "
                          f"must be in [0, 1]")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} in {at('optim.lr')} must be > 0")
    if r.mode == "live" and cfg.topology.reference_ranks == 0:
        raise ConfigError(
            f"reference.mode=live needs a reference group ({source}): set topology.reference_ranks "
            f"to the number of ranks for it (a multiple of topology.pipeline_stages), or use reference.mode=cache."
        )
    if r.mode != "live" and cfg.topology.reference_ranks > 0:
        raise ConfigError(
            f"topology.reference_ranks={cfg.topology.reference_ranks} but reference.mode={r.mode} ({source}): "
            f"only live mode starts reference processes. Set reference.mode=live, or topology.reference_ranks=0."
        )
    if spec.needs_sae_features and not cfg.sae.path:
        raise ConfigError(
            f"method '{spec.name}' needs an SAE ({source}): set sae.path to a sae-lens SAE directory "
            f"(train one with `sparsepo sae train`) or a sae-lens release id with sae.sae_id."
        )
    if spec.needs_policy_samples and r.mode not in ("inline", "live"):
        raise ConfigError(
            f"method '{spec.name}' ({source}) regularises with a KL on samples the policy draws during training, so "
            f"nothing can be precomputed (reference.mode={r.mode}): set reference.mode=inline (the reference scores "
            f"the samples on the policy ranks) or reference.mode=live (a reference group scores them on request).")
    if spec.needs_policy_samples and r.mode == "live" and cfg.generation.staleness >= r.window:
        raise ConfigError(f"generation.staleness={cfg.generation.staleness} must be < reference.window={r.window} "
                          f"in live mode ({source}): raise reference.window or lower the staleness.")
    if spec.needs_policy_samples and t.max_steps is not None and cfg.generation.staleness >= t.max_steps:
        raise ConfigError(f"generation.staleness={cfg.generation.staleness} in {at('generation.staleness')} must be < "
                          f"train.max_steps={t.max_steps}: every step would regularise on the samples of step 0. "
                          f"Lower the staleness (0 = synchronous) or train longer.")
    if spec.needs_policy_samples and (problem := check_generation(cfg.generation)):
        raise ConfigError(f"{problem} ({source})")
    if problem := sync_problem(cfg, spec):
        raise ConfigError(f"{problem} ({source})")
    if spec.needs_sae_features and (problem := fpo_mode_problem(cfg.method.params, r.mode)):
        raise ConfigError(f"{problem} ({source})")
    if spec.needs_oracle_scores and not r.oracle:
        raise ConfigError(
            f"method '{spec.name}' needs token scores from a DPO-trained oracle pair ({source}): set "
            f"reference.oracle to a directory written by `sparsepo sepo train-oracle --config X --out DIR`.")
    check_trl_options(cfg, spec, source)
    if problem := check_lora(cfg, source):
        raise ConfigError(problem)
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} in {at('checkpoint.keep_last')} "
                          f"must be >= 1")


def check_trl_options(cfg: RunConfig, spec, source: str) -> None:
    """What TRL users set: optim.warmup_ratio, logging.report_to, and the eval section (one source of
    held-out pairs, and a mode and method that can score them)."""
    if not 0.0 <= cfg.optim.warmup_ratio < 1.0 or (cfg.optim.warmup_ratio and cfg.optim.warmup_steps):
        raise ConfigError(f"optim.warmup_ratio={cfg.optim.warmup_ratio} in {source} must be in [0, 1) and "
                          f"optim.warmup_steps={cfg.optim.warmup_steps} 0 when it is set: warm up by one of them")
    unknown = [t for t in cfg.logging.report_to if t not in REPORT_TO]
    if unknown:
        raise ConfigError(f"logging.report_to in {source} lists {unknown}; choose from tensorboard, wandb, mlflow "
                          f"(or none)")
    if "none" in cfg.logging.report_to and len(cfg.logging.report_to) > 1:
        raise ConfigError(f"logging.report_to={cfg.logging.report_to} in {source}: 'none' (no tracker; metrics.jsonl "
                          f"is still written) goes alone")
    e = cfg.eval
    given = [k for k, v in (("eval.path", e.path), ("eval.split", e.split), ("eval.fraction", e.fraction)) if v]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are all set ({source}): held-out pairs come from one of them; "
                          f"unset the others (null / 0)")
    if e.split and e.split == cfg.data.split:
        raise ConfigError(f"eval.split={e.split!r} is data.split ({source}): the model would be evaluated on the "
                          f"pairs it trains on; name another split (e.g. test) or use eval.fraction")
    if not 0.0 <= e.fraction < 1.0:
        raise ConfigError(f"eval.fraction={e.fraction} in {source} must be in [0, 1)")
    if e.batch_size < 1 or e.every_steps < 0:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be >= 1 and eval.every_steps={e.every_steps} "
                          f">= 0 ({source})")
    if not given:
        if e.every_steps:
            raise ConfigError(f"eval.every_steps={e.every_steps} but no eval pairs ({source}): set eval.path, "
                              f"eval.split or eval.fraction")
        return
    if spec.needs_policy_samples:
        raise ConfigError(f"method '{spec.name}' ({source}) has a KL term on samples the policy draws while "
                          f"training, which held-out pairs do not define; unset {given[0]}")


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (method params flattened beside `name`), the inverse of config_from_dict."""
    out = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name == "method":
            out["method"] = {"name": section.name, **dataclasses.asdict(section.params)}
        else:
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
    return out


def config_fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def save_resolved(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved config (re-loadable with load_config) into the run directory."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    return atomic_write(path, f"# resolved sparsepo config, fingerprint {config_fingerprint(cfg)}\n"
                              f"# rerun: sparsepo train --config {path}\n"
                        + yaml.safe_dump(to_dict(cfg), sort_keys=False))
