"""Typed run configuration: the single source of truth for a run.

    cfg = load_config("recipes/demo_dpo.yaml", overrides=["method.beta=0.05", "train.max_steps=20"])

A YAML file maps onto `RunConfig` section by section; `method:` takes `name` plus the
hyper-parameters of that method's dataclass from the loss table. Unknown keys, wrong types and
incompatible combinations raise `ConfigError` naming the key, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsepo.atomic import atomic_write
from sparsepo.generation_config import PARAM_PATHS, GenerationConfig, check_generation



class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the source and the fix."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str = "runs/demo/world/sft"
    """Hugging Face model directory (or hub id where a hub is reachable): the starting policy."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass(kw_only=True)
class DataConfig:
    path: str = "runs/demo/world/data/train.jsonl"
    """Preference pairs: a .jsonl/.json/.parquet/.csv file, a `save_to_disk` directory, or a hub name."""
    format: str = "auto"
    """auto | jsonl | json | parquet | csv | disk | hub. `auto` decides from the path."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    max_length: int = 256
    """Longest prompt + response, in tokens."""
    max_prompt_length: int = 128
    """Prompt budget when a pair is too long (prompt is cut from the left first)."""
    truncation: str = "prompt_first"
    """prompt_first: cut the prompt from the left down to max_prompt_length, then the response from
    the right; response_only: only cut responses; error: refuse over-long pairs."""
    on_bad_row: str = "error"
    """error: refuse the dataset at the first bad row; skip: skip it and report it in the run directory."""
    max_skip_fraction: float = 0.01
    """With on_bad_row=skip, refuse to start when more than this fraction of rows is bad."""
    num_proc: int = 1
    """Processes for tokenisation (datasets.map)."""
    cache_dir: str | None = None
    """Where `datasets` keeps its Arrow/tokenisation cache; default: its own (~/.cache/huggingface)."""


@dataclass(kw_only=True)
class MethodConfig:
    name: str = "dpo"
    """A row of the loss table: dpo, ipo, simpo, tdpo1, tdpo2, fpo, sepo, spo."""
    params: Any = None
    """That method's hyper-parameter dataclass (filled from the YAML keys beside `name`)."""

    def __post_init__(self) -> None:
        if self.params is None:
            from sparsepo.losses import get_method

            self.params = get_method(self.name).params_cls()


@dataclass(kw_only=True)
class ReferenceConfig:
    mode: str = "cache"
    """cache: read a precomputed reference cache (computed first when missing); live: a separate
    reference group scores beside the policy; precompute: fill the cache and exit; inline: each
    policy rank runs the frozen reference inside its step (TRL's way; the sequential baseline)."""
    path: str | None = None
    """Reference model directory; defaults to model.path (the usual case: reference = initial policy)."""
    cache_dir: str | None = None
    """Reference cache directory; default <logging.output_dir>/ref_cache."""
    batch_size: int = 8
    """Pairs per reference forward."""
    topk: int = 16
    """Top-k next-token log-probs kept per position for sparse distributions (TDPO, SPO)."""
    shard_size: int = 512
    """Pairs per cache shard file."""
    window: int = 2
    """Live mode: batches scored ahead of the policy (the scheduler's window W)."""
    timeout_s: float = 600.0
    """Live mode: fail if the reference group sends nothing for this long."""


@dataclass(kw_only=True)
class TopologyConfig:
    reference_ranks: int = 0
    """Ranks given to the reference group in live mode (0 in cache mode)."""
    pipeline_stages: int = 1
    """Pipeline stages of the reference model; reference_ranks / pipeline_stages replicas."""
    placement: str = "last"
    """last: reference ranks are the highest global ranks (e.g. the last nodes); interleaved:
    spread evenly among the policy ranks."""


@dataclass(kw_only=True)
class SAEConfig:
    path: str | None = None
    """sae-lens SAE: a local directory (SAE.load_from_disk) or a sae-lens release id (needs a hub)."""
    sae_id: str | None = None
    """SAE id inside a sae-lens release."""
    layer: int = 1
    """Decoder layer whose residual-stream output the SAE reads (FPO's layer l)."""


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 5e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    """constant | linear | cosine: transformers' schedules, after `warmup_steps` of linear warmup
    (linear decays to 0, cosine to min_lr_ratio × lr)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables."""


@dataclass(kw_only=True)
class TrainConfig:
    micro_batch_size: int = 4
    """Pairs per policy rank per forward."""
    grad_accum: int = 1
    train_batch_size: int | None = None
    """Pairs per optimiser step; if set, must equal micro_batch_size × grad_accum × policy ranks."""
    epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimiser steps (default: the epochs' worth)."""
    seed: int = 0
    precision: str = "fp32"
    """fp32 | bf16 (fp16 is not supported on CPU)."""


@dataclass(kw_only=True)
class DeepSpeedSection:
    stage_file: str = "zero3.json"
    """File under ds_configs/ (or a path) with the ZeRO settings; batch, optimiser and precision
    entries are filled from this config."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a sharded checkpoint every N optimiser steps (0: only at the end)."""
    keep_last: int = 2
    resume: str | None = None
    """None | auto (latest valid checkpoint in the run directory) | a checkpoint path."""


@dataclass(kw_only=True)
class LoggingConfig:
    output_dir: str = "runs/demo/run"
    """Run directory: resolved config, TensorBoard events, checkpoints, final model."""
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    overwrite: bool = False
    """Allow training into a run directory that already holds a finished run."""


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


_CHOICES = {
    ("data", "format"): ("auto", "jsonl", "json", "parquet", "csv", "disk", "hub"),
    ("data", "truncation"): ("prompt_first", "response_only", "error"),
    ("data", "on_bad_row"): ("error", "skip"),
    ("reference", "mode"): ("cache", "live", "precompute", "inline"),
    ("topology", "placement"): ("last", "interleaved"),
    ("optim", "schedule"): ("constant", "linear", "cosine"),
    ("train", "precision"): ("fp32", "bf16"),
    ("generation", "params"): PARAM_PATHS,
}


# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> RunConfig, with refusals that name key, source and fix.

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
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(
            f"'{key}' in {source} must be {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


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

    raw = dict(raw)
    name = raw.pop("name", "dpo")
    source = sources.get("method.name", sources.get("method", "<defaults>"))
    if name not in METHODS:
        raise ConfigError(
            f"unknown method '{name}' ('method.name' in {source}).{_nearest(str(name), METHODS)} "
            f"Valid methods: {', '.join(METHODS)}"
        )
    params = _build(METHODS[name].params_cls, raw, "method", sources)
    return MethodConfig(name=name, params=params)


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
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        sources[key] = f"command-line override '{text}'"
        sources.setdefault(key.partition(".")[0], sources[key])  # a section only the override names
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
    validate(cfg, source=source)
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


def validate(cfg: RunConfig, *, source: str = "<config>") -> None:
    """Refuse combinations that cannot run, naming the keys and the fix."""
    from sparsepo.losses import get_method

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
            raise ConfigError(f"{key}={value} in {source} must be >= 1")
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} in {source} must be >= 1 (or null for whole epochs)")
    if not 0.0 <= d.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction={d.max_skip_fraction} in {source} must be in [0, 1]")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} in {source} must be > 0")
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
    if spec.needs_policy_samples and (problem := check_generation(cfg.generation)):
        raise ConfigError(f"{problem} ({source})")
    if spec.needs_oracle_scores:
        what = "token scores from a DPO-trained oracle pair"
        raise ConfigError(
            f"method '{spec.name}' ({source}) needs {what}; the trainer cannot produce these yet (its loss is in "
            f"sparsepo.losses and tested). Train with dpo, ipo, simpo, tdpo1, tdpo2 or fpo.")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last} in {source} must be >= 1")


def check_batch_size(cfg: RunConfig, dp_size: int) -> int:
    """train_batch = micro x accumulation x data-parallel size; returns it, refusing a mismatch."""
    t = cfg.train
    product = t.micro_batch_size * t.grad_accum * dp_size
    if t.train_batch_size is not None and t.train_batch_size != product:
        raise ConfigError(
            f"train.train_batch_size={t.train_batch_size} but train.micro_batch_size={t.micro_batch_size} "
            f"x train.grad_accum={t.grad_accum} x {dp_size} policy ranks = {product}. Set "
            f"train.train_batch_size={product}, or change grad_accum to "
            f"{t.train_batch_size / (t.micro_batch_size * dp_size):g}."
        )
    return product


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


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON: the stage file under ds_configs/ plus everything this config decides.

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{path}.{k}" if path else k)
            if found:
                return found
    elif isinstance(node, str) and node.strip().lower() == "auto":
        return path
    return None


def load_stage_file(name: str) -> tuple[dict, Path]:
    path = Path(name)
    if not path.is_file():
        path = DS_CONFIG_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(
            f"deepspeed.stage_file '{name}' not found (looked in the working directory and {DS_CONFIG_DIR}). "
            f"Available: {', '.join(available)}"
        )
    try:
        stage = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    auto = _find_auto(stage)
    if auto:
        raise ConfigError(
            f"{path}: '{auto}' is \"auto\"; plain DeepSpeed silently drops \"auto\" values. "
            f"Give a number, or remove the key so sparsepo fills it from the run config."
        )
    return stage, path


def build_deepspeed_config(cfg: RunConfig, *, dp_size: int) -> dict:
    """The JSON handed to deepspeed.initialize for the policy engine. The LR schedule is not in it:
    the engine gets a transformers schedule object (see lr_schedule), which DeepSpeed checkpoints."""
    stage, _ = load_stage_file(cfg.deepspeed.stage_file)
    o, t = cfg.optim, cfg.train
    ds = dict(stage)
    ds.update({
        "train_batch_size": check_batch_size(cfg, dp_size),
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    return ds


def lr_schedule(cfg: RunConfig, total_steps: int) -> tuple[str, dict]:
    """(transformers scheduler name, kwargs) for `transformers.get_scheduler`."""
    o = cfg.optim
    kwargs = {"num_warmup_steps": o.warmup_steps, "num_training_steps": total_steps}
    if o.schedule == "constant":
        return "constant_with_warmup", kwargs
    if o.schedule == "linear":
        return "linear", kwargs
    return "cosine_with_min_lr", {**kwargs, "scheduler_specific_kwargs": {"min_lr_rate": o.min_lr_ratio}}
