"""The run configuration's sections: one typed dataclass per YAML section, each field documented
(`sparsepo config keys` prints these docstrings), and the closed choices of the string keys."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparsepo.config.generation import PARAM_PATHS, GenerationConfig
from sparsepo.config.lora import LoraConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key, the source and the fix."""


@dataclass(kw_only=True)
class ModelConfig:
    path: str = "runs/demo/world/sft"
    """Local Hugging Face model directory: the starting policy (sparsepo never downloads)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `path`."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    logits_chunk: int = 128
    """Lean log-probs (`sparsepo.logprobs`): the policy forward and every reference path (inline,
    precompute, the live pipeline's last stage, SePO's oracle) run the LM head on this many response
    positions at a time from the last hidden state, never holding (2B,T,V) float32 logits; 0 = the
    plain path (full logits). Families the lean path does not know use the plain path. Numerically
    the same (tests/test_logprobs.py); all chunks run inside one call of the head module, so under
    ZeRO-3 ranks with different response lengths make the same gathers (tests/test_lean_zero3.py).
    128: the lowest measured step peak at vocab 128k (2,034 -> 508 MB at T=256; 8.1 GB -> 0.6 GB at
    T=1024) and no slower at the demo's vocabulary (docs/benchmarks.md, "Lean log-probs")."""


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
    name: str | list[str] = "dpo"
    """A row of the loss table (`sparsepo.losses.METHODS`; README "Methods"), or a list of rows whose
    losses are summed with `method.weights` (e.g. [dpo, sft] with weights [1.0, 0.1])."""
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
    oracle: str | None = None
    """SePO: the oracle directory written by `sparsepo sepo train-oracle` (its oracle.json names the
    DPO-trained oracle and the oracle's reference; their token rewards select the trained tokens)."""


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
    lora: LoraConfig = field(default_factory=LoraConfig)


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
