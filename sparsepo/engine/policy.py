"""`PolicyEngine`: the trainable policy as a DeepSpeed ZeRO-3 engine, and everything done to it.

The trainer and the checkpoint module talk to this object only (OpenRLHF's strategy object is the
model): forward, backward, step, learning rate, gradient norm, sharded save/load, and gathering the
shards back into a Hugging Face directory. The model is built under `zero.Init` (transformers'
`HfDeepSpeedConfig`), so no rank ever holds the whole policy.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparsepo.config.device import attention_kwargs, precision_dtype
from sparsepo.engine.dist import children_die_with_rank, deepspeed, stop_at_shutdown

log = logging.getLogger(__name__)


def import_muon_eagerly() -> None:
    """Import DeepSpeed's Muon optimizer module with ``deepspeed.runtime.compiler.compile`` a no-op.

    ``deepspeed.initialize`` imports it under ZeRO (to list Muon among ZeRO's optimizers) whatever
    the optimizer, and the module decorates a kernel with ``torch.compile`` at import time, which
    loads torch._dynamo's backends, torch._inductor, functorch, sympy and networkx: ~50 MB of RSS
    for nothing (measured: 49 MiB of a 210k-parameter run's 600). Muon, if someone configures it,
    then runs that kernel eagerly (same numbers). A DeepSpeed without the module: nothing to do."""
    import sys

    name = "deepspeed.runtime.zero.muon.muon_optimizer"
    if name in sys.modules:
        return
    try:
        from deepspeed.runtime import compiler
    except ImportError:
        return
    compile_fn = compiler.compile
    compiler.compile = lambda *a, **k: (lambda fn: fn)
    try:
        __import__(name)
    except ImportError:
        pass
    finally:
        compiler.compile = compile_fn


NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
"""Parameter names the Hugging Face Trainer (so TRL) never decays: ``Trainer.get_decay_parameter_names``'
patterns (transformers 5), applied with its own ``trainer_pt_utils.get_parameter_names``."""


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """The trainable parameters as the optimiser receives them. With ``weight_decay`` > 0 two groups, as
    the HF Trainer makes them: biases and the weights of norm layers (``nn.LayerNorm`` instances and any
    name matching ``NO_DECAY_PATTERNS``: RMSNorm's ``input_layernorm``, ``model.norm``) at 0, the rest
    at ``weight_decay``; with 0 one plain list (the layout of every checkpoint written before)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if weight_decay <= 0:
        return [p for _, p in trainable]
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    return [{"params": [p for name, p in trainable if name in decay], "weight_decay": weight_decay},
            {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0}]


def _dtype(precision: str) -> torch.dtype:
    return precision_dtype(precision)


class PolicyEngine:
    """Wraps a `deepspeed.DeepSpeedEngine`; calling it runs the policy's forward."""

    def __init__(self, engine: Any, *, peft_model: Any = None, lora: Any = None, base_path: str = ""):
        """`peft_model`: the PeftModel around `engine.module` when LoRA is on (`sparsepo.lora`), else None."""
        self._engine, self.peft_model, self.lora, self.base_path = engine, peft_model, lora, base_path
        self._group_decay = [g.get("weight_decay", 0.0) for g in getattr(self._inner_optimizer(), "param_groups", [])]

    @classmethod
    def build(cls, model_path: str, ds_config: dict, *, schedule: tuple[str, dict], precision: str = "fp32",
              gradient_checkpointing: bool = False, attn_implementation: str = "auto",
              lora: Any = None) -> "PolicyEngine":
        """With ZeRO-3 the weights are loaded straight into partitions; `schedule` = (transformers
        scheduler name, its kwargs), handed to DeepSpeed so it is checkpointed with the engine.
        `lora` (the config's `lora:` section) with r > 0: peft adapters on a frozen base; DeepSpeed
        wraps the HF model with the adapters injected (`sparsepo.lora`), only they reach the optimiser."""
        from sparsepo import lora as lora_mod
        from sparsepo.lean_imports import bitsandbytes_offline, transformers_without_peft

        transformers_without_peft()  # without LoRA nothing imports peft (nor bitsandbytes through it)
        if lora_mod.enabled(lora):  # before sparsepo.lora imports peft
            bitsandbytes_offline(eager=not lora.load_in_4bit)
        from transformers import AutoModelForCausalLM, get_scheduler
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must live while the model is built)
        quant = lora_mod.quantization_config(lora, precision)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_dtype(precision),
                                                     **attention_kwargs(attn_implementation),
                                                     **({"quantization_config": quant} if quant else {}))
        if quant:
            lora_mod.portable_4bit(model)
            log.info("QLoRA: the base in 4-bit NF4 (bitsandbytes %s, double quantisation, %s compute): %d linear "
                     "layers", lora_mod.import_bitsandbytes().__version__, precision, lora_mod.count_4bit(model))
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        peft_model = None
        if lora_mod.enabled(lora):
            peft_model = lora_mod.wrap(model, lora, gradient_checkpointing=gradient_checkpointing)
            model = peft_model.get_base_model()
            trainable, total = lora_mod.parameter_counts(model)
            log.info("LoRA r=%d alpha=%g: %d trainable of %d parameters (%.3f%%)", lora.r, lora.alpha, trainable,
                     total, 100.0 * trainable / max(total, 1))
        name, kwargs = schedule
        import_muon_eagerly()
        if (ds_config.get("checkpoint") or {}).get("writer"):  # checkpoint.async_write: a writer process
            children_die_with_rank()
        decay = ds_config.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, decay),
                                          config=ds_config,
                                          lr_scheduler=lambda optimizer: get_scheduler(name, optimizer, **kwargs))
        writer = getattr(engine.checkpoint_engine, "ckpt_process", None)  # checkpoint.async_write's process
        if writer is not None:
            stop_at_shutdown(writer)
        return cls(engine, peft_model=peft_model, lora=lora if peft_model is not None else None,
                   base_path=model_path)

    # --- the training step ---
    @property
    def module(self) -> torch.nn.Module:
        """The Hugging Face model inside the engine (its parameters are ZeRO-3 partitions)."""
        return self._engine.module

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def step(self) -> None:
        """DeepSpeed counts micro-steps: the optimiser steps at the accumulation boundary only."""
        self._engine.step()

    def lr(self) -> float:
        return float(self._engine.get_lr()[0])

    def apply_schedule(self) -> None:
        """Set the rate to the LR schedule's value at its current step. After a resume with another run
        length the optimiser holds the rate the old length's curve gave (0 at the end of a decay); the
        restored scheduler's lambdas are this run's, so recompute from them (transformers' LambdaLR)."""
        sched = self._engine.lr_scheduler
        rates = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, rate in zip(sched.optimizer.param_groups, rates):
            group["lr"] = rate
        sched._last_lr = rates

    def grad_norm(self) -> float:
        """The global gradient norm of the last optimiser step (0.0 before the first)."""
        return float(self._engine.get_global_grad_norm() or 0.0)

    def skipped_steps(self) -> int:
        """Optimiser steps DeepSpeed skipped on an overflow (non-finite gradients), fp32 and bf16 alike;
        restored from a checkpoint on resume."""
        return int(getattr(self._engine, "skipped_steps", 0))

    @torch.no_grad()
    def nonfinite_weights(self) -> int:
        """Non-finite elements among the trained weights this rank holds (its ZeRO-3 partitions). Frozen
        ones are skipped: training cannot change them, and a QLoRA base's 4-bit codes are stored in bf16
        tensors whose bytes read as NaN here and there. Local: sum it over the ranks for the verdict
        (sparsepo.guard)."""
        return sum(int((~torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p)).sum())
                   for p in self.module.parameters() if p.requires_grad)

    def parameter_counts(self) -> tuple[int, int]:
        """(elements this rank holds, elements of the full model): under ZeRO-3 the first is ~1/N."""
        local = full = 0
        for p in self.module.parameters():
            full += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return local, full

    def reference_view(self):
        """LoRA: this policy with its adapters switched off (`lora.AdaptersOff`), the inline reference
        without a second copy of the base. Collective under ZeRO-3, like any forward. None without LoRA."""
        from sparsepo.lora import AdaptersOff

        return AdaptersOff(self.peft_model, self.module) if self.peft_model is not None else None

    # --- generation (SPO's samples) ---
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 processor, pad_token_id: int, eos_token_id: int, params: str = "gathered") -> tuple[torch.Tensor, str]:
        """Decode on every policy rank (collective under ZeRO-3: every rank must call it). `processor`
        (e.g. `generation.KeyedSampler`) does the sampling inside a greedy decode. Returns
        (ids (N, P + new), the path that ran: "gathered", "synced" or "local" without ZeRO-3).

        params="gathered": the whole model is gathered once (GatheredParameters) and ZeRO-3's
        per-module fetch/release hooks are lifted for the round, so decoding makes no collective
        call and ranks may stop at different lengths (TRL's unwrap_model_for_generation).
        params="synced": shards stay put; each forward gathers layer by layer and transformers'
        synced_gpus keeps every rank stepping until all ranks are done."""
        from transformers import GenerationConfig, LogitsProcessorList

        module = self.module
        zero3 = self._engine.zero_optimization_partition_weights()
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id,
                                  eos_token_id=eos_token_id, use_cache=True)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                      logits_processor=LogitsProcessorList([processor]))
        was_training = module.training
        module.eval()
        try:
            if not zero3:
                return module.generate(**kwargs), "local"
            if params == "gathered" and not hasattr(getattr(self._engine, "optimizer", None), "parameter_offload"):
                log.warning("generation.params=gathered needs ZeRO-3's parameter offload object (an engine with an "
                            "optimizer); decoding with synced_gpus instead")
                params = "synced"
            if params == "synced":
                return module.generate(**kwargs, synced_gpus=dist.get_world_size() > 1), "synced"
            with deepspeed.zero.GatheredParameters(list(module.parameters())), self._zero3_hooks_lifted():
                return module.generate(**kwargs), "gathered"
        finally:
            module.train(was_training)

    # --- TR-DPO: a reference that follows the policy ---
    def gathered_parameters(self):
        """(name, full tensor) for every parameter, in `named_parameters` order (tied ones once), each
        gathered on its own under ZeRO-3, so at most one full parameter is held beyond the shards.
        Collective under ZeRO-3: every rank must walk the whole generator."""
        zero3 = self._engine.zero_optimization_partition_weights()
        for name, p in self.module.named_parameters():
            if not zero3:
                yield name, p.data
                continue
            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.data

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> full shape of every parameter (tied ones once), without gathering anything."""
        return {name: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
                for name, p in self.module.named_parameters()}

    def tied_names(self) -> dict[str, str]:
        """name -> the name `named_parameters` reports it under, for every parameter that is another's
        alias (a tied head: lm_head.weight -> model.embed_tokens.weight)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        return aliases

    @torch.no_grad()
    def mix_into(self, target: torch.nn.Module, alpha: float) -> int:
        """target ← α·policy + (1 − α)·target, parameter by parameter (`reference.follow.mix_named`).
        Collective under ZeRO-3 (every rank must call it). Returns the number of parameters mixed."""
        from sparsepo.follow import mix_named

        return mix_named(target, self.gathered_parameters(), alpha)

    @contextmanager
    def _zero3_hooks_lifted(self):
        """ZeRO-3's module hooks off for the body (parameters must already be gathered), then re-registered."""
        offload = self._engine.optimizer.parameter_offload
        for p in offload.module.parameters():
            p.ds_active_sub_modules.clear()
        for hook in (*offload.forward_hooks, *offload.backward_hooks):
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)

    # --- persistence ---
    def save(self, ckpt_root: str | Path, tag: str, client_state: dict) -> None:
        # LoRA: the frozen base is the model directory's; only the adapters and their optimiser state are saved
        self._engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False,
                                     exclude_frozen_parameters=self.peft_model is not None)

    def commit_checkpoint(self) -> None:
        """Wait until the last `save` is on disk. DeepSpeed's decoupled engine (checkpoint.async_write)
        commits by itself at the next optimiser step's boundary; this commits now (a no-op otherwise)."""
        if self._engine.checkpoint_engine.is_decoupled():
            self._engine._commit_decoupled_checkpoint()

    def load(self, ckpt_root: str | Path, tag: str, *, universal: bool = False) -> dict:
        """Engine, optimiser and LR-scheduler state; returns the client state saved with it."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        # deepspeed 0.19.8 reads this flag at load time, so setting it after initialize works; reset it after.
        previous = self._engine._config.load_universal_checkpoint
        self._engine._config.load_universal_checkpoint = universal
        # the decoupled writer (checkpoint.async_write) loads with torch's weights_only default, which refuses
        # DeepSpeed's own files (ZeroStageEnum); the files are the same, so read them as the default engine does
        writer = self._engine.checkpoint_engine
        if writer.is_decoupled():
            self._engine.checkpoint_engine = TorchCheckpointEngine(self._engine._config)
        try:
            _, client_state = self._engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True,
                                                           load_module_strict=self.peft_model is None)
        finally:
            self._engine._config.load_universal_checkpoint = previous
            self._engine.checkpoint_engine = writer
        if client_state is None:
            raise RuntimeError(f"checkpoint {Path(ckpt_root) / tag} could not be loaded by DeepSpeed")
        if universal:
            self._mend_universal_load()
        return client_state

    def _mend_universal_load(self) -> None:
        """Two faults of DeepSpeed 0.19's ZeRO-3 universal-checkpoint load that show only with several
        optimiser groups (``parameter_groups`` with weight decay), each measured as a resumed run leaving
        the uninterrupted curve (1e-3 in the loss 4 steps after a 1 -> 2 rank resume): it gives every group
        the first group's hyper-parameters, so the no-decay group came back decayed (each group's weight
        decay is put back as ``build`` made it); and it hands every group's state the same ``step`` tensor,
        which torch's fused AdamW increments in place once per group, so the bias correction ran ahead
        (each state gets its own copy)."""
        inner = self._inner_optimizer()
        for group, decay in zip(inner.param_groups, self._group_decay, strict=True):
            group["weight_decay"] = decay
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def _inner_optimizer(self):
        """The torch optimiser inside DeepSpeed's ZeRO wrapper (whose param_groups hold the hyper-parameters)."""
        opt = getattr(self._engine, "optimizer", None)
        return getattr(opt, "optimizer", opt)

    def save_hf(self, tokenizer: Any, out_dir: str | Path, *, is_main: bool) -> None:
        """Gather the ZeRO-3 shards into one state dict and write a Hugging Face model directory on rank 0.
        LoRA: only the adapters are gathered; the directory holds the base with them merged (a plain HF
        model) and, in adapter/, the PEFT adapter directory."""
        engine = self._engine
        lora = self.peft_model is not None
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora) \
            if engine.zero_optimization_partition_weights() else engine.module.state_dict()
        if is_main and lora:
            from sparsepo.lora import save_merged

            save_merged(self.base_path, self.lora, state, out_dir, tokenizer=tokenizer,
                        dtype=next(engine.module.parameters()).dtype)
        elif is_main:
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
        dist.barrier()


def fp32_state_dict_from_checkpoint(ckpt_root: str | Path, tag: str, *, exclude_frozen_parameters: bool = False) -> dict:
    """Consolidate a ZeRO checkpoint's shards into one fp32 state dict (DeepSpeed's zero_to_fp32);
    `exclude_frozen_parameters`: the trained parameters only (a LoRA checkpoint holds no others)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag,
                                                    exclude_frozen_parameters=exclude_frozen_parameters)
