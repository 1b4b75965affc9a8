"""`sparsepo.train` with the peak CUDA memory of each process written out before it exits.

    GPU_BENCH_MEM=runs/gpu-bench/mem torchrun --nproc_per_node 4 benchmarks/gpu_entry.py --config run.yaml ...

Used by benchmarks/gpu_bench.sh (peak memory per role). Writes $GPU_BENCH_MEM/rank<R>.json with the
launch's global rank (captured before sparsepo rewrites RANK for its role's own world), the physical
LOCAL_RANK, and torch.cuda.max_memory_allocated / max_memory_reserved in MiB. sparsepo exits through
`sparsepo.engine.dist.shutdown` (which ends in os._exit), so the record is written from there.
"""

import json
import os
from pathlib import Path

GLOBAL_RANK = int(os.environ.get("RANK", "0"))


def main() -> None:
    import torch

    import sparsepo.engine.dist as dist_mod
    import sparsepo.train as train_mod

    shutdown = dist_mod.shutdown

    def record_then_shutdown(code):
        out = Path(os.environ.get("GPU_BENCH_MEM", "."))
        out.mkdir(parents=True, exist_ok=True)
        rec = {"global_rank": GLOBAL_RANK, "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "exit": code}
        if torch.cuda.is_available():
            rec.update(max_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                       max_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
        (out / f"rank{GLOBAL_RANK}.json").write_text(json.dumps(rec))
        shutdown(code)

    dist_mod.shutdown = record_then_shutdown  # sparsepo.train.main imports it by name when it runs
    train_mod.main()


if __name__ == "__main__":
    main()
