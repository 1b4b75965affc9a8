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

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "sparsepo" / "recipes" / "demo.yaml"
METHODS = ("fpo", "simpo", "dpo", "tdpo2")
REFERENCE_SIDE = {"fpo": "offline cache: γ_ref + pooled SAE top-k", "simpo": "none",
                  "dpo": "cache: sequence log-probs", "tdpo2": "cache: per-token top-k distributions"}
EXTENSIONS_DIR: Path | None = None
BEGIN, END = "<!-- bench_methods:begin -->", "<!-- bench_methods:end -->"


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
    args = ["--config", str(RECIPE), *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "sparsepo.train", *args]
    port = 29500 + os.getpid() % 1000
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
            str(port), "--module", "sparsepo.train", *args]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def cache_stats(cache: Path) -> dict:
    index = json.loads((cache / "index.json").read_text())
    pairs = sum(len(s["example_ids"]) for s in index["shards"])
    total = sum(s["bytes"] for s in index["shards"])
    return {"pairs": pairs, "bytes": total, "bytes_per_pair": total / pairs, "shards": len(index["shards"]),
            "settings": json.loads(index["fingerprint"]["settings_detail"])}


def payload_bytes_per_pair(cache: Path) -> dict[str, float]:
    """Raw tensor bytes per pair by field (what the numbers need, without torch.save's framing)."""
    import torch

    index = json.loads((cache / "index.json").read_text())
    sums: dict[str, int] = {}
    n = 0
    for shard in index["shards"]:
        body = torch.load(cache / shard["file"], weights_only=True)
        for rec in body["records"]:
            n += 1
            for name, pair in rec.items():
                sums[name] = sums.get(name, 0) + sum(t.numel() * t.element_size() for t in pair)
    return {k: v / n for k, v in sums.items()}


def response_tokens_per_pair(cfg) -> float:
    """Mean chosen + rejected response tokens (incl. eos, after truncation) = response_mask count."""
    from sparsepo import data as pdata
    from sparsepo.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    ds, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    return sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])) / len(ds)


def fpo_policy_overhead(world, sae_dir: Path, *, layer: int, k: int, micro: int, reps: int) -> dict:
    """ms per micro-batch, single-threaded, plain torch (no DeepSpeed): policy forward + backward of
    the log-prob loss alone; + the layer hook, SAE encode + pooling and the feature MSE in the loss;
    and the extra reconstruction statistics FPO logs (a second encode + decode, no_grad)."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsepo import data as pdata
    from sparsepo.config import load_config
    from sparsepo.sae.runtime import SAEFeatures
    from sparsepo.losses.common import pooled_union_mse
    from sparsepo.models import load_tokenizer, pair_forward
    from sparsepo.sae import load_sae, reconstruction_stats

    torch.set_num_threads(1)
    cfg = load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}"])
    tokenizer = load_tokenizer(str(world.sft_dir))
    ds, _ = pdata.load_preference_dataset(cfg.data, tokenizer)
    batch = pdata.collate_pairs(pdata.gather_rows(ds, list(range(micro))), tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(world.sft_dir, dtype=torch.float32).train()
    sae = load_sae(str(sae_dir))
    feats = SAEFeatures(sae, layer=layer, k=k)
    with torch.no_grad(), feats.capture(model) as cap:
        pair_forward(model, batch)
        ref = feats.reference(cap, batch)

    def plain():
        fwd = pair_forward(model, batch)
        (fwd.seq_logps / batch.response_mask.sum(-1)).mean().backward()

    def with_features():
        with feats.capture(model) as cap:
            fwd = pair_forward(model, batch)
        from sparsepo.sae import pooled_features

        pooled = pooled_features(sae, cap.take(), batch.response_mask)
        mse, _ = pooled_union_mse(pooled, ref["feature_ids"], ref["feature_values"], k)
        ((fwd.seq_logps / batch.response_mask.sum(-1)).mean() + mse.mean()).backward()

    def stats_only():
        with torch.no_grad(), feats.capture(model) as cap:
            pair_forward(model, batch)
        hidden = cap.take()
        t = time.perf_counter()
        reconstruction_stats(sae, hidden, batch.response_mask)
        return time.perf_counter() - t

    def timed(fn):
        for _ in range(2):
            fn()
            model.zero_grad(set_to_none=True)
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
        return statistics.median(out) * 1000

    base, feat = timed(plain), timed(with_features)
    stats_ms = statistics.median([stats_only() for _ in range(reps)]) * 1000
    return {"policy_fwd_bwd_ms": base, "with_sae_features_ms": feat, "sae_features_extra_ms": feat - base,
            "reconstruction_stats_ms": stats_ms, "micro_batch_pairs": micro,
            "response_tokens": int(batch.response_mask.sum()), "d_sae": int(sae.cfg.d_sae)}


def _sae_k(sae_dir: Path):
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    return cfg.get("k")


def fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def render(res: dict) -> str:
    r, m = res["runs"], res["methods"]
    lines = [BEGIN, "", f"Measured {res['date']} on {res['machine']} — command:", "", "```",
             res["command"], "```", "",
             f"World `{res['size']}` ({res['world']['n_pairs']} pairs, d_model {res['world']['hidden_size']}, "
             f"{res['world']['num_layers']} layers, {res['world']['n_params']:,} parameters); "
             f"{res['steps']} steps of {res['global_batch']} pairs, nproc {res['nproc']}, "
             f"repeats {res['repeats']}; wall step times over steps 3..{res['steps']} of every repeat, CPU "
             f"time per step from the {res['steps']}-step run minus a {res['short_steps']}-step run. "
             f"FPO: SAE layer {res['fpo']['layer']}, d_sae {res['fpo']['d_sae']}, TopK "
             f"{res['fpo']['sae_k']}, {res['fpo']['sae_stats'].get('steps')} training steps "
             f"({res['fpo']['sae_stats'].get('seconds', float('nan')):.0f}s, explained variance "
             f"{res['fpo']['sae_stats'].get('explained_variance', float('nan')):.3f}), method.k "
             f"{res['fpo']['k']}; TDPO2: reference.topk {res['tdpo_topk']}. Load average "
             f"{res['load_before']} before, {res['load_after']} after.", "",
             "| method | reference side | CPU ms/step | × SimPO (CPU) | wall step ms median (mean) | "
             "× SimPO (wall median) | cache read ms/step | peak RSS MiB | ref cache B/pair | precompute s | "
             "train loss, mean of first 10 → last 10 steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    simpo = m["simpo"]
    for name in res["order"]:
        s = m[name]
        lines.append(
            f"| {name} | {REFERENCE_SIDE[s['method']]} | {s['cpu_ms_per_step']:.1f} | "
            f"{s['cpu_ms_per_step'] / simpo['cpu_ms_per_step']:.2f} | "
            f"{s['step_time_median_ms']:.1f} ({s['step_time_mean_ms']:.1f}) | "
            f"{s['step_time_median_ms'] / simpo['step_time_median_ms']:.2f} | {s['ref_wait_mean_ms']:.2f} | "
            f"{s['peak_rss_mib']:.0f} | {fmt(s['cache_bytes_per_pair'], ',.0f')} | {fmt(s['precompute_s'])} | "
            f"{s['loss_first10']:.4f} → {s['loss_last10']:.4f} |")
    lines += ["", "| method | win rate vs SFT (± se) | KL(policy‖ref) (± se) | reward (SFT) | length (SFT) |",
              "|---|---|---|---|---|"]
    for name in res["order"]:
        e = m[name]["eval"]
        lines.append(f"| {name} | {e['win_rate']:.3f} ± {e['win_rate_se']:.3f} | {e['kl']:.3f} ± {e['kl_se']:.3f} | "
                     f"{e['policy_reward']:.3f} ({e['reference_reward']:.3f}) | "
                     f"{e['policy_length']:.1f} ({e['reference_length']:.1f}) |")
    f = res["fpo"]
    lines += ["", f"FPO cache vs a dense per-token feature cache at layer {f['layer']}: "
                  f"{f['response_tokens_per_pair']:.1f} response tokens per pair × d_sae {f['d_sae']} × 4 B = "
                  f"{f['dense_bytes_per_pair']:,.0f} B/pair. FPO's whole cache: {f['cache_bytes_per_pair']:,.0f} "
                  f"B/pair = **{100 * f['ratio']:.2f}%** (target ≤ 5%); its feature entries alone (FPO − DPO cache) "
                  f"{f['feature_bytes_per_pair']:,.0f} B/pair = {100 * f['feature_ratio']:.2f}%. Raw tensor "
                  f"payload per pair: "
              + ", ".join(f"{k} {v:,.0f} B" for k, v in f["payload_bytes_per_pair"].items())
              + ".", ""]
    for name in res["order"]:
        fm = m[name]
        if "feature_mse_chosen_first_last" not in fm:
            continue
        variant = f" ({', '.join(fm['overrides'])})" if fm.get("overrides") else " (paper defaults)"
        lines += [f"{name}{variant} training signals, step 1 → last: feature MSE chosen "
                  + " → ".join(f"{v:.3g}" for v in fm["feature_mse_chosen_first_last"]) + ", rejected "
                  + " → ".join(f"{v:.3g}" for v in fm["feature_mse_rejected_first_last"])
                  + "; SAE explained variance on the policy's activations "
                  + " → ".join(f"{v:.3f}" for v in fm["sae_explained_variance_first_last"]) + "; union size "
                  + " → ".join(f"{v:.1f}" for v in fm["union_size_first_last"]) + ".", ""]
    t = res["targets"]
    lines += ["Targets:", "",
              f"- FPO cache ≤ 5% of dense: {100 * f['ratio']:.2f}% — **{'met' if t['cache_5pct'] else 'missed'}**",
              f"- FPO step time ≤ 1.10 × SimPO: {t['fpo_vs_simpo_cpu']:.2f}× in CPU time per step — "
              f"**{'met' if t['fpo_vs_simpo_cpu'] <= 1.10 else 'missed'}** (wall-clock median: "
              f"{t['fpo_vs_simpo_wall_median']:.2f}×)",
              f"- FPO step time < TDPO2: {t['fpo_vs_tdpo2_cpu']:.2f}× TDPO2 in CPU time per step — "
              f"**{'met' if t['fpo_vs_tdpo2_cpu'] < 1.0 else 'missed'}** (wall-clock median: "
              f"{t['fpo_vs_tdpo2_wall_median']:.2f}×)", ""]
    o = res.get("fpo_overhead")
    if o:
        lines += [f"FPO policy-side extra work per micro-batch of {o['micro_batch_pairs']} pairs "
                  f"({o['response_tokens']} response tokens, d_sae {o['d_sae']}; plain torch, 1 thread, median): "
                  f"forward+backward {o['policy_fwd_bwd_ms']:.1f} ms; with hook + SAE encode/pool + feature MSE "
                  f"{o['with_sae_features_ms']:.1f} ms (+{o['sae_features_extra_ms']:.1f} ms); the logged "
                  f"reconstruction statistics (second encode + decode) {o['reconstruction_stats_ms']:.1f} ms.", ""]
    lines += ["Per run (wall s / CPU s, incl. process start; CPU ms per step): " + "; ".join(
        f"{x['method']}#{x['repeat']} {x['wall_s']:.1f} / {x['cpu_s']:.1f}; {x['cpu_ms_per_step']:.1f}" for x in r)
              + f". Total {res['total_s'] / 60:.1f} min (world {res['world_s']:.0f}s, SAE {res['sae_s']:.0f}s; "
              "both cached for later runs).", "", END]
    return "\n".join(lines)


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

    from sparsepo.cli import demo_sae
    from sparsepo.config import load_config
    from sparsepo.demo import evaluate_policy, prepare_world
    from sparsepo.sae import SIDECAR

    work = Path(a.workdir).resolve()
    global EXTENSIONS_DIR
    EXTENSIONS_DIR = work / "torch_extensions"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    world = prepare_world(work / "world", size=a.size, progress=False)
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
            "logging.log_every=10", "logging.overwrite=true", f"train.micro_batch_size={a.micro_batch}",
            f"train.max_steps={a.steps}", *a.overrides]

    def overrides_for(method: str, run_dir: Path, variant: list[str] = ()) -> list[str]:
        extra = [f"sae.path={sae_dir}"] if method == "fpo" else []
        return [*base, f"method.name={method}", f"logging.output_dir={run_dir}",
                f"reference.cache_dir={work / 'cache' / method}", *extra, *variant]

    res_methods: dict[str, dict] = {}
    for method in methods:  # reference side first, one process each, before any timed training
        info: dict = {"cache_bytes_per_pair": None, "precompute_s": None}
        if method != "simpo":
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
            st = scalars(run_dir, "train/step_time")
            if sorted(st) != list(range(1, a.steps + 1)):
                raise SystemExit(f"{run_dir}: expected step_time for steps 1..{a.steps}, got {sorted(st)}")
            step_times[method] += [st[s] for s in range(3, a.steps + 1)]
            wait = scalars(run_dir, "train/ref_wait")
            ref_waits[method] += [wait[s] for s in range(3, a.steps + 1)]
            loss = scalars(run_dir, "train/loss")
            n10 = min(10, a.steps)
            runs.append({"method": method, "repeat": rep, "run_dir": str(run_dir), **r,
                         "short_cpu_s": short["cpu_s"], "cpu_ms_per_step": 1000 * cpu_per_step[method][-1],
                         "step_time_mean_ms": 1000 * statistics.mean(st[s] for s in range(3, a.steps + 1)),
                         "loss_first10": statistics.mean(loss[s] for s in range(1, n10 + 1)),
                         "loss_last10": statistics.mean(loss[s] for s in range(a.steps - n10 + 1, a.steps + 1))})
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
                   "sae_dir": str(sae_dir), "sae_k": _sae_k(sae_dir),
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
            return res_methods["fpo"][key] / res_methods[other][key] if other in res_methods else float("nan")

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
