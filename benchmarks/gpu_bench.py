"""sparsepo (cache, inline, live) against TRL's DPOTrainer (precompute_ref_log_probs, inline) on the
GPU issue's workload; writes docs/gpu_bench.json and the table in docs/benchmarks.md.

    benchmarks/gpu_bench.sh                                   # the usual entry (GPU checks, wheels)
    python benchmarks/gpu_bench.py --preset issue19 --out runs/gpu-bench
    python benchmarks/gpu_bench.py --preset tiny --out /tmp/gb --json /tmp/gb/gpu_bench.json --md none  # CPU smoke

Every run is its own process (torchrun for sparsepo, through benchmarks/gpu_entry.py, which records
each process's peak CUDA memory). Settings on both sides: the workload's model and pairs
(benchmarks/workload.py), AdamW lr 1e-5 constant, clip 1.0, no warm-up, `precision` (bf16 on GPU:
sparsepo's DeepSpeed bf16, TRL's bf16=True autocast), sdpa attention, no gradient checkpointing, no
checkpoint written. sparsepo's stage file: one_gpu.json with one policy process, zero3.json with
more. Step time: sparsepo's train/step_time (log_every=1: the step ends in a device read-back);
TRL's from on_step_begin to on_step_end after a torch.cuda.synchronize(). Median of steps skip+1..N.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_report as rep  # noqa: E402
from workload import PRESETS, Workload, build, preset, sparsepo_overrides  # noqa: E402


def version(pkg: str, python: str | None = None) -> str | None:
    if python and python != sys.executable:
        got = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{pkg}'))"],
                             capture_output=True, text=True)
        return got.stdout.strip() or None if got.returncode == 0 else None
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def matmul_peak(cuda: bool) -> tuple[float, str]:
    """FLOP/s of a large square matmul on this device (bf16 8192³ on CUDA, fp32 1024³ on CPU), best of 5."""
    import torch

    n, dtype, dev = (8192, torch.bfloat16, "cuda") if cuda else (1024, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    best = float("inf")
    for _ in range(7):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5 if cuda else 1):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / (5 if cuda else 1))
    return 2 * n ** 3 / best, str(dtype).removeprefix("torch.")


def stage_file_for(policy_procs: int) -> str:
    """One policy process: ZeRO-2 without overlap (ZeRO-3 over a world of one only adds gathers;
    ds_configs/README.md); several: ZeRO-3."""
    return "one_gpu.json" if policy_procs == 1 else "zero3.json"


def live_layout(ngpu: int) -> tuple[int, list[str]]:
    """(processes, overrides) of the live run: one GPU -> policy and a 1-stage reference share GPU 0
    (topology.device_map=0,0); more -> the policy on ngpu-1 GPUs, the reference on the last."""
    if ngpu <= 1:
        return 2, ["topology.reference_ranks=1", "topology.device_map=0,0"]
    return ngpu, ["topology.reference_ranks=1"]


def sparsepo_run(name: str, nproc: int, policy: int, w: Workload, built: dict, a, extra: list[str]) -> dict:
    run_dir = Path(a.out) / name
    mem = run_dir / "mem"
    ovs = [*sparsepo_overrides(w, built, precision=a.precision), f"logging.output_dir={run_dir}",
           f"reference.cache_dir={Path(a.out) / 'ref_cache'}", f"deepspeed.stage_file={stage_file_for(policy)}",
           f"model.attn_implementation={a.attn}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "gpu_entry.py"), *ovs]
    env = dict(os.environ, GPU_BENCH_MEM=str(mem), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log = Path(a.out) / f"{name}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=a.timeout)
    if proc.returncode:
        raise RuntimeError(f"{name} failed ({shlex.join(cmd)}); see {log}:\n{log.read_text()[-3000:]}")
    from common import scalars

    st = scalars(run_dir, "train/step_time")
    peaks = [json.loads(p.read_text()).get("max_allocated_mib") for p in sorted(mem.glob("rank*.json"))]
    peaks = [p for p in peaks if p is not None]
    return {"times": [st[s] for s in sorted(st)], "peak_gib": sum(peaks) / 1024 if peaks else None,
            "peak_gib_per_process": [round(p / 1024, 2) for p in peaks]}


def trl_worker(a) -> None:
    """Runs in --trl-python: one DPOTrainer run; writes step times, peak memory and its settings."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench_trl import trl_settings

    cuda, times, t0 = torch.cuda.is_available(), [], [0.0]
    w = preset(a.preset, **({"steps": a.steps} if a.steps else {}))

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            t0[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0[0])

    built = build(w, Path(a.work))
    tok = AutoTokenizer.from_pretrained(built["model"])
    model = AutoModelForCausalLM.from_pretrained(built["model"], attn_implementation=a.attn)
    kw = dict(output_dir=str(Path(a.out) / f"trl-{a.trl_mode}"), per_device_train_batch_size=w.batch,
              learning_rate=1e-5, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
              max_steps=w.steps, beta=0.1, max_length=w.seq, precompute_ref_log_probs=a.trl_mode == "precompute",
              use_cpu=not cuda, bf16=cuda and a.precision == "bf16", save_strategy="no", report_to=[],
              logging_steps=10 ** 6, seed=0, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    if "activation_checkpointing" in DPOConfig.__dataclass_fields__:
        kw["activation_checkpointing"] = False
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = DPOTrainer(model=model, args=DPOConfig(**kw), train_dataset=load_dataset("json", data_files=built["data"],
                         split="train"), processing_class=tok, callbacks=[Timer()])
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    Path(a.result).write_text(json.dumps({"times": times, "peak_gib": peak, "settings": trl_settings(trainer)}))


def trl_run(mode: str, w: Workload, a) -> dict:
    out = Path(a.out) / f"trl-{mode}.json"
    cmd = [a.trl_python, str(Path(__file__).resolve()), "--trl-worker", "--trl-mode", mode, "--preset", a.preset,
           "--out", a.out, "--work", a.work, "--result", str(out), "--precision", a.precision, "--attn", a.attn,
           *(["--steps", str(a.steps)] if a.steps else [])]
    log = Path(a.out) / f"trl-{mode}.log"
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=a.timeout,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE),
                                                                               os.environ.get("PYTHONPATH", "")])))
    if proc.returncode:
        raise RuntimeError(f"TRL {mode} failed; see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def run_mode(mode: str, w: Workload, built: dict, a, ngpu: int, trl_ok: bool):
    """One row's run: (system, mode, result, policy processes, reference forward in the step), or
    None when TRL is not importable."""
    if mode in ("cache", "cache-zero3", "live") and not (Path(a.out) / "ref_cache").is_dir():
        sparsepo_run("precompute", ngpu, ngpu, w, built, a, ["reference.mode=precompute"])
    if mode in ("cache", "inline"):
        return "sparsepo", mode, sparsepo_run(mode, ngpu, ngpu, w, built, a, [f"reference.mode={mode}"]), ngpu, \
            mode == "inline"
    if mode == "cache-zero3":  # what one GPU pays for ZeRO-3 (ds_configs/README.md)
        extra = ["reference.mode=cache", "deepspeed.stage_file=zero3.json"]
        return "sparsepo", mode, sparsepo_run(mode, ngpu, ngpu, w, built, a, extra), ngpu, False
    if mode == "live":
        nproc, ovs = live_layout(ngpu)
        return "sparsepo", "live", sparsepo_run("live", nproc, nproc - 1, w, built, a,
                                                ["reference.mode=live", *ovs]), nproc - 1, False
    if mode in ("lora", "qlora"):  # issue 20's GPU figures: r=16 adapters, the adapters-off policy as reference.
        # FLOPs as full fine-tuning without a reference (6·N·T): policy forward, activation gradients and the
        # reference forward, each 2·N·T; the frozen base has no weight gradients.
        extra = ["reference.mode=inline", "lora.r=16", "lora.alpha=32", *(["lora.load_in_4bit=true"] if mode == "qlora"
                                                                          else [])]
        return "sparsepo", mode, sparsepo_run(mode, ngpu, ngpu, w, built, a, extra), ngpu, False
    if mode in ("trl-precompute", "trl-inline"):
        if not trl_ok:
            return None
        kind = mode.removeprefix("trl-")
        return "trl", kind, trl_run(kind, w, a), 1, kind == "inline"
    raise ValueError(f"unknown mode {mode!r}")


def measure(a) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    ngpu = max(torch.cuda.device_count(), 1) if cuda else 1
    w = preset(a.preset, **({"steps": a.steps} if a.steps else {}))
    built = build(w, Path(a.work))
    peak, peak_dtype = matmul_peak(cuda)
    trl_ok = a.trl_python != "none" and version("trl", a.trl_python) is not None
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "device": f"{ngpu}x {torch.cuda.get_device_name(0)}" if cuda else f"CPU ({platform.machine()}, "
                                                                            f"{os.cpu_count()} cores)",
           "torch": torch.__version__, "deepspeed": version("deepspeed"),
           "trl": version("trl", a.trl_python) if trl_ok else None, "workload": {"preset": a.preset, **w.__dict__},
           "n_params": built["n_params"], "precision": a.precision, "attn_implementation": a.attn,
           "peak_tflops": round(peak / 1e12, 2), "peak_dtype": peak_dtype, "rows": [], "failed": {},
           "command": "python benchmarks/gpu_bench.py " + shlex.join(a.argv)}
    common = dict(n_params=built["n_params"], vocab=w.vocab, hidden=w.hidden, layers=w.layers, seq=w.seq,
                  tied=w.tied)

    def add(system, mode, got, procs_policy, inline):
        tokens = w.tokens_per_step * procs_policy
        flops = rep.step_flops(**common, tokens=tokens, reference_forward=inline)
        res["rows"].append(rep.row(system=system, mode=mode, times=got["times"], skip=w.skip, tokens=tokens,
                                   peak_alloc_gib=got["peak_gib"], flops=flops, peak_flops=peak,
                                   settings=got.get("settings")))
        if got.get("peak_gib_per_process"):
            res["rows"][-1]["peak_alloc_gib_per_process"] = got["peak_gib_per_process"]
        res["ratios"] = rep.ratios(res["rows"])
        (Path(a.out) / "gpu_bench.partial.json").write_text(json.dumps(res, indent=1))
        print(f"[gpu-bench] {system} {mode}: {res['rows'][-1]}", flush=True)

    for mode in a.modes.split(","):
        try:
            got = run_mode(mode, w, built, a, ngpu, trl_ok)
            if got is None:
                res["failed"][mode] = f"trl is not importable by {a.trl_python}"
            else:
                add(*got)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # keep the other rows; say what failed
            res["failed"][mode] = str(e)[-1500:]
            print(f"[gpu-bench] {mode} FAILED: {str(e)[-1500:]}", flush=True)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="issue19", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=0, help="override the preset's step count")
    p.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--modes", default="cache,inline,live,trl-precompute,trl-inline,lora,qlora",
                   help="also: cache-zero3 (the cached run under zero3.json); lora / qlora: r=16 adapters, inline")
    p.add_argument("--trl-python", default=sys.executable, help="interpreter that imports trl ('none': skip TRL)")
    p.add_argument("--out", default="runs/gpu-bench")
    p.add_argument("--work", default=None, help="workload directory (default <out>/work)")
    p.add_argument("--json", default=str(REPO / "docs" / "gpu_bench.json"))
    p.add_argument("--md", default=str(REPO / "docs" / "benchmarks.md"), help="'none': no table")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trl-mode", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    a.work = a.work or str(Path(a.out) / "work")
    if a.precision is None:
        import torch

        a.precision = "bf16" if torch.cuda.is_available() else "fp32"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.trl_worker:
        return trl_worker(a)
    res = measure(a)
    rep.write(res, Path(a.json), None if a.md == "none" else Path(a.md))
    print(rep.render_table(res))
    if res["failed"]:
        print("failed:", json.dumps(res["failed"], indent=1))
        sys.exit(1)


if __name__ == "__main__":
    main()
