"""The policy's DeepSpeed engine: the only module in sparsepo that imports deepspeed.

It owns process-group start-up and clean shutdown, the ZeRO-3 policy engine (built under
`zero.Init` so no rank ever holds the whole model), backward/step, sharded checkpoints and
gathering the policy back into a Hugging Face directory. The trainer calls these functions and
never touches deepspeed itself.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # Must be set before deepspeed is imported: it picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from sparsepo.cli import free_port  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _mpi_env_to_torch() -> None:
    """Under mpirun, derive torch.distributed's variables from Open MPI's (FIELD_NOTES: DeepSpeed's own
    MPI discovery takes MASTER_ADDR from `hostname -I`, which is not loopback here)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" not in os.environ:
        return
    os.environ["RANK"] = os.environ["OMPI_COMM_WORLD_RANK"]
    os.environ["WORLD_SIZE"] = os.environ["OMPI_COMM_WORLD_SIZE"]
    os.environ["LOCAL_RANK"] = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")


_SHM_BUFFER: Path | None = None


def init_distributed(timeout_s: float = 1800.0) -> DistContext:
    """Start (or join) the torch.distributed world: gloo on CPU, NCCL on GPUs. A plain `python`
    run becomes a world of one, so every code path is the distributed one."""
    _mpi_env_to_torch()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    if not dist.is_initialized():
        import datetime

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    global _SHM_BUFFER
    if not torch.cuda.is_available() and dist.get_world_size() > 1:
        # deepspeed_shm_comm's all-reduce buffer (shm.cpp: <prefix>_<uid>_<addr>_<port>_<rank>): never unlinked
        _SHM_BUFFER = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                                          f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device)


def shutdown(code: int = 0) -> None:
    """Leave without the gloo exit crash (FIELD_NOTES): barrier, destroy the group, finalise MPI,
    flush, and `os._exit` so no gloo worker thread is torn down by the interpreter."""
    try:
        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    except Exception as e:  # a dead peer must not turn a clean exit into a hang
        log.warning("process group shutdown: %s", e)
    if _SHM_BUFFER is not None:  # 66 MB of /dev/shm per rank per run otherwise (peers keep their mapping)
        _SHM_BUFFER.unlink(missing_ok=True)
    if "mpi4py" in sys.modules and code == 0:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_policy(model_path: str, ds_config: dict, *, schedule: tuple[str, dict], precision: str = "fp32",
                 gradient_checkpointing: bool = False) -> Any:
    """The trainable policy as a DeepSpeed engine. With ZeRO-3 the weights are loaded straight into
    partitions (transformers' `HfDeepSpeedConfig` turns on `zero.Init` inside from_pretrained)."""
    from transformers import AutoModelForCausalLM, get_scheduler
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must live while the model is built)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_dtype(precision))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    name, kwargs = schedule
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad],
                                      config=ds_config,
                                      lr_scheduler=lambda optimizer: get_scheduler(name, optimizer, **kwargs))
    return engine


def local_parameter_count(engine: Any) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model): under ZeRO-3 the first is ~1/N."""
    local = full = 0
    for p in engine.module.parameters():
        full += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local, full


def gather_params(module: torch.nn.Module, params: list[torch.nn.Parameter] | None = None):
    """Context manager that gathers ZeRO-3 partitioned parameters (read-only) on every rank."""
    params = list(module.parameters()) if params is None else params
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_hf_model(engine: Any, tokenizer: Any, out_dir: str | Path, *, is_main: bool) -> None:
    """Gather the ZeRO-3 shards into one state dict and write a Hugging Face model directory on rank 0."""
    state = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_partition_weights() \
        else engine.module.state_dict()
    if is_main:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    dist.barrier()


def save_checkpoint(engine: Any, ckpt_root: str | Path, tag: str, client_state: dict) -> None:
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine: Any, ckpt_root: str | Path, tag: str, *, universal: bool = False) -> dict:
    # deepspeed 0.19.8 reads this flag at load time, so setting it after initialize works; reset it after.
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = previous
    if client_state is None:
        raise RuntimeError(f"checkpoint {Path(ckpt_root) / tag} could not be loaded by DeepSpeed")
    return client_state


def fp32_state_dict_from_checkpoint(ckpt_root: str | Path, tag: str) -> dict:
    """Consolidate a ZeRO checkpoint's shards into one fp32 state dict (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
