"""Quality with error bars: DPO (β sweep), SimPO, SePO, SPO (α sweep) (and FPO) over several training seeds.

    .venv/bin/python benchmarks/bench_quality.py --size default --steps 120 --seeds 0,1,2
    .venv/bin/python benchmarks/bench_quality.py --methods dpo,spo --dpo-betas 0.1 --spo-alphas 0.5,1,2,4 \
        --doc docs/benchmarks_sepo_spo.md --json docs/bench_spo_alpha.json     # SPO's α against diversity

On one demo world (built once, fixed: same SFT model, pairs and held-out prompts), every method is
trained for the same number of steps on the same data (`sparsepo/recipes/demo.yaml` re-targeted at
the method, as `sparsepo demo --method X` does), once per seed in --seeds (`train.seed`: data order,
and SPO's sampling), one process each; runs are interleaved (seed-major) so a noisy neighbour hurts
every method alike. Each final policy is scored by `sparsepo.demo.evaluate_policy` against the SFT
reference under the demo's ground-truth reward, with the evaluation sampler seeded by the same seed
(so the spread covers both training and evaluation noise):

* win rate vs SFT, KL(policy‖ref) per sequence, mean response length (tokens), fraction of samples
  that end with eos within the budget, distinct-2 (unique word bigrams / word bigrams over all the
  policy's samples: low = repetitive), distinct-1, and the word entropy of the samples (nats of the
  unigram distribution of every word the policy wrote: low = a narrow vocabulary);
* the table gives mean ± standard error over seeds (s.e. = sample stdev / sqrt(n seeds)).

Method settings: each keeps its loss-table defaults except the DPO β sweep (--dpo-betas) and the SPO
α sweep (--spo-alphas; empty: one `spo` row at the default α). SePO's
oracle (DPO on a seeded half of the pairs, as `sparsepo demo --method sepo`) and FPO's SAE
(--sae-steps steps) are trained once per world before any run, cached in --workdir. A finished
run keeps its result in <run dir>/quality_row.json and is reused when the command line of its
training and the evaluation settings are the same, so adding a method or a seed trains only those.

Writes --json (default docs/bench_quality.json), the table between markers in --doc (default
docs/benchmarks_quality.md; text outside the markers is kept) and, when matplotlib is importable,
a reward-vs-KL frontier PNG next to the doc (--plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402  (run_process: wall, own CPU, peak RSS of a training process)

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "sparsepo" / "recipes" / "demo.yaml"
BEGIN, END = "<!-- bench_quality:begin -->", "<!-- bench_quality:end -->"
METRICS = (("win_rate", "win rate vs SFT", ".3f"), ("kl", "KL(policy‖ref)", ".2f"),
           ("policy_reward", "reward", ".2f"), ("policy_length", "length (tokens)", ".1f"),
           ("policy_ended_fraction", "ended fraction", ".3f"), ("distinct2", "distinct-2", ".3f"),
           ("distinct1", "distinct-1", ".3f"), ("word_entropy", "word entropy (nats)", ".2f"))
METRICS_VERSION = 2  # a cached quality_row.json of another version is recomputed (it lacks newer metrics)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over every text (0 when there are none)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def word_entropy(texts: list[str]) -> float:
    """Entropy (nats) of the unigram distribution of every word in `texts` (0 when there are none)."""
    counts = Counter(w for t in texts for w in t.split())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.mean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def parse_specs(a) -> dict[str, tuple[str, list[str]]]:
    """label -> (method, overrides)."""
    specs: dict[str, tuple[str, list[str]]] = {}
    for m in [x for x in a.methods.split(",") if x]:
        if m == "dpo":
            for b in [x for x in a.dpo_betas.split(",") if x]:
                specs[f"dpo β={b}"] = ("dpo", [f"method.beta={b}"])
        elif m == "spo" and a.spo_alphas:
            for x in [x for x in a.spo_alphas.split(",") if x]:  # "α" or "α:β" (β: the KL weight)
                alpha, _, beta = x.partition(":")
                specs[f"spo α={alpha}" + (f" β={beta}" if beta else "")] = (
                    "spo", [f"method.alpha={alpha}"] + ([f"method.beta={beta}"] if beta else []))
        else:
            specs[m] = (m, [])
    return specs


def side_inputs(world, work: Path, methods: set[str], a) -> dict[str, list[str]]:
    """Per method: the extra overrides its inputs need (SePO oracle, FPO SAE, SPO inline reference)."""
    from sparsepo.losses import get_method

    extra: dict[str, list[str]] = {}
    for m in methods:
        spec, ovs = get_method(m), []
        if spec.needs_policy_samples:
            ovs.append("reference.mode=inline")  # samples drawn in training: no cache can hold them
        if spec.needs_oracle_scores:
            out = work / "oracle"
            if not (out / "oracle.json").is_file():
                from sparsepo.cli import launch_train
                from sparsepo.oracle_train import train_oracle

                t = time.perf_counter()
                train_oracle(str(RECIPE), out, launch=launch_train, fraction=0.5, nproc=1, seed=0,
                             overrides=[f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                        "logging.overwrite=true", "logging.progress=false"])
                print(f"[quality] SePO oracle trained ({time.perf_counter() - t:.0f}s)", flush=True)
            ovs.append(f"reference.oracle={out}")
        if spec.needs_sae_features:
            from sparsepo.config import load_config
            from sparsepo.sae import SIDECAR
            from sparsepo.sae.runtime import train_for_run

            out = work / f"sae-{a.sae_steps}"
            if not (out / SIDECAR).is_file():
                cfg = load_config(RECIPE, [f"model.path={world.sft_dir}", f"data.path={world.train_path}",
                                           "method.name=fpo", f"sae.path={out}", "logging.progress=false"])
                train_for_run(cfg, out, steps=a.sae_steps)
            ovs.append(f"sae.path={out}")
        extra[m] = ovs
    return extra


def train_cmd(world, work: Path, label: str, method: str, ovs: list[str], seed: int, steps: int):
    """(run directory, training command, log name) of one run."""
    from sparsepo.recipe import write_for_method

    slug = label.replace(" β=", "-b").replace(" α=", "-a").replace("[", "-").replace("]", "")
    run_dir = work / f"run-{slug}-s{seed}"
    recipe = write_for_method(RECIPE, method, work / f"recipe-{method}.yaml")
    cmd = [sys.executable, "-m", "sparsepo.train", "--config", str(recipe), f"model.path={world.sft_dir}",
           f"data.path={world.train_path}", f"logging.output_dir={run_dir}", "logging.overwrite=true",
           "logging.progress=false", f"train.max_steps={steps}", f"train.seed={seed}",
           f"reference.cache_dir={work / 'cache' / method}", "checkpoint.at_end=false", *ovs]  # no checkpoint unless asked
    return run_dir, cmd, f"train-{slug}-s{seed}.log"


def run_one(world, work: Path, label: str, method: str, ovs: list[str], seed: int, a) -> dict:
    from sparsepo.demo import evaluate_policy

    run_dir, cmd, log_name = train_cmd(world, work, label, method, ovs, seed, a.steps)
    key = {"cmd": cmd[2:], "eval_samples": a.eval_samples, "metrics": METRICS_VERSION}
    done = run_dir / "quality_row.json"
    if done.is_file() and (row := json.loads(done.read_text())).get("key") == key:
        print(f"[quality] {label} seed {seed}: reusing {done}", flush=True)
        return row
    proc = bm.run_process(cmd, work / log_name)
    t = time.perf_counter()
    ev = evaluate_policy(run_dir / "final", world.sft_dir, world.eval_prompts_path, seed=seed,
                         samples_per_prompt=a.eval_samples, progress=False, num_threads=1, return_samples=True)
    texts = [s["policy"] for s in ev.pop("samples")]
    ev.update(distinct2=distinct_n(texts), distinct1=distinct_n(texts, 1), word_entropy=word_entropy(texts))
    row = {"label": label, "method": method, "seed": seed, "overrides": ovs, "train_wall_s": proc["wall_s"],
           "train_cpu_s": proc["cpu_s"], "eval_s": time.perf_counter() - t, **ev, "key": key}
    done.write_text(json.dumps(row))  # a rerun with more methods or seeds reuses this run
    print(f"[quality] {label} seed {seed}: win {ev['win_rate']:.3f} KL {ev['kl']:.2f} len "
          f"{ev['policy_length']:.1f} ended {ev['policy_ended_fraction']:.2f} d2 {ev['distinct2']:.3f} "
          f"H {ev['word_entropy']:.2f} "
          f"(train {proc['wall_s']:.0f}s, eval {row['eval_s']:.0f}s)", flush=True)
    return row


def aggregate(runs: list[dict], labels: list[str]) -> dict[str, dict]:
    out = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        if not mine:
            continue
        out[label] = {"n_seeds": len(mine), "method": mine[0]["method"], "overrides": mine[0]["overrides"]}
        for key, _, _ in METRICS:
            m, se = mean_se([r[key] for r in mine])
            out[label][key], out[label][key + "_se"] = m, se
        out[label]["reference_length"] = statistics.mean(r["reference_length"] for r in mine)
        out[label]["reference_reward"] = statistics.mean(r["reference_reward"] for r in mine)
        out[label]["train_wall_s_median"] = statistics.median(r["train_wall_s"] for r in mine)
    return out


def render(res: dict) -> str:
    lines = [BEGIN, "", f"Measured {res['date']} on {res['machine']}; load average {res['load_before']} before, "
             f"{res['load_after']} after. Command:", "", "```", res["command"], "```", "",
             f"World `{res['size']}` ({res['world']['n_pairs']} pairs, {res['world']['n_params']:,} parameters, "
             f"{res['world'].get('n_eval_prompts', '?')} held-out prompts × {res['eval_samples']} sample(s)); "
             f"{res['steps']} steps of {res['global_batch']} pairs for every method; seeds {res['seeds']} "
             f"(`train.seed`, and the evaluation sampler's seed). Mean ± s.e. over seeds. SFT reference: "
             f"length {res['reference_length']:.1f} tokens, reward {res['reference_reward']:.2f}.", "",
             "| method | seeds | " + " | ".join(h for _, h, _ in METRICS) + " | train wall s (median) |",
             "|---|---|" + "---|" * len(METRICS) + "---|"]
    for label, s in res["methods"].items():
        cells = [f"{s[k]:{f}} ± {s[k + '_se']:{f}}" for k, _, f in METRICS]
        lines.append(f"| {label} | {s['n_seeds']} | " + " | ".join(cells) + f" | {s['train_wall_s_median']:.0f} |")
    lines += ["", "Per run (label, seed: win rate, KL, length, ended, distinct-2, word entropy, train wall s): " + "; ".join(
        f"{r['label']} s{r['seed']}: {r['win_rate']:.3f}, {r['kl']:.2f}, {r['policy_length']:.1f}, "
        f"{r['policy_ended_fraction']:.2f}, {r['distinct2']:.3f}, {r['word_entropy']:.2f}, {r['train_wall_s']:.0f}"
        for r in res["runs"])
        + f". Total {res['total_s'] / 60:.1f} min.", ""]
    lines.append(f"Frontier plot: [{Path(res['plot']).name}]({Path(res['plot']).name})" if res.get("plot")
                 else "Frontier plot: not drawn (matplotlib is not installed in this venv); read the "
                      "win-rate and KL columns together.")
    return "\n".join(lines + ["", END])


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, s in res["methods"].items():
        ax.errorbar(s["kl"], s["win_rate"], xerr=s["kl_se"], yerr=s["win_rate_se"], fmt="o", capsize=3, label=label)
    ax.set_xscale("symlog")
    ax.set_xlabel("KL(policy‖SFT) per sequence (nats)")
    ax.set_ylabel("win rate vs SFT (ground-truth reward)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def open_world(a) -> tuple[Path, object, dict]:
    """(--workdir resolved, the demo world of --world or <workdir>/world at --size, its metadata);
    points the runs at a private JIT-op cache (--extensions-dir; see bench_methods' docstring)."""
    from sparsepo.demo import prepare_world

    work = Path(a.workdir).resolve()
    bm.EXTENSIONS_DIR = work / "torch_extensions" if a.extensions_dir is None else (
        Path(a.extensions_dir).resolve() if a.extensions_dir else None)
    world = prepare_world(Path(a.world) if a.world else work / "world", size=a.size, progress=False)
    return work, world, json.loads(world.meta_path.read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="default", choices=["default", "tiny"])
    p.add_argument("--workdir", default="runs/bench-quality")
    p.add_argument("--world", default=None, help="an existing demo world directory (default: <workdir>/world)")
    p.add_argument("--extensions-dir", default=None,
                   help="TORCH_EXTENSIONS_DIR of the runs (default: <workdir>/torch_extensions; '' = torch's default)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="dpo,simpo,sepo,spo")
    p.add_argument("--dpo-betas", default="0.05,0.1,0.3")
    p.add_argument("--spo-alphas", default="", help="SPO's α sweep, e.g. 0.5,1,2,4, each optionally α:β with its KL weight "
                   "(0.5:0.3; default β 0.1); default: one row at α=1")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per held-out prompt")
    p.add_argument("--sae-steps", type=int, default=300, help="FPO's SAE training steps (only with fpo)")
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks_quality.md"))
    p.add_argument("--json", default=str(REPO / "docs" / "bench_quality.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: <doc dir>/bench_quality_frontier.png)")
    a = p.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    work, world, meta = open_world(a)
    specs = parse_specs(a)
    extra = side_inputs(world, work, {m for m, _ in specs.values()}, a)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    runs = []
    for seed in seeds:  # seed-major: every method sees the same stretch of machine load per seed
        for label, (method, ovs) in specs.items():
            runs.append(run_one(world, work, label, method, [*extra[method], *ovs], seed, a))
    import torch

    from sparsepo.config import load_config

    cfg = load_config(RECIPE, [])
    methods = aggregate(runs, list(specs))
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other engineers' jobs, torch "
                      f"{torch.__version__}, 1 thread per process",
           "command": ("python benchmarks/bench_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
           "size": a.size, "steps": a.steps, "seeds": seeds, "eval_samples": a.eval_samples,
           "global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum,
           "world": {k: meta.get(k, meta.get("settings", {}).get(k)) for k in ("n_pairs", "n_params", "n_eval_prompts")},
           "reference_length": statistics.mean(r["reference_length"] for r in runs),
           "reference_reward": statistics.mean(r["reference_reward"] for r in runs),
           "methods": methods, "runs": runs, "load_before": load_before,
           "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()), "total_s": time.perf_counter() - t0}
    doc = Path(a.doc)
    res["plot"] = plot(res, Path(a.plot) if a.plot else doc.parent / "bench_quality_frontier.png")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    block = render(res)
    bm.write_doc(doc, block, title="Quality with error bars", begin=BEGIN, end=END)
    print(block)
    print(f"[quality] wrote {a.json} and {doc} ({res['total_s']:.0f}s)")
    return res


if __name__ == "__main__":
    main()
