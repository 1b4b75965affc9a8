"""FPO vs SimPO vs DPO vs TDPO2 side by side on the embedded demo world: cost and quality.

    .venv/bin/python benchmarks/bench_methods.py --size default --steps 60 --workdir runs/bench-methods

For each method, on the same world, data order, recipe (sparsepo/recipes/demo.yaml) and number of
steps, one process (`python -m sparsepo.train`, ZeRO-3 on one CPU rank unless --nproc 2):

* reference side: `reference.mode=precompute` fills the method's reference cache first, in its own
  process (timed; SimPO needs none); FPO's SAE is the demo's (`sparsepo demo --method fpo` trains
  it once into <world>/sae with `sparsepo.cli.demo_sae`), trained before anything is timed;
* policy step time: TensorBoard `train/step_time` (collate + cache read + forward + loss + backward
  + optimiser step), mean and median over steps 3..N (the first 2 are warm-up);
* peak RSS: `ru_maxrss` of the training process from os.wait4 (its own, not a running maximum over
  earlier children as RUSAGE_CHILDREN would be); with --nproc 2 the largest single process;
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
BEGIN, END = "<!-- bench_methods:begin -->", "<!-- bench_methods:end -->"


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return e


def run_process(cmd: list[str], log_path: Path) -> dict:
    """Run cmd to completion; wall seconds and the peak RSS (MiB) of it and its descendants."""
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux: ru_maxrss in KiB


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
    from sparsepo.fpo import SAEFeatures
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


def fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def render(res: dict) -> str:
    r, m = res["runs"], res["methods"]
    lines = [BEGIN, "", f"Measured {res['date']} on {res['machine']} — command:", "", "```",
             res["command"], "```", "",
             f"World `{res['size']}` ({res['world']['n_pairs']} pairs, d_model {res['world']['hidden_size']}, "
             f"{res['world']['num_layers']} layers, {res['world']['n_params']:,} parameters); "
             f"{res['steps']} steps of {res['global_batch']} pairs, nproc {res['nproc']}, "
             f"repeats {res['repeats']}; step times over steps 3..{res['steps']} of every repeat. "
             f"FPO: SAE layer {res['fpo']['layer']}, d_sae {res['fpo']['d_sae']}, method.k "
             f"{res['fpo']['k']}; TDPO2: reference.topk {res['tdpo_topk']}. Load average "
             f"{res['load_before']} before, {res['load_after']} after.", "",
             "| method | reference side | step time mean (median) ms | × SimPO | peak RSS MiB | "
             "ref cache B/pair | precompute s | final train loss |",
             "|---|---|---|---|---|---|---|---|"]
    simpo = m["simpo"]["step_time_mean_ms"]
    for name in res["order"]:
        s = m[name]
        lines.append(
            f"| {name} | {REFERENCE_SIDE[name]} | {s['step_time_mean_ms']:.1f} ({s['step_time_median_ms']:.1f}) | "
            f"{s['step_time_mean_ms'] / simpo:.2f} | {s['peak_rss_mib']:.0f} | "
            f"{fmt(s['cache_bytes_per_pair'], ',.0f')} | {fmt(s['precompute_s'])} | {s['final_loss']:.4f} |")
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
                  f"payload per pair: " + ", ".join(f"{k} {v:,.0f} B" for k, v in f["payload_bytes_per_pair"].items())
              + ".", ""]
    t = res["targets"]
    lines += ["Targets:", "",
              f"- FPO cache ≤ 5% of dense: {100 * f['ratio']:.2f}% — **{'met' if t['cache_5pct'] else 'missed'}**",
              f"- FPO step time ≤ 1.10 × SimPO: {t['fpo_vs_simpo']:.2f}× — "
              f"**{'met' if t['fpo_vs_simpo'] <= 1.10 else 'missed'}**",
              f"- FPO step time < TDPO2: {t['fpo_vs_tdpo2']:.2f}× TDPO2 — "
              f"**{'met' if t['fpo_vs_tdpo2'] < 1.0 else 'missed'}**", ""]
    o = res.get("fpo_overhead")
    if o:
        lines += [f"FPO policy-side extra work per micro-batch of {o['micro_batch_pairs']} pairs "
                  f"({o['response_tokens']} response tokens, d_sae {o['d_sae']}; plain torch, 1 thread, median): "
                  f"forward+backward {o['policy_fwd_bwd_ms']:.1f} ms; with hook + SAE encode/pool + feature MSE "
                  f"{o['with_sae_features_ms']:.1f} ms (+{o['sae_features_extra_ms']:.1f} ms); the logged "
                  f"reconstruction statistics (second encode + decode) {o['reconstruction_stats_ms']:.1f} ms.", ""]
    lines += [f"Per-run wall times (s, incl. process start): " + ", ".join(
        f"{x['method']}#{x['repeat']} {x['wall_s']:.1f}" for x in r) + ".", "", END]
    return "\n".join(lines)


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Methods benchmark\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
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
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eval-samples", type=int, default=1, help="samples per eval prompt")
    p.add_argument("--overhead-reps", type=int, default=20)
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks_methods.md"))
    p.add_argument("--json", help="default: the doc's path with .json")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run (e.g. optim.lr=1e-3)")
    a = p.parse_args(argv)
    methods = [x for x in a.methods.split(",") if x]
    if "simpo" not in methods:
        raise SystemExit("--methods must include simpo (the step-time baseline)")

    from sparsepo.cli import demo_sae
    from sparsepo.config import load_config
    from sparsepo.demo import evaluate_policy, prepare_world
    from sparsepo.sae import SIDECAR

    work = Path(a.workdir).resolve()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    world = prepare_world(work / "world", size=a.size, progress=False)
    world_meta = json.loads(world.meta_path.read_text())
    print(f"[bench] world ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    t_sae = time.perf_counter()
    sae_dir = demo_sae(world, ["method.name=fpo"], force=False)  # as `sparsepo demo --method fpo`
    sae_meta = json.loads((sae_dir / SIDECAR).read_text())
    print(f"[bench] SAE ready ({time.perf_counter() - t_sae:.0f}s)", flush=True)

    base = [f"model.path={world.sft_dir}", f"data.path={world.train_path}", "logging.progress=false",
            "logging.log_every=1", "logging.overwrite=true", f"train.micro_batch_size={a.micro_batch}",
            f"train.max_steps={a.steps}", *a.overrides]

    def overrides_for(method: str, run_dir: Path) -> list[str]:
        extra = [f"sae.path={sae_dir}"] if method == "fpo" else []
        return [*base, f"method.name={method}", f"logging.output_dir={run_dir}",
                f"reference.cache_dir={work / 'cache' / method}", *extra]

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
            print(f"[bench] {method} cache: {info['cache_bytes_per_pair']:.0f} B/pair, {pre['wall_s']:.1f}s", flush=True)
        res_methods[method] = info

    runs = []
    step_times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(a.repeats):
        for method in methods:
            run_dir = work / f"run-{method}" if rep == 0 else work / f"run-{method}-r{rep}"
            r = run_process(train_cmd(a.nproc, overrides_for(method, run_dir)), work / f"train-{method}-r{rep}.log")
            st = scalars(run_dir, "train/step_time")
            if sorted(st) != list(range(1, a.steps + 1)):
                raise SystemExit(f"{run_dir}: expected step_time for steps 1..{a.steps}, got {sorted(st)}")
            step_times[method] += [st[s] for s in range(3, a.steps + 1)]
            loss = scalars(run_dir, "train/loss")
            runs.append({"method": method, "repeat": rep, "run_dir": str(run_dir), **r,
                         "step_time_mean_ms": 1000 * statistics.mean(st[s] for s in range(3, a.steps + 1)),
                         "final_loss": loss[a.steps], "first_loss": loss[1]})
            print(f"[bench] {method}#{rep}: {runs[-1]['step_time_mean_ms']:.1f} ms/step, "
                  f"{r['peak_rss_mib']:.0f} MiB, loss {loss[1]:.4f} -> {loss[a.steps]:.4f}", flush=True)
    for method in methods:
        mine = [x for x in runs if x["method"] == method]
        res_methods[method].update(
            step_time_mean_ms=1000 * statistics.mean(step_times[method]),
            step_time_median_ms=1000 * statistics.median(step_times[method]),
            step_time_stdev_ms=1000 * statistics.stdev(step_times[method]) if len(step_times[method]) > 1 else 0.0,
            peak_rss_mib=max(x["peak_rss_mib"] for x in mine), final_loss=mine[0]["final_loss"],
            first_loss=mine[0]["first_loss"])
        if method == "fpo":
            run0 = work / "run-fpo"
            for tag in ("feature_mse_chosen", "feature_mse_rejected", "sae_explained_variance", "union_size"):
                v = scalars(run0, f"train/{tag}")
                res_methods[method][f"{tag}_first_last"] = [v[1], v[a.steps]]
        res_methods[method]["eval"] = evaluate_policy(work / f"run-{method}" / "final", world.sft_dir,
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
                   "sae_stats": sae_meta.get("stats", {}), "response_tokens_per_pair": tokens,
                   "dense_bytes_per_pair": dense, "cache_bytes_per_pair": fpo_bytes, "ratio": fpo_bytes / dense,
                   "feature_bytes_per_pair": fpo_bytes - dpo_bytes, "feature_ratio": (fpo_bytes - dpo_bytes) / dense,
                   "payload_bytes_per_pair": payload_bytes_per_pair(work / "cache" / "fpo")}
        fpo_overhead = fpo_policy_overhead(world, sae_dir, layer=cfg.sae.layer, k=cfg.method.params.k,
                                           micro=a.micro_batch, reps=a.overhead_reps)
    else:
        fpo_overhead = None
    simpo = res_methods["simpo"]["step_time_mean_ms"]
    targets = {}
    if fpo_res:
        targets = {"cache_5pct": fpo_res["ratio"] <= 0.05,
                   "fpo_vs_simpo": res_methods["fpo"]["step_time_mean_ms"] / simpo,
                   "fpo_vs_tdpo2": (res_methods["fpo"]["step_time_mean_ms"] / res_methods["tdpo2"]["step_time_mean_ms"]
                                    if "tdpo2" in res_methods else float("nan"))}
    import torch

    cmd = "python benchmarks/bench_methods.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), "
                   f"torch {torch.__version__}, 1 thread per process",
        "command": cmd.strip(), "size": a.size, "steps": a.steps, "nproc": a.nproc, "repeats": a.repeats,
        "global_batch": a.micro_batch * a.nproc, "order": methods,
        "world": {k: world_meta.get(k, world_meta["settings"].get(k)) for k in
                  ("n_pairs", "hidden_size", "num_layers", "n_params")},
        "tdpo_topk": cfg.reference.topk, "methods": res_methods, "runs": runs, "fpo": fpo_res,
        "fpo_overhead": fpo_overhead, "targets": targets, "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "total_s": time.perf_counter() - t0,
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
