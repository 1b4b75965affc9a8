"""SePO (selective preference optimisation) on the demo: ρ sweep, weak-to-strong oracle, step and reference cost.

    .venv/bin/python benchmarks/bench_sepo.py --size default --steps 120 --seeds 0,1,2

On one demo world (built once; bench_quality's world, runs, evaluation and aggregation, imported):

* oracles: DPO on a seeded half of the pairs (the other half gives the held-out preference
  accuracy), as `sparsepo demo --method sepo` trains it, once from the small SFT model
  (`demo.small.prepare_small_sft`: 1/4 the width, ~8x fewer parameters: weak-to-strong) and once
  from the policy's own SFT model; cached in --workdir;
* reference side, per oracle: `reference.mode=precompute` fills the SePO cache (the oracle pair's
  token rewards r_t) in its own process, timed (wall, and the process's own CPU seconds, start-up
  included); the oracle pair's scoring alone, in this process on one thread (CPU time per pair over
  every training pair); the cache's bytes per pair (`bench_methods.cache_stats`) and its raw tensor
  payload (`bench_methods.payload_bytes_per_pair`); and what a live run sends over the bridge per
  pair instead (the bit-packed selection: `tests/test_live_sepo.message_bytes`, 64-token responses);
* quality: SePO at each ρ in --rhos with the small oracle, SePO at --policy-oracle-rho with the
  policy-size oracle, DPO (β=0.1) and SimPO, all for --steps steps on the same world, once per seed
  (`train.seed` and the evaluation sampler's seed), seed-major so they share the machine's load.
  Mean ± s.e. over seeds of win rate vs SFT, KL(policy‖SFT), reward, length, ended fraction, distinct-2
  (`bench_quality.run_one` / `aggregate`). SePO trains on the pairs its length filters keep
  (`method.min_response_tokens`), cycling them to reach the same number of steps;
* policy step cost, after the quality runs: CPU seconds of the training process itself per step =
  (CPU of a --step-steps run − CPU of a --short-steps run) / (step-steps − short-steps), for SimPO
  and SePO (ρ = --policy-oracle-rho, small oracle, on SimPO's pairs: `method.min_response_tokens=0`,
  its own cache filled first), --step-repeats rounds interleaved ABBA (longer
  runs than the quality ones, so the start-up's CPU jitter is spread over more steps); SePO ÷ SimPO
  per round and pooled (target ≤ 1.05: SePO's policy path adds only the selection mask). Also the
  TensorBoard `train/step_time` wall median (steps 3..N), which the neighbours' load moves much more.

Writes --json (default docs/bench_sepo.json) and a markdown block between its own markers in --doc
(default docs/benchmarks_sepo_spo.md; text outside the markers, and other sections, are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (run_process, cache_stats, payload_bytes_per_pair, scalars, write_doc)
import bench_quality as bq  # noqa: E402  (train_cmd, run_one, aggregate, mean_se, METRICS, RECIPE)

REPO = bq.REPO
BEGIN, END = "<!-- bench_sepo:begin -->", "<!-- bench_sepo:end -->"
BRIDGE_CITE = "tests/test_live_sepo.py::test_bridge_bytes_per_pair_selection_vs_scores"


def sepo_label(rho: str, oracle: str) -> str:
    return f"sepo[rho{rho}]" if oracle == "small" else f"sepo[rho{rho}-{oracle}]"


def parse_specs(a) -> dict[str, tuple[str, list[str], dict]]:
    """label -> (method, overrides without the oracle, info: oracle and ρ)."""
    specs: dict[str, tuple[str, list[str], dict]] = {}
    for rho in [x for x in a.rhos.split(",") if x]:
        specs[sepo_label(rho, "small")] = ("sepo", [f"method.rho={rho}"], {"oracle": "small", "rho": float(rho)})
    if a.policy_oracle_rho:
        r = a.policy_oracle_rho
        specs[sepo_label(r, "policy")] = ("sepo", [f"method.rho={r}"], {"oracle": "policy", "rho": float(r)})
    if a.baselines:
        specs["dpo β=0.1"] = ("dpo", ["method.beta=0.1"], {})
        specs["simpo"] = ("simpo", [], {})
    return specs


def prepare_oracle(world, work: Path, which: str, a) -> dict:
    """<work>/oracle-<which>: the demo's oracle recipe (cli.demo_oracle) from the small or the policy's SFT model."""
    from sparsepo.cli import launch_train
    from sparsepo.oracle_train import train_oracle

    if which == "small":
        from sparsepo.demo.small import MANIFEST, prepare_small_sft

        start = prepare_small_sft(world)
        n_params = json.loads((start / MANIFEST).read_text())["n_params"]
    else:
        start, n_params = Path(world.sft_dir), json.loads(world.meta_path.read_text())["n_params"]
    out, t = work / f"oracle-{which}", time.perf_counter()
    if not (out / "oracle.json").is_file():
        steps = [f"train.max_steps={a.oracle_steps}"] if a.oracle_steps else []
        train_oracle(str(bq.RECIPE), out, launch=launch_train, fraction=0.5, nproc=1, seed=0, model=str(start),
                     overrides=[f"data.path={world.train_path}", "logging.overwrite=true", "logging.progress=false",
                                *steps])
        print(f"[sepo] {which} oracle trained ({time.perf_counter() - t:.0f}s)", flush=True)
    m = json.loads((out / "oracle.json").read_text())
    return {"dir": str(out), "start": str(start), "n_params": n_params, "heldout_accuracy": m["heldout_accuracy"],
            "heldout_pairs": m["heldout_pairs"]}


def scoring_cpu_per_pair(world, oracle_dir: str) -> dict:
    """The oracle pair's token scoring alone, on one thread: CPU ms per pair over the pairs SePO trains on."""
    import torch

    from sparsepo.config import load_config
    from sparsepo.data import collate_pairs, gather_rows, load_preference_dataset
    from sparsepo.models import load_tokenizer
    from sparsepo.recipe import write_for_method
    from sparsepo.reference.oracle import OraclePair, read_manifest

    torch.set_num_threads(1)
    recipe = write_for_method(bq.RECIPE, "sepo", Path(oracle_dir) / "bench_recipe.yaml")
    cfg = load_config(recipe, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                               f"reference.oracle={oracle_dir}"])
    tok = load_tokenizer(str(world.sft_dir))
    ds, _ = load_preference_dataset(cfg.data, tok, run_dir=None)
    pair = OraclePair.load(read_manifest(oracle_dir))
    bs, cpu, tokens = cfg.reference.batch_size, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ds), bs):
            batch = collate_pairs(gather_rows(ds, list(range(start, min(start + bs, len(ds))))), tok.pad_token_id)
            t = time.process_time()
            pair.token_scores(batch)
            cpu += time.process_time() - t
            tokens += int(batch.response_mask.sum())
    return {"pairs": len(ds), "cpu_ms_per_pair": 1000 * cpu / len(ds), "response_tokens_per_pair": tokens / len(ds),
            "batch_size": bs}


def fill_cache(world, work: Path, name: str, ovs: list[str]) -> tuple[Path, dict]:
    """<work>/cache/<name> filled from scratch by a `reference.mode=precompute` process: (cache, run_process)."""
    cache = work / "cache" / name
    shutil.rmtree(cache, ignore_errors=True)
    _, cmd, log = bq.train_cmd(world, work, f"precompute-{name}", "sepo",
                               [*ovs, f"reference.cache_dir={cache}", "reference.mode=precompute"], 0, 1)
    return cache, bm.run_process(cmd, work / log)


def reference_side(world, work: Path, which: str, oracle: dict) -> dict:
    """Fill <work>/cache/sepo-<which> from scratch in its own process (timed), then measure it."""
    cache, proc = fill_cache(world, work, f"sepo-{which}", [f"reference.oracle={oracle['dir']}"])
    stats = bm.cache_stats(cache)
    out = {"cache_dir": str(cache), "precompute_wall_s": proc["wall_s"], "precompute_cpu_s": proc["cpu_s"],
           "cache_pairs": stats["pairs"], "cache_bytes_per_pair": stats["bytes_per_pair"],
           "payload_bytes_per_pair": bm.payload_bytes_per_pair(cache),
           "precompute_cpu_ms_per_pair": 1000 * proc["cpu_s"] / stats["pairs"],
           "scoring": scoring_cpu_per_pair(world, oracle["dir"])}
    print(f"[sepo] {which} oracle cache: {stats['pairs']} pairs, {stats['bytes_per_pair']:.0f} B/pair, precompute "
          f"{proc['wall_s']:.0f}s wall / {proc['cpu_s']:.1f}s CPU; scoring {out['scoring']['cpu_ms_per_pair']:.2f} "
          f"CPU ms/pair", flush=True)
    return out


def bridge_bytes() -> dict | None:
    """Per pair on the live bridge (64-token responses): the bit-packed selection vs float32 r_t, as the test measures."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_live_sepo import message_bytes
    except Exception as e:  # noqa: BLE001  (the figure is optional: cite the test instead)
        print(f"[sepo] bridge bytes not measured ({e!r})", flush=True)
        return None
    out = {}
    for name, sel in (("selection", True), ("float32_scores", False)):
        small, large = message_bytes(4, selection=sel), message_bytes(16, selection=sel)
        out[name] = {"bytes_per_pair": (large - small) / 12, "bytes_per_message": small - 4 * (large - small) / 12,
                     "message_bytes_8_pairs": message_bytes(8, selection=sel)}
    out["response_tokens"], out["selection_payload_bytes_per_pair"] = 64, 2 * 64 // 8
    return out


def step_timing(world, work: Path, specs: dict, ovs_of: dict, labels: list[str], a) -> list[dict]:
    """--step-repeats rounds of a --step-steps run and a --short-steps run of each label (seed 0), in ABBA
    order (long A, long B, short B, short A; the next round starts with B): CPU ms per step of each
    label = (long CPU − short CPU) / (step-steps − short-steps), the training process's own CPU."""
    out = []
    for rep in range(a.step_repeats):
        order = labels if rep % 2 == 0 else labels[::-1]
        got: dict[tuple[str, str], dict] = {}
        for kind, steps, sequence in (("long", a.step_steps, order), ("short", a.short_steps, order[::-1])):
            for label in sequence:
                run_dir, cmd, log = bq.train_cmd(world, work, f"time-{kind}-{label}-r{rep}", specs[label][0],
                                                 ovs_of[label], 0, steps)
                got[label, kind] = {**bm.run_process(cmd, work / log), "run_dir": run_dir}
        for label in labels:
            long, short = got[label, "long"], got[label, "short"]
            st = bm.scalars(long["run_dir"], "train/step_time")
            warm = [v for s, v in st.items() if s >= 3] or list(st.values())
            out.append({"label": label, "repeat": rep, "long_cpu_s": long["cpu_s"], "short_cpu_s": short["cpu_s"],
                        "cpu_ms_per_step": 1000 * (long["cpu_s"] - short["cpu_s"]) / (a.step_steps - a.short_steps),
                        "wall_step_median_ms": 1000 * statistics.median(warm) if warm else float("nan")})
            print(f"[sepo] step timing #{rep} {label}: {out[-1]['cpu_ms_per_step']:.1f} CPU ms/step, wall median "
                  f"{out[-1]['wall_step_median_ms']:.1f} ms", flush=True)
    return out


def step_summary(steps: list[dict], sepo: str) -> dict:
    per = {lab: [x for x in steps if x["label"] == lab] for lab in ("simpo", sepo)}
    def div(x: float, y: float) -> float:  # a 2-step smoke run's CPU difference can be 0
        return x / y if y > 0 else float("nan")

    ratios = [div(s["cpu_ms_per_step"], b["cpu_ms_per_step"]) for s, b in zip(per[sepo], per["simpo"])]
    cpu = {lab: statistics.mean(x["cpu_ms_per_step"] for x in v) for lab, v in per.items()}
    wall = {lab: statistics.median(x["wall_step_median_ms"] for x in v) for lab, v in per.items()}
    m, se = bq.mean_se(ratios)
    pooled = div(cpu[sepo], cpu["simpo"])
    return {"sepo_label": sepo, "cpu_ms_per_step": cpu, "wall_step_median_ms": wall, "ratio_per_round": ratios,
            "ratio_mean": m, "ratio_se": se, "ratio_median": statistics.median(ratios), "ratio_pooled": pooled,
            "wall_ratio": div(wall[sepo], wall["simpo"]),
            "target_met": pooled <= 1.05}


def pretty(label: str, info: dict) -> str:
    if not info:
        return {"simpo": "SimPO"}.get(label, label.replace("dpo", "DPO"))
    return f"SePO ρ={info['rho']:g}, {'small' if info['oracle'] == 'small' else 'policy-size'} oracle"


def render(res: dict) -> str:
    o, specs = res["oracles"], res["specs"]
    lines = [BEGIN, "", f"## SePO benchmark: ρ sweep, weak-to-strong, cost ({res['date']})", "",
             f"Measured on {res['machine']}; load average {res['load_before']} before, {res['load_after']} after. "
             "Command:", "", "```", res["command"], "```", "",
             f"World `{res['size']}` ({res['world']['n_pairs']} pairs, {res['world']['n_params']:,} policy parameters, "
             f"{res['world'].get('n_eval_prompts', '?')} held-out prompts × {res['eval_samples']} sample(s)); "
             f"{res['steps']} steps of {res['global_batch']} pairs for every run; seeds {res['seeds']}; mean ± s.e. "
             f"over seeds. SFT reference: length {res['reference_length']:.1f} tokens, reward "
             f"{res['reference_reward']:.2f}. Oracles (DPO on half the pairs, held-out preference accuracy on the "
             "other half): " + "; ".join(
                 f"{k} {v['n_params']:,} parameters, {100 * v['heldout_accuracy']:.1f}% on {v['heldout_pairs']}"
                 for k, v in o.items()) + ".", "",
             "| run | seeds | " + " | ".join(h for _, h, _ in bq.METRICS) + " | train wall s (median) |",
             "|---|---|" + "---|" * len(bq.METRICS) + "---|"]
    for label, s in res["methods"].items():
        cells = [f"{s[k]:{f}} ± {s[k + '_se']:{f}}" for k, _, f in bq.METRICS]
        lines.append(f"| {pretty(label, specs[label][2])} | {s['n_seeds']} | " + " | ".join(cells)
                     + f" | {s['train_wall_s_median']:.0f} |")
    st = res.get("step")
    if st:
        sepo = st["sepo_label"]
        lines += ["", "**Policy step cost** (CPU seconds of the training process itself, "
                  f"{res['step_steps']}-step run − {res['short_steps']}-step run, per step; "
                  f"{len(st['ratio_per_round'])} rounds interleaved ABBA, seed 0; "
                  "SePO with `method.min_response_tokens=0`, so both step over the same "
                  f"{res['world']['n_pairs']} pairs in the same order): "
                  f"SimPO {st['cpu_ms_per_step']['simpo']:.1f} ms, {pretty(sepo, specs[sepo][2])} "
                  f"{st['cpu_ms_per_step'][sepo]:.1f} ms: **{st['ratio_pooled']:.3f}× SimPO** (per round "
                  + ", ".join(f"{x:.3f}" for x in st["ratio_per_round"]) + f"; mean {st['ratio_mean']:.3f} ± "
                  f"{st['ratio_se']:.3f}, median {st['ratio_median']:.3f}) — target ≤ 1.05 "
                  f"**{'met' if st['target_met'] else 'missed'}**. Wall "
                  f"`train/step_time` median (steps 3..N of the long runs, median over rounds): SimPO "
                  f"{st['wall_step_median_ms']['simpo']:.1f} ms, SePO {st['wall_step_median_ms'][sepo]:.1f} ms "
                  f"({st['wall_ratio']:.2f}×; the neighbours' load moves it)."]
    lines += ["", "**Reference side** (SePO's cache holds the oracle pair's token rewards r_t: ρ does not key it, "
              "so every ρ reads one cache per oracle):", "",
              "| oracle | pairs cached | precompute wall s | precompute CPU s (ms/pair, start-up included) | "
              "oracle-pair scoring CPU ms/pair (1 thread) | cache B/pair | raw tensor payload B/pair |",
              "|---|---|---|---|---|---|---|"]
    for k, r in res["reference"].items():
        sc = r["scoring"]
        lines.append(f"| {k} ({o[k]['n_params']:,} params) | {r['cache_pairs']} | {r['precompute_wall_s']:.0f} | "
                     f"{r['precompute_cpu_s']:.1f} ({r['precompute_cpu_ms_per_pair']:.1f}) | "
                     f"{sc['cpu_ms_per_pair']:.2f} | {r['cache_bytes_per_pair']:,.0f} | "
                     + ", ".join(f"{f} {v:,.0f}" for f, v in r["payload_bytes_per_pair"].items()) + " |")
    tok = next(iter(res["reference"].values()))["scoring"]["response_tokens_per_pair"]
    lines += ["", f"Mean response tokens per pair (chosen + rejected) of the pairs SePO trains on: {tok:.1f}."]
    b = res.get("bridge")
    if b:
        lines += ["", f"**Bridge** (live mode: the reference group sends each batch's bit-packed selection, not "
                  f"r_t), 64-token responses, measured as `{BRIDGE_CITE}` does: selection "
                  f"{b['selection']['bytes_per_pair']:.0f} B/pair (of which {b['selection_payload_bytes_per_pair']} B "
                  f"are the bits) + {b['selection']['bytes_per_message']:.0f} B per message; float32 r_t would be "
                  f"{b['float32_scores']['bytes_per_pair']:.0f} B/pair + {b['float32_scores']['bytes_per_message']:.0f}"
                  f" B per message. One message of 8 pairs: {b['selection']['message_bytes_8_pairs']:,} B vs "
                  f"{b['float32_scores']['message_bytes_8_pairs']:,} B."]
    lines += ["", "Per run (run, seed: win rate, KL, length, ended, train CPU s): " + "; ".join(
        f"{r['label']} s{r['seed']}: {r['win_rate']:.3f}, {r['kl']:.1f}, {r['policy_length']:.1f}, "
        f"{r['policy_ended_fraction']:.2f}, {r['train_cpu_s']:.0f}" for r in res["runs"])
        + f". Total {res['total_s'] / 60:.1f} min.", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", choices=["default", "tiny"])
    p.add_argument("--workdir", default="runs/bench-sepo")
    p.add_argument("--world", default=None, help="an existing demo world directory (default: <workdir>/world)")
    p.add_argument("--extensions-dir", default=None,
                   help="TORCH_EXTENSIONS_DIR of the runs (default: <workdir>/torch_extensions; '' = torch's default)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--step-steps", type=int, default=300, help="length of a step-timing run (data cycles)")
    p.add_argument("--short-steps", type=int, default=5, help="length of the step-timing run subtracted for CPU/step")
    p.add_argument("--step-repeats", type=int, default=3, help="interleaved step-timing rounds (SimPO vs SePO)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rhos", default="0.1,0.3,0.5,1.0", help="SePO ρ values with the small oracle")
    p.add_argument("--policy-oracle-rho", default="0.3", help="ρ of the policy-size-oracle run ('' = none)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip DPO β=0.1 and SimPO")
    p.add_argument("--oracle-steps", type=int, default=None, help="oracle DPO steps (default: one epoch, as the demo)")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per held-out prompt")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks_sepo_spo.md"))
    p.add_argument("--json", default=str(REPO / "docs" / "bench_sepo.json"))
    a = p.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    work, world, meta = bq.open_world(a)
    specs = parse_specs(a)
    oracles = {k: prepare_oracle(world, work, k, a) for k in sorted({i["oracle"] for _, _, i in specs.values() if i})}
    reference = {k: reference_side(world, work, k, o) for k, o in oracles.items()}
    ovs_of = {lab: [*(["reference.oracle=" + oracles[i["oracle"]]["dir"],
                       f"reference.cache_dir={reference[i['oracle']]['cache_dir']}"] if i else []), *ovs]
              for lab, (_, ovs, i) in specs.items()}
    timed = [lab for lab in ("simpo", sepo_label(a.policy_oracle_rho, "small")) if lab in specs]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    runs = []
    for seed in seeds:  # seed-major: every run sees the same stretch of machine load per seed
        for label in specs:
            runs.append(bq.run_one(world, work, label, specs[label][0], ovs_of[label], seed, a))
    steps = []
    if len(timed) == 2:  # SePO on SimPO's pairs (no length filter), so both step over the same data
        sepo_all = [o for o in ovs_of[timed[1]] if not o.startswith("reference.cache_dir=")]
        sepo_all += ["method.min_response_tokens=0"]
        cache, _ = fill_cache(world, work, "sepo-small-all", sepo_all)
        steps = step_timing(world, work, specs, {**ovs_of, timed[1]: [*sepo_all, f"reference.cache_dir={cache}"]},
                            timed, a)
    import torch

    from sparsepo.config import load_config

    cfg = load_config(bq.RECIPE, [])
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other engineers' jobs, torch "
                      f"{torch.__version__}, 1 thread per process",
           "command": ("python benchmarks/bench_sepo.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
           "size": a.size, "steps": a.steps, "short_steps": a.short_steps, "step_steps": a.step_steps, "seeds": seeds,
           "eval_samples": a.eval_samples, "global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum,
           "world": {k: meta.get(k, meta.get("settings", {}).get(k)) for k in ("n_pairs", "n_params", "n_eval_prompts")},
           "reference_length": statistics.mean(r["reference_length"] for r in runs),
           "reference_reward": statistics.mean(r["reference_reward"] for r in runs),
           "specs": specs, "oracles": oracles, "reference": reference, "bridge": bridge_bytes(),
           "methods": bq.aggregate(runs, list(specs)), "runs": runs, "step_runs": steps,
           "step": step_summary(steps, timed[1]) if len(timed) == 2 else None, "load_before": load_before,
           "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()), "total_s": time.perf_counter() - t0}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    block = render(res)
    bm.write_doc(Path(a.doc), block, title="SePO and SPO", begin=BEGIN, end=END)
    print(block)
    print(f"[sepo] wrote {a.json} and {a.doc} ({res['total_s']:.0f}s)")
    return res


if __name__ == "__main__":
    main()
