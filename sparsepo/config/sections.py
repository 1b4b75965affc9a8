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
    attn_implementation: str = "auto"
    """Attention kernel of the policy and every reference model: auto (transformers' own choice for the
    family: sdpa where the family supports it — flash/memory-efficient kernels on CUDA —, else eager, e.g.
    Gemma 2's soft-capped attention), sdpa, flash_attention_2 (needs the flash-attn package and a CUDA
    device; refused otherwise) or eager (the plain matmul path)."""
    logits_chunk: int = 128
    """Lean log-probs (`sparsepo.logprobs`): the policy forward and every reference path (inline,
    precompute, the live pipeline's last stage, SePO's oracle) run the LM head on this many response
    positions at a time from the last hidden state, never holding (2B,T,V) float32 logits; 0 = the
    plain path (full logits). Families the lean path does not know use the plain path. Numerically
    the same (tests/test_logprobs.py); all chunks run inside one call of the head module, so under
    ZeRO-3 ranks with different response lengths make the same gathers (tests/test_lean_zero3.py).
    128: the lowest measured step peak at vocab 128k (2,034 -> 508 MB at T=256; 8.1 GB -> 0.6 GB at
    T=1024) and no slower at the demo's vocabulary (docs/benchmarks.md, "Lean log-probs")."""
    router_aux_loss_coef: float = 0.0
    """Mixture-of-experts policies (Mixtral, Qwen2/3-MoE, ...): add this times the router's load-balancing
    loss (the model's own `aux_loss`, `output_router_logits=True`, over the batch's real tokens) to the
    policy loss, as TRL does with the model config's router_aux_loss_coef; 0 = off. Needs an MoE model;
    its policy forward takes the plain log-prob path. Logged as train/router_aux_loss."""


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
    eos_at_cut: bool = False
    """A response cut to fit ends in eos all the same: its last kept token is overwritten with eos, as
    SePO's authors' code does (cut, then the last token set to eos; issue 24's review), so SePO can still
    select a cut response's end. False (default, TRL's way): a cut response has no eos."""
    on_bad_row: str = "error"
    """error: refuse the dataset at the first bad row; skip: skip it and report it in the run directory."""
    max_skip_fraction: float = 0.01
    """With on_bad_row=skip, refuse to start when more than this fraction of rows is bad."""
    num_proc: int = 1
    """Processes for tokenisation (datasets.map)."""
    cache_dir: str | None = None
    """Where `datasets` keeps its Arrow/tokenisation cache; default: its own (~/.cache/huggingface)."""
    chat_template: str | None = None
    """A Jinja chat template for conversational pairs, replacing the tokenizer's: a file (.jinja, or any
    existing path) or the template itself; null: the tokenizer's own."""


@dataclass(kw_only=True)
class MethodConfig:
    name: str | list[str] = "dpo"
    """A row of the loss table (`sparsepo.losses.METHODS`; docs/methods.md), or a list of rows whose
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
    sync_alpha: float | None = None
    """TR-DPO (arXiv 2404.09656): every sync_steps optimiser steps the reference moves towards the
    policy, θ_ref ← α·θ + (1 − α)·θ_ref; 1 is the hard update (θ_ref ← θ), null (default) a frozen
    reference. Inline mode, or live mode, where the policy streams the moved reference to the group's
    stages (`sparsepo.follow`, `reference_role.follow_live`); a cache refuses it. TRL's
    ref_model_mixup_alpha (its default 0.6)."""
    sync_steps: int = 512
    """TR-DPO's τ: optimiser steps between reference updates (TRL's ref_model_sync_steps, default 512)."""


@dataclass(kw_only=True)
class TopologyConfig:
    reference_ranks: int = 0
    """Ranks given to the reference group in live mode (0 in cache mode)."""
    pipeline_stages: int = 1
    """Pipeline stages of the reference model; reference_ranks / pipeline_stages replicas."""
    placement: str = "last"
    """last: reference ranks are the highest global ranks (e.g. the last nodes); interleaved:
    spread evenly among the policy ranks."""
    device_map: str | None = None
    """Live mode: the GPU index of each local rank on a node, comma-separated ("0,0": policy and
    reference on GPU 0 of a one-GPU workstation; "0,1,1": a policy on GPU 0, a 2-stage reference on
    GPU 1). Default: GPU = LOCAL_RANK. A world whose processes share a GPU runs gloo, else NCCL."""


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
    warmup_ratio: float = 0.0
    """Instead of warmup_steps: warm up over ceil(warmup_ratio × total steps) (TRL's / transformers'
    `warmup_ratio`); set one of the two."""
    schedule: str = "cosine"
    """constant | linear | cosine: transformers' schedules, after `warmup_steps` of linear warmup
    (linear decays to 0, cosine to min_lr_ratio × lr)."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    """Gradient-norm clipping; 0 disables."""
    implementation: str = "auto"
    """AdamW kernel: auto (torch_fused; torch with ZeRO-Offload), torch (torch.optim.AdamW's
    per-tensor loop), torch_fused (torch.optim.AdamW(fused=True): one kernel, CPU and CUDA; ~10x
    faster on one CPU thread) or deepspeed_fused (DeepSpeed's FusedAdam: CUDA only, JIT-compiled on
    first use, needs nvcc)."""


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
    """fp32 | bf16 | fp16. fp16 runs on CUDA only (DeepSpeed's dynamic loss scaling; refused on CPU,
    whose kernels lack half-precision matmuls and DeepSpeed's CPU accelerator has no fp16 support)."""
    peer_timeout_s: float = 300.0
    """Several policy ranks outside live mode: a rank silent this long (stopped, hung or dead) makes the
    others leave with exit 1, the first error line naming it (sparsepo.liveness, on the job's own
    store). Live mode watches both roles with reference.timeout_s."""
    max_nonfinite_steps: int = 2
    """Fail the run (exit 1, no final/ published, the last good checkpoint kept) once more optimiser
    steps than this had a non-finite loss or gradient norm or were skipped by DeepSpeed's overflow
    check (counted since the start; the checkpoint carries DeepSpeed's skip count). A non-finite
    weight fails the run at once (sparsepo.guard)."""


@dataclass(kw_only=True)
class DeepSpeedSection:
    stage_file: str = "zero3.json"
    """File under ds_configs/ (or a path) with the ZeRO settings; batch, optimiser and precision
    entries are filled from this config."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a sharded checkpoint every N optimiser steps (0: only at the end)."""
    at_end: bool = True
    """Save a sharded checkpoint after the last step (fp32 master weights + Adam moments: ~12-16
    bytes per parameter, ~15 GB at 0.94 B). Benchmarks set false; the final model is written either way."""
    keep_last: int = 2
    async_write: bool = False
    """Write checkpoints in the background (DeepSpeed's decoupled checkpoint engine: a writer process per
    rank) while the next step's forward and backward run; the checkpoint is sealed (sha256s,
    sparsepo.json, `latest`) after that step, when DeepSpeed has committed it. The checkpoint at the
    last step and at a preemption is waited for. Costs host memory for the state in flight."""
    resume: str | None = None
    """None | auto (latest valid checkpoint in the run directory) | a checkpoint path."""


@dataclass(kw_only=True)
class LoggingConfig:
    output_dir: str = "runs/demo/run"
    """Run directory: resolved config, TensorBoard events, checkpoints, final model."""
    log_every: int = 10
    """Log step (the first, every N-th, the last): the loss and every other device-side metric and the
    grad norm are read back (a host sync each) and written only then; step time, reference wait,
    tokens/s and lr go to TensorBoard every step. 1: everything every step (the tests, benchmarks)."""
    tensorboard: bool = True
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides the log line and <run>/metrics.jsonl: any of tensorboard, wandb, mlflow
    (WANDB_MODE=offline without a network), or none (TRL's report_to="none"; [] says the same).
    TensorBoard also needs logging.tensorboard=true."""
    progress: bool = True
    overwrite: bool = False
    """Allow training into a run directory that already holds a finished run."""


@dataclass(kw_only=True)
class EvalConfig:
    path: str | None = None
    """Held-out preference pairs, any shape and format `data.path` takes (read with data.format when
    it is not auto, data.split, data.max_length, ...); or null."""
    split: str | None = None
    """Instead of `path`: this split of data.path (a save_to_disk DatasetDict, or a Hub dataset in the
    local cache), e.g. "test" beside data.split "train" (TRL's eval_dataset=ds["test"])."""
    fraction: float = 0.0
    """Instead of `path` / `split`: hold out this fraction of the training pairs (at least one pair), drawn
    with train.seed; the model never trains on them. 0: no held-out split."""
    every_steps: int = 0
    """Evaluate after every N optimiser steps (0: only after the last step); with none of path, split
    and fraction set, no evaluation."""
    batch_size: int = 8
    """Pairs per rank per eval forward."""


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


_CHOICES = {
    ("data", "format"): ("auto", "jsonl", "json", "parquet", "csv", "disk", "hub"),
    ("data", "truncation"): ("prompt_first", "response_only", "error"),
    ("data", "on_bad_row"): ("error", "skip"),
    ("reference", "mode"): ("cache", "live", "precompute", "inline"),
    ("topology", "placement"): ("last", "interleaved"),
    ("optim", "schedule"): ("constant", "linear", "cosine"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
    ("model", "attn_implementation"): ("auto", "sdpa", "flash_attention_2", "eager"),
    ("optim", "implementation"): ("auto", "torch", "torch_fused", "deepspeed_fused"),
    ("generation", "params"): PARAM_PATHS,
}
