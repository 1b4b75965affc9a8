"""Where one DPO step's time goes: torch.profiler over one cached and one inline step of the real loop.

    python benchmarks/profile_step.py --preset cpu-profile --out runs/profile            # CPU (docs/profile.md)
    python benchmarks/profile_step.py --preset issue19 --precision bf16 --out $OUT/profile  # one CUDA GPU

Each mode runs in its own process: `sparsepo.trainer.train` on the workload (benchmarks/workload.py),
steps 1..skip warm up, step skip+1 is profiled, skip+2 runs under a dispatch mode that names who
reads device values back (`SyncFinder`), skip+3 ends the run (the whole loop iteration: collate, reference,
forward, log-prob head, loss, backward, optimiser step, metrics). The parts are labelled with
torch.profiler.record_function by wrapping sparsepo's own functions (nothing in sparsepo changes):
data collate, reference source get, policy body forward, log-prob head, loss, backward (and ZeRO-3's
gathers / releases inside it), optimiser step, metrics (the per-step host syncs: float() of every
metric, the all-reduce, grad norm). CUDA (when present): device time per part too, and the Chrome
trace. Host syncs: `aten::item` / `aten::_local_scalar_dense` calls in the step (each one waits for
the GPU). Writes <out>/profile.json and prints a table; <out>/<mode>.trace.json with --trace.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import PRESETS, build, preset, sparsepo_overrides  # noqa: E402

PARTS = {  # label -> (module, attribute path) wrapped in record_function; missing ones are skipped
    "data: collate": ("sparsepo.rundata", "RunData.batch"),
    "reference: source.get": ("sparsepo.reference_role.sources", "*.get"),
    "policy: body forward": ("sparsepo.logprobs.head", "hidden_forward"),
    "policy: log-prob head": ("sparsepo.logprobs.lean", "chunked_logps"),
    "loss: inputs": ("sparsepo.pair_loss", "build_loss_inputs"),
    "engine: backward": ("sparsepo.engine.policy", "PolicyEngine.backward"),
    "engine: step (clip + AdamW + ZeRO)": ("sparsepo.engine.policy", "PolicyEngine.step"),
    "metrics: reduce + log (host syncs)": ("sparsepo.trainer", "reduce_mean"),
    "engine: grad norm read": ("sparsepo.engine.policy", "PolicyEngine.grad_norm"),
    "zero3: fetch (all-gather) params": ("deepspeed.runtime.zero.partitioned_param_coordinator",
                                         "PartitionedParameterCoordinator.fetch_sub_module"),
    "zero3: release (partition) params": ("deepspeed.runtime.zero.partitioned_param_coordinator",
                                          "PartitionedParameterCoordinator.release_sub_module"),
}
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def labelled(fn, label):
    import torch

    @functools.wraps(fn)
    def wrapper(*a, **k):
        with torch.profiler.record_function(label):
            return fn(*a, **k)
    return wrapper


def wrap_parts() -> list[str]:
    """Wrap every PARTS entry that exists in this version; returns the labels wrapped."""
    import importlib
    import inspect

    done = []
    for label, (mod_name, path) in PARTS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        owner_name, _, attr = path.rpartition(".")
        owners = [getattr(mod, owner_name, None)] if owner_name not in ("", "*") else \
            [mod] if owner_name == "" else [c for _, c in inspect.getmembers(mod, inspect.isclass)
                                            if c.__module__ == mod.__name__ and attr in vars(c)]
        for owner in owners:
            if owner is not None and callable(getattr(owner, attr, None)):
                setattr(owner, attr, labelled(getattr(owner, attr), label))
                done.append(label)
    import dataclasses

    import sparsepo.trainer as tr

    get_method = tr.get_method
    tr.get_method = lambda *x, **k: (lambda spec: dataclasses.replace(
        spec, loss_fn=labelled(spec.loss_fn, "loss: loss function")))(get_method(*x, **k))
    done.append("loss: loss function")
    return sorted(set(done))


SYNC_CALLERS: dict[str, int] = {}


def _record_caller() -> None:
    import traceback

    frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename
              and not f.filename.endswith("profile_step.py")]
    f = frames[-1] if frames else None
    key = "?" if f is None else \
        f"{f.filename.split('site-packages/')[-1].split(str(HERE.parent) + '/')[-1]}:{f.lineno} {f.name}"
    SYNC_CALLERS[key] = SYNC_CALLERS.get(key, 0) + 1


class SyncFinder:
    """While on, records who reads a tensor's value back to Python (aten._local_scalar_dense:
    `.item()`, `float(t)`, `bool(t)`, `if t:`; and `.tolist()` of a non-CPU tensor, which does not
    dispatch a scalar op): the first frame outside torch, counted. Used on the step after the
    profiled one (a dispatch mode slows every op down)."""

    def __new__(cls):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Finder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    _record_caller()
                return func(*args, **(kwargs or {}))

            def __enter__(self):
                self._tolist = torch.Tensor.tolist
                original = self._tolist

                def tolist(t):
                    if t.device.type != "cpu":
                        _record_caller()
                    return original(t)
                torch.Tensor.tolist = tolist
                return super().__enter__()

            def __exit__(self, *exc):
                torch.Tensor.tolist = self._tolist
                return super().__exit__(*exc)
        return Finder()


def profile_mode(a) -> dict:
    """In this process: train `skip + 1` steps, profile the last; returns the summary."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from sparsepo.config import load_config
    import sparsepo.metrics as metrics_mod
    import sparsepo.trainer as trainer

    w = preset(a.preset, steps=a.skip + 3)  # warm-up, profiled, sync finder, last (always a log step)
    built = build(w, Path(a.work))
    cfg = load_config(None, [*sparsepo_overrides(w, built, precision=a.precision), f"reference.mode={a.mode}",
                             f"reference.cache_dir={Path(a.work) / 'ref_cache'}",
                             f"logging.output_dir={Path(a.out) / a.mode}", *a.override])
    labels = wrap_parts()
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts, schedule=schedule(wait=max(a.skip - 1, 0), warmup=1 if a.skip else 0, active=1,
                                                      repeat=1), record_shapes=False)
    advance = metrics_mod.MetricsLogger.advance  # called once per optimiser step (log steps or not)
    done = [0]
    finder = SyncFinder()

    def advance_then_step(self):
        advance(self)
        done[0] += 1
        step = done[0]
        if cuda:
            torch.cuda.synchronize()
        prof.step()
        if step == a.skip + 1:  # the profiled step is done: the next one runs under the sync finder
            finder.__enter__()
        elif step == a.skip + 2:
            finder.__exit__(None, None, None)

    metrics_mod.MetricsLogger.advance = advance_then_step
    prof.start()
    trainer.train(cfg)
    prof.stop()
    if a.trace:
        prof.export_chrome_trace(str(Path(a.out) / f"{a.mode}.trace.json"))
    return summarise(prof, labels, cuda, w, built, a)


def summarise(prof, labels, cuda, w, built, a) -> dict:
    events = prof.key_averages()
    dev = "device_time_total" if cuda else None
    step = next((e for e in events if e.key.startswith("ProfilerStep")), None)
    total_ms = step.cpu_time_total / 1e3 if step else sum(e.self_cpu_time_total for e in events) / 1e3
    parts = {}
    for e in events:
        if e.key in labels:
            parts[e.key] = {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 2),
                            "share": round(e.cpu_time_total / 1e3 / total_ms, 3)}
            if dev:
                parts[e.key]["device_ms"] = round(getattr(e, dev) / 1e3, 2)
    top = sorted((e for e in events if not e.key.startswith("ProfilerStep") and e.key not in labels),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    syncs = sum(e.count for e in events if e.key in SYNC_OPS)
    out = {"mode": a.mode, "device": "cuda" if cuda else "cpu", "precision": a.precision, "workload": a.preset,
           "n_params": built["n_params"], "tokens_per_step": w.tokens_per_step, "step_ms": round(total_ms, 1),
           "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["cpu_ms"])), "host_syncs_per_step": syncs,
           "host_syncs_from": dict(sorted(SYNC_CALLERS.items(), key=lambda kv: -kv[1])[:12]),
           "top_ops_self_cpu_ms": [{"op": e.key, "calls": e.count, "ms": round(e.self_cpu_time_total / 1e3, 2)}
                                   for e in top]}
    if cuda:
        out["top_ops_self_device_ms"] = [{"op": e.key, "ms": round(e.self_device_time_total / 1e3, 2)} for e in
                                         sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]]
    return out


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [f"### {r['mode']} ({r['device']}, {r['precision']}, {r['n_params']:,} parameters, "
                  f"{r['tokens_per_step']} tokens/step): {r['step_ms']:.0f} ms profiled step, "
                  f"{r['host_syncs_per_step']} host syncs (aten::item)", "",
                  "| part | calls | CPU ms | share of step |" + (" device ms |" if r["device"] == "cuda" else ""),
                  "|---|---|---|---|" + ("---|" if r["device"] == "cuda" else "")]
        for k, v in r["parts"].items():
            lines.append(f"| {k} | {v['calls']} | {v['cpu_ms']:.1f} | {100 * v['share']:.0f}% |"
                         + (f" {v['device_ms']:.1f} |" if "device_ms" in v else ""))
        lines += ["", "Top ops by self CPU time: " + ", ".join(f"{t['op']} {t['ms']:.1f} ms ({t['calls']}×)"
                                                               for t in r["top_ops_self_cpu_ms"][:8]), "",
                  "Host syncs by caller (the next step, under a dispatch mode): " + ", ".join(f"{k} {v}×" for k, v in r["host_syncs_from"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-profile", choices=sorted(PRESETS))
    p.add_argument("--precision", default="fp32")
    p.add_argument("--modes", default="cache,inline")
    p.add_argument("--skip", type=int, default=2, help="warm-up steps before the profiled one")
    p.add_argument("--out", default="runs/profile")
    p.add_argument("--work", default=None, help="workload directory (default <out>/work)")
    p.add_argument("--trace", action="store_true", help="also write <out>/<mode>.trace.json (Chrome trace)")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--override", action="append", default=[], help="a sparsepo config override (repeatable)")
    a = p.parse_args(argv)
    a.work = a.work or str(Path(a.out) / "work")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.mode:  # the child: one mode, result written for the parent
        import sparsepo.engine.dist as dist_mod

        res = profile_mode(a)
        (Path(a.out) / f"{a.mode}.json").write_text(json.dumps(res, indent=1))
        dist_mod.shutdown(0)
    build(preset(a.preset), Path(a.work))  # once, before the children
    results = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--mode", mode]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(HERE.parent), os.environ.get("PYTHONPATH", "")])))
        results.append(json.loads((Path(a.out) / f"{mode}.json").read_text()))
    (Path(a.out) / "profile.json").write_text(json.dumps(results, indent=1))
    print(render(results))


if __name__ == "__main__":
    main()
