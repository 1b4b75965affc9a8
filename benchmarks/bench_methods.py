"""FPO vs SimPO vs DPO vs TDPO2 side by side on the embedded demo world: cost and quality.

    .venv/bin/python benchmarks/bench_methods.py --size default --steps 60 --workdir runs/bench-methods

For each method, on the same world, data order, recipe (sparsepo/recipes/demo.yaml) and number of
steps, one process (`python -m sparsepo.train`, ZeRO-3 on one CPU rank unless --nproc 2):

* reference side: `reference.mode=precompute` fills the method's reference cache first, in its own
  process (timed; SimPO needs none). FPO's SAE is trained before anything is timed, on the SFT
  model's layer sae.layer with the demo's shape (d_sae = 8 x d_model, TopK k=32) by
  `sparsepo.sae.runtime.train_for_run` for --sae-steps steps (cached in <workdir>/sae-<steps>);
  --sae-steps 0 uses the demo's own SAE instead (`sparsepo demo --method fpo`: 2000 steps, cached
  in <world>/sae; ~4 min on the tiny world and ~15 min on the default one on a shared 2-core CPU).
  The SAE's training length changes neither the step time nor the cache size;
* policy step time: TensorBoard `train/step_time` (collate + cache read + forward + loss + backward
  + optimiser step), mean and median over steps 3..N (the first 2 are warm-up). On a shared machine
  wall time measures the neighbours as much as the method, so the script also measures CPU time per
  step, which contention barely changes: (CPU seconds of the N-step run − CPU seconds of a
  --short-steps run of the same method) / (N − short), user + sys of the training process itself.
  Its children are left out on purpose: DeepSpeed JIT-builds its CPU shm-comm op at start-up
  (~55 s CPU and 1.5 GiB in the compiler) whenever the cached build looks stale, which on a machine
  shared with other checkouts happens at random (they rebuild the same ~/.cache/torch_extensions
  entry). The runs here use a private TORCH_EXTENSIONS_DIR under --workdir, built once;
* peak RSS: the training process's VmHWM, polled from /proc (with --nproc 2 the largest rank).
  Not ru_maxrss of a child forked by this script (os.wait4 or RUSAGE_CHILDREN): Linux
  carries the pre-exec memory's high-water mark across execve, and Python's subprocess vforks, so
  every child would report at least this script's own peak (~930 MiB once the SAE and eval models
  are loaded) — which is what a first version of this script measured;
* reference cache bytes per pair: the sum of shard sizes in index.json / pairs. For FPO also the
  bytes a dense per-token feature cache at the same layer would need: d_sae x response tokens x 4
  bytes (float32) per response, summed over chosen + rejected (target: FPO's cache <= 5% of it);
* quality: `sparsepo.demo.evaluate_policy(run/final, world.sft_dir, world.eval_prompts_path)` on
  the demo's ground-truth reward: win rate vs the SFT reference and KL(policy || reference);
* an in-process breakdown of FPO's policy-side extra work for one micro-batch (SAE encode + pooling,
  the reconstruction statistics it logs), single-threaded like the runs.

Writes a markdown report between markers in --doc (text outside the markers is kept) and a JSON
next to it. Timings on a shared machine are noisy: --repeats N interleaves the methods N times and
pools their step times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scalars  # noqa: E402
from methods_report import BEGIN, END, render  # noqa: E402
from method_costs import (cache_stats, fpo_policy_overhead, payload_bytes_per_pair,  # noqa: E402
                          response_tokens_per_pair, sae_k)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "sparsepo" / "recipes" / "demo.yaml"
METHODS = ("fpo", "simpo", "dpo", "tdpo2")
LOG_EVERY = 10
"""Steps per logged window: each logged value is the mean over its window (loss_first10 / loss_last10: the
first and last windows; step time: the windows after the first, which holds the warm-up steps)."""
EXTENSIONS_DIR: Path | None = None


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if EXTENSIONS_DIR is not None:  # private JIT-op cache: see the module docstring
        e["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS_DIR)
    return e


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of the process itself (not its children), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def run_process(cmd: list[str], log_path: Path, *, launcher: bool = False) -> dict:
    """Run cmd to completion: wall s; CPU s of the process itself (user + sys, read from the
    not-yet-reaped zombie, so children such as a JIT compiler do not count); peak RSS MiB = the
    largest VmHWM seen on the process or a descendant `sparsepo.train` rank (polled every 50 ms).
    With `launcher` (the deepspeed launcher) the CPU is the sum over the `sparsepo.train` processes
    under it, as last polled."""
    t0 = time.perf_counter()
    hwm: dict[int, int] = {}
    cpu_seen: dict[int, float] = {}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
        while True:
            for pid in _tree(proc.pid):
                try:
                    if pid == proc.pid or b"sparsepo.train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        hwm[pid] = max(hwm.get(pid, 0), _vm_hwm_kib(pid))
                        cpu_seen[pid] = _proc_cpu_s(pid)
                except OSError:
                    pass
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
            time.sleep(0.05)
        cpu = _proc_cpu_s(proc.pid)  # a zombie still reports its own utime/stime
        if launcher:  # deepspeed launcher: its ranks' CPU (last poll before each exited), not its own
            cpu = sum(v for pid, v in cpu_seen.items() if pid != proc.pid)
        code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"failed ({code}): {shlex.join(cmd)}\n{log_path.read_text()[-4000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": max(hwm.values(), default=0) / 1024}


def train_cmd(nproc: int, overrides: list[str]) -> list[str]:
    args = ["--config", str(RECIPE), "checkpoint.at_end=false", *overrides]  # benchmarks: no checkpoint unless asked
    if nproc == 1:
        return [sys.executable, "-m", "sparsepo.train", *args]
    port = 29500 + os.getpid() % 1000
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(port), "--module", "sparsepo.train", *args]


def write_doc(path: Path, block: str, *, title: str = "Methods benchmark", begin: str = BEGIN,
              end: str = END) -> None:
    """Replace the text between `begin` and `end` in `path` with `block` (which carries both markers);
    a new document gets `title`; a document without the markers gets the block appended."""
    text = path.read_text() if path.exists() else f"# {title}\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", choices=["default", "tiny"])
    p.add_argument("--workdir", default="runs/bench-methods")
    p.add_argument("--world", default=None, help="an existing demo world directory (default: <workdir>/world)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="interleaved training runs per method")
    p.add_argument("--short-steps", type=int, default=5, help="length of the run subtracted for CPU/step")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--fpo-variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="an extra FPO run with these overrides, e.g. alpha50:method.alpha=50 (repeatable); "
                        "it reads FPO's cache (α and β do not change it)")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per eval prompt")
    p.add_argument("--overhead-reps", type=int, default=20)
    p.add_argument("--sae-steps", type=int, default=300,
                   help="SAE training steps (0: the demo's SAE, 2000 steps, in <world>/sae)")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks_methods.md"))
    p.add_argument("--json", help="default: the doc's path with .json")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run (e.g. optim.lr=1e-3)")
    a = p.parse_args(argv)
    methods = [x for x in a.methods.split(",") if x]
    if "simpo" not in methods:
        raise SystemExit("--methods must include simpo (the step-time baseline)")
    # label -> (method, extra overrides)
    specs: dict[str, tuple[str, list[str]]] = {m: (m, []) for m in methods}
    for v in a.fpo_variant:
        name, _, ovs = v.partition(":")
        if not name or not ovs or "fpo" not in methods:
            raise SystemExit(f"--fpo-variant {v!r}: want LABEL:KEY=VALUE[,...] (and fpo in --methods)")
        specs[f"fpo[{name}]"] = ("fpo", ovs.split(","))
    labels = list(specs)
    from sparsepo.losses import get_method

    for m in methods:
        spec = get_method(m)  # an unknown name is refused here, naming the valid ones
        if spec.needs_oracle_scores or spec.needs_policy_samples:
            raise SystemExit(f"--methods {m}: its inputs (an oracle, or the policy's own samples) are set up by "
                             "benchmarks/bench_quality.py and bench_sepo.py / bench_spo_overlap.py, not here")

    from sparsepo.cli import demo_sae
    from sparsepo.config import load_config
    from sparsepo.demo import evaluate_policy, prepare_world
    from sparsepo.sae import SIDECAR

    work = Path(a.workdir).resolve()
    global EXTENSIONS_DIR
    EXTENSIONS_DIR = work / "torch_extensions"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    world = prepare_world(Path(a.world) if a.world else work / "world", size=a.size, progress=False)
    world_meta = json.loads(world.meta_path.read_text())
    print(f"[bench] world ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    t_sae = time.perf_counter()
    if a.sae_steps == 0:
        sae_dir = demo_sae(world, ["method.name=fpo"], force=False)  # as `sparsepo demo --method fpo`
    else:
        sae_cfg = load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                       "method.name=fpo", "sae.path=unused", "logging.progress=false", *a.overrides])
        sae_dir = work / f"sae-l{sae_cfg.sae.layer}-{a.sae_steps}"
        if not (sae_dir / SIDECAR).is_file():
            from sparsepo.sae.runtime import train_for_run

            train_for_run(sae_cfg, sae_dir, steps=a.sae_steps)
    sae_meta = json.loads((sae_dir / SIDECAR).read_text())
    world_s, sae_s = t_sae - t0, time.perf_counter() - t_sae
    print(f"[bench] SAE ready ({sae_s:.0f}s)", flush=True)

    base = [f"model.path={world.sft_dir}", f"data.path={world.train_path}", "logging.progress=false",
            f"logging.log_every={LOG_EVERY}", "logging.overwrite=true", f"train.micro_batch_size={a.micro_batch}",
            f"train.max_steps={a.steps}", *a.overrides]

    def overrides_for(method: str, run_dir: Path, variant: list[str] = ()) -> list[str]:
        extra = [f"sae.path={sae_dir}"] if method == "fpo" else []
        return [*base, f"method.name={method}", f"logging.output_dir={run_dir}",
                f"reference.cache_dir={work / 'cache' / method}", *extra, *variant]

    res_methods: dict[str, dict] = {}
    for method in methods:  # reference side first, one process each, before any timed training
        info: dict = {"cache_bytes_per_pair": None, "precompute_s": None}
        if get_method(method).reference_outputs:  # reference-free rows (SimPO, CPO, ORPO, ...) need no cache
            cache = work / "cache" / method
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            pre = run_process(train_cmd(1, [*overrides_for(method, work / f"precompute-{method}"),
                                             "reference.mode=precompute"]), work / f"precompute-{method}.log")
            info.update(precompute_s=pre["wall_s"], precompute_rss_mib=pre["peak_rss_mib"], cache=cache_stats(cache))
            info["cache_bytes_per_pair"] = info["cache"]["bytes_per_pair"]
            print(f"[bench] {method} cache: {info['cache_bytes_per_pair']:.0f} B/pair, {pre['wall_s']:.1f}s",
                  flush=True)
        res_methods[method] = info
    for label, (method, variant) in specs.items():
        if label != method:
            res_methods[label] = {**res_methods[method], "overrides": variant}
        res_methods[label]["method"] = method

    def slug(label: str) -> str:
        return label.replace("[", "-").replace("]", "")

    runs = []
    step_times: dict[str, list[float]] = {m: [] for m in labels}
    ref_waits: dict[str, list[float]] = {m: [] for m in labels}
    cpu_per_step: dict[str, list[float]] = {m: [] for m in labels}
    for rep in range(a.repeats):
        for label in labels:
            method, variant = specs[label]
            run_dir = work / f"run-{slug(label)}" if rep == 0 else work / f"run-{slug(label)}-r{rep}"
            short_dir = work / f"short-{slug(label)}-r{rep}"
            multi = a.nproc > 1
            short = run_process(train_cmd(a.nproc, [*overrides_for(method, short_dir, variant),
                                                    f"train.max_steps={a.short_steps}"]),
                                work / f"short-{slug(label)}-r{rep}.log", launcher=multi)
            r = run_process(train_cmd(a.nproc, overrides_for(method, run_dir, variant)),
                            work / f"train-{slug(label)}-r{rep}.log", launcher=multi)
            method = label  # results below are keyed by label
            cpu_per_step[method].append((r["cpu_s"] - short["cpu_s"]) / (a.steps - a.short_steps))
            # the trainer logs window means every LOG_EVERY steps (and at the last): the windows after the
            # first (which holds the warm-up steps) give the step time; the first and last, the loss
            st = scalars(run_dir, "train/step_time")
            logged = sorted(st)
            if not logged or logged[-1] != a.steps:
                raise SystemExit(f"{run_dir}: expected step_time logged through step {a.steps}, got {logged}")
            timed = logged[1:] or logged
            step_times[method] += [st[s] for s in timed]
            wait = scalars(run_dir, "train/ref_wait")
            ref_waits[method] += [wait[s] for s in timed]
            loss = scalars(run_dir, "train/loss")
            runs.append({"method": method, "repeat": rep, "run_dir": str(run_dir), **r,
                         "short_cpu_s": short["cpu_s"], "cpu_ms_per_step": 1000 * cpu_per_step[method][-1],
                         "step_time_mean_ms": 1000 * statistics.mean(st[s] for s in timed),
                         "loss_first10": loss[logged[0]], "loss_last10": loss[logged[-1]]})
            print(f"[bench] {method}#{rep}: {runs[-1]['step_time_mean_ms']:.1f} ms/step wall, "
                  f"{runs[-1]['cpu_ms_per_step']:.1f} ms/step CPU, {r['peak_rss_mib']:.0f} MiB, loss "
                  f"{runs[-1]['loss_first10']:.4f} -> {runs[-1]['loss_last10']:.4f}", flush=True)
    for method in labels:
        mine = [x for x in runs if x["method"] == method]
        res_methods[method].update(
            step_time_mean_ms=1000 * statistics.mean(step_times[method]),
            step_time_median_ms=1000 * statistics.median(step_times[method]),
            ref_wait_mean_ms=1000 * statistics.mean(ref_waits[method]),
            step_time_stdev_ms=1000 * statistics.stdev(step_times[method]) if len(step_times[method]) > 1 else 0.0,
            cpu_ms_per_step=1000 * statistics.mean(cpu_per_step[method]),
            cpu_ms_per_step_each=[1000 * x for x in cpu_per_step[method]],
            peak_rss_mib=max(x["peak_rss_mib"] for x in mine), loss_first10=mine[0]["loss_first10"],
            loss_last10=mine[0]["loss_last10"])
        if specs[method][0] == "fpo":
            run0 = work / f"run-{slug(method)}"
            for tag in ("feature_mse_chosen", "feature_mse_rejected", "sae_explained_variance", "union_size"):
                v = scalars(run0, f"train/{tag}")
                res_methods[method][f"{tag}_first_last"] = [v[1], v[a.steps]]
        res_methods[method]["eval"] = evaluate_policy(work / f"run-{slug(method)}" / "final", world.sft_dir,
                                                      world.eval_prompts_path, samples_per_prompt=a.eval_samples,
                                                      progress=False, num_threads=1)
        e = res_methods[method]["eval"]
        print(f"[bench] {method} eval: win rate {e['win_rate']:.3f}, KL {e['kl']:.3f}", flush=True)

    cfg = load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                               "method.name=fpo", f"sae.path={sae_dir}", *a.overrides])
    fpo_res = None
    if "fpo" in methods:
        tokens = response_tokens_per_pair(cfg)
        dense = tokens * sae_meta["d_sae"] * 4
        fpo_bytes = res_methods["fpo"]["cache_bytes_per_pair"]
        dpo_bytes = res_methods.get("dpo", {}).get("cache_bytes_per_pair") or 0.0
        fpo_res = {"layer": cfg.sae.layer, "d_sae": sae_meta["d_sae"], "k": cfg.method.params.k,
                   "sae_dir": str(sae_dir), "sae_k": sae_k(sae_dir),
                   "sae_stats": sae_meta.get("stats", {}), "response_tokens_per_pair": tokens,
                   "dense_bytes_per_pair": dense, "cache_bytes_per_pair": fpo_bytes, "ratio": fpo_bytes / dense,
                   "feature_bytes_per_pair": fpo_bytes - dpo_bytes, "feature_ratio": (fpo_bytes - dpo_bytes) / dense,
                   "payload_bytes_per_pair": payload_bytes_per_pair(work / "cache" / "fpo")}
        fpo_overhead = fpo_policy_overhead(world, sae_dir, layer=cfg.sae.layer, k=cfg.method.params.k,
                                           micro=a.micro_batch, reps=a.overhead_reps)
    else:
        fpo_overhead = None
    targets = {}
    if fpo_res:
        def ratio(key, other):
            den = res_methods[other][key] if other in res_methods else 0.0
            # a short run's CPU can equal the long one's at clock-tick resolution (10 ms): no ratio then
            return res_methods["fpo"][key] / den if den and den > 0 else float("nan")

        targets = {"cache_5pct": fpo_res["ratio"] <= 0.05,
                   "fpo_vs_simpo_cpu": ratio("cpu_ms_per_step", "simpo"),
                   "fpo_vs_tdpo2_cpu": ratio("cpu_ms_per_step", "tdpo2"),
                   "fpo_vs_simpo_wall_median": ratio("step_time_median_ms", "simpo"),
                   "fpo_vs_tdpo2_wall_median": ratio("step_time_median_ms", "tdpo2")}
    import torch

    cmd = "python benchmarks/bench_methods.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), "
                   f"torch {torch.__version__}, 1 thread per process",
        "command": cmd.strip(), "size": a.size, "steps": a.steps, "nproc": a.nproc, "repeats": a.repeats,
        "global_batch": a.micro_batch * a.nproc, "order": labels, "short_steps": a.short_steps,
        "world": {k: world_meta.get(k, world_meta["settings"].get(k)) for k in
                  ("n_pairs", "hidden_size", "num_layers", "n_params")},
        "tdpo_topk": cfg.reference.topk, "methods": res_methods, "runs": runs, "fpo": fpo_res,
        "fpo_overhead": fpo_overhead, "targets": targets, "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "total_s": time.perf_counter() - t0, "world_s": world_s, "sae_s": sae_s,
    }
    if fpo_res:
        doc = Path(a.doc)
        write_doc(doc, render(res))
        json_path = Path(a.json) if a.json else doc.with_suffix(".json")
        json_path.write_text(json.dumps(res, indent=1, default=str))
        print(render(res))
        print(f"[bench] wrote {doc} and {json_path} ({res['total_s']:.0f}s)")
    else:
        print(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
