"""Speed and memory against TRL's DPOTrainer: same model, tokenizer, data and optimiser, 1 process, 1 thread.

    python3 -m venv /tmp/trlvenv && PIP_CONSTRAINT=constraints.txt /tmp/trlvenv/bin/pip install torch==2.13.0 trl
    .venv/bin/python benchmarks/bench_trl.py --trl-python /tmp/trlvenv/bin/python --steps 40 --rounds 3

TRL is an optional extra (`pip install -e .[bench]`); it runs in its own interpreter (--trl-python),
so nothing in sparsepo imports it. Setup, shared by every system:

* model: a random-init Llama built from `LlamaConfig` (--size tiny: vocabulary 1000, hidden 64, 2 layers,
  intermediate 128; small: vocabulary 8000, hidden 256, 4 layers, intermediate 688; 4 heads, seed 0) with
  the default demo world's BPE tokenizer (696 ids: ids above 695 never occur), in <workdir>/model-<size>;
* data: pairs whose prompt is 16 tokens (bos + 15 single-token words) and whose responses are 48
  tokens (47 words + eos), checked on both sides after tokenisation (the lengths are in the JSON);
* DPO β 0.1 (sigmoid), AdamW lr 5e-4, betas (0.9, 0.999), no weight decay, constant schedule with
  no warm-up, gradient clipping 1.0, batch 4 pairs, fp32, OMP_NUM_THREADS=1 and torch 1 thread.

Systems: TRL inline (ref_model=None: TRL copies the model and runs it each step), TRL
precompute_ref_log_probs=True (reference pass over the data at start), sparsepo DPO with
reference.mode=inline (reference forward inside the step) and reference.mode=cache (the cache is
filled once beforehand, in its own process, not timed), DeepSpeed with --stage-file on one CPU rank.

Per process: step time = wall time of each optimiser step measured inside the trainer (sparsepo:
its `train/step_time` from metrics.jsonl, collate + reference + forward + loss + backward + step; TRL: a callback from
on_step_begin to on_step_end, which holds the same work); median over steps 3..N. Peak RSS = the
process's VmHWM (polled from /proc). CPU ms/step = (CPU s of the --steps process - of a --short-steps
one) / (steps - short), which a busy neighbour barely moves. --rounds interleaves the four systems: the
table gives the median over rounds of each round's median and the spread. --profile-steps N: cProfile
of a sparsepo inline and a TRL inline run of N steps, where each one's step time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT, RESPONSE, BATCH, LR, BETA, CLIP = 16, 48, 4, 5e-4, 0.1, 1.0
SIZES = {"tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2),  # --size
         "small": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4)}  # matmuls lead
SIZE = ["tiny"]
STAGE_FILE = ["zero3.json"]  # --stage-file (one_gpu.json: ZeRO-2 without overlap, the file for one process)
ATTN = "sdpa"  # both sides: sparsepo's model.attn_implementation and TRL's from_pretrained
SPARSEPO_SETTINGS = {"gradient_checkpointing": False, "bf16": False, "dtype": "torch.float32", "attn_implementation": ATTN,
                     "optim": "torch AdamW (fused, optim.implementation=auto) through DeepSpeed (1 rank)", "torch_threads": 1,
                     "step_timer": "train/step_time: collate + reference (cache read or inline forward) + forward + "
                                   "loss + backward + clip + AdamW step (metrics logging not timed)",
                     "report_to": "[] (metrics.jsonl only; TRL: report_to=[])"}
SYSTEMS = ("trl-inline", "trl-precompute", "sparsepo-inline", "sparsepo-cache")


def single_token_words(tok) -> list[str]:
    """Vocabulary entries that are one whole word (a '▁w' / 'Ġw' piece) which encodes to exactly that id,
    returned with a leading space so that words concatenate into text."""
    words = []
    for piece, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if piece[:1] in ("▁", "Ġ") and piece[1:].isalpha() and tok(piece[1:], add_special_tokens=False)["input_ids"] == [idx]:
            words.append(" " + piece[1:])
    return words


def build_inputs(work: Path, tokenizer_dir: Path, n_pairs: int) -> dict:  # the model of --size, in <work>/model
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model_dir = work / f"model-{SIZE[0]}"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(**{**SIZES[SIZE[0]], "vocab_size": max(SIZES[SIZE[0]]["vocab_size"], len(tok))},
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    words = single_token_words(tok)
    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choices(words, k=PROMPT - 1)).lstrip(),
             "chosen": "".join(rng.choices(words, k=RESPONSE - 1)),
             "rejected": "".join(rng.choices(words, k=RESPONSE - 1))} for _ in range(n_pairs)]
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(model_dir).parameters())
    return {"model": str(model_dir), "data": str(data), "size": SIZE[0], **SIZES[SIZE[0]], "vocab": SIZES[SIZE[0]]["vocab_size"], "tokenizer_vocab": len(tok), "words": len(words), "n_params": n_params}


def sparsepo_lengths(inputs: dict) -> dict:
    from sparsepo import data as pdata
    from sparsepo.config import load_config
    from sparsepo.models import load_tokenizer

    cfg = load_config(None, sparsepo_overrides(inputs, Path("/tmp/unused"), "cache", 1))
    ds, _ = pdata.load_preference_dataset(cfg.data, load_tokenizer(inputs["model"]))
    return {k: sorted({len(x) for x in ds[k]}) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def sparsepo_overrides(inputs: dict, run_dir: Path, mode: str, steps: int) -> list[str]:
    return [f"model.path={inputs['model']}", f"data.path={inputs['data']}", "data.max_length=128",
            "data.max_prompt_length=32", "method.name=dpo", f"method.beta={BETA}", f"optim.lr={LR}",
            "optim.schedule=constant", "optim.warmup_steps=0", f"model.attn_implementation={ATTN}",
            "model.gradient_checkpointing=false", "checkpoint.at_end=false", "optim.weight_decay=0.0", f"optim.grad_clip={CLIP}",
            f"train.micro_batch_size={BATCH}", f"train.max_steps={steps}", "train.seed=0",
            f"reference.mode={mode}", f"reference.cache_dir={run_dir.parent / 'sparsepo-cache'}",
            f"logging.output_dir={run_dir}", "logging.log_every=1", "logging.report_to=[]", "logging.overwrite=true",
            "logging.progress=false",
            f"deepspeed.stage_file={STAGE_FILE[0]}"]


def trl_args(a, config_cls) -> dict:
    """DPOConfig keyword arguments that match sparsepo's run: TRL's DPOConfig defaults gradient
    checkpointing to True (every forward recomputed in backward) and bf16 to True; sparsepo runs
    neither here. transformers 5.25 renamed the flag `activation_checkpointing` (the old name an alias)."""
    import dataclasses

    kw = dict(output_dir=a.run_dir, per_device_train_batch_size=BATCH, learning_rate=LR, max_grad_norm=CLIP,
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
              adam_epsilon=1e-8, max_steps=a.steps, beta=BETA, max_length=128, precompute_ref_log_probs=a.precompute,
              use_cpu=True, bf16=False, save_strategy="no", report_to=[], logging_steps=10, seed=0,
              dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(config_cls)}:
        kw["activation_checkpointing"] = False
    return kw


def trl_settings(trainer) -> dict:
    """What TRL actually runs with (read back from the trainer, not from what we asked for)."""
    args, model = trainer.args, trainer.model
    return {"gradient_checkpointing": bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
                                           or getattr(model, "is_gradient_checkpointing", False)),
            "bf16": bool(args.bf16), "fp16": bool(args.fp16), "dtype": str(next(model.parameters()).dtype),
            "attn_implementation": model.config._attn_implementation, "padding_free": bool(args.padding_free),
            "precompute_ref_log_probs": bool(args.precompute_ref_log_probs), "loss_type": str(args.loss_type),
            "optim": str(args.optim), "torch_threads": __import__("torch").get_num_threads(),
            "step_timer": "on_step_begin -> on_step_end: forward(s) + loss + backward + clip + AdamW step; "
                          "the batch is fetched and collated before on_step_begin (not timed)"}


def trl_worker(a) -> None:
    """Runs under --trl-python: one TRL DPOTrainer run; writes step times and dataset lengths to a.out."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(1)
    times, t = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            t[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - t[0])

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=ATTN)
    args = DPOConfig(**trl_args(a, DPOConfig))
    ds = load_dataset("json", data_files=a.data, split="train")
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    settings = trl_settings(trainer)
    if settings["gradient_checkpointing"] or settings["bf16"]:
        raise SystemExit(f"TRL's settings do not match sparsepo's (no checkpointing, fp32): {settings}")
    lens = {k: sorted({len(x) for x in trainer.train_dataset[k]}) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    if a.profile_out:
        import cProfile

        cProfile.runctx("trainer.train()", globals(), {"trainer": trainer}, a.profile_out)
    else:
        trainer.train()
    Path(a.out).write_text(json.dumps({"step_times": times, "lengths": lens, "settings": settings}))


def one_process(name: str, inputs: dict, work: Path, a, tag: str, steps: int):
    run_dir = work / f"{name}-{tag}"
    if name.startswith("trl"):
        out = work / f"{name}-{tag}.json"
        cmd = [a.trl_python, str(Path(__file__).resolve()), "--worker", "--model", inputs["model"], "--data",
               inputs["data"], "--steps", str(steps), "--run-dir", str(run_dir), "--out", str(out)]
        cmd += ["--precompute"] if name == "trl-precompute" else []
        proc = bm.run_process(cmd, work / f"{name}-{tag}.log")
        got = json.loads(out.read_text())
        return proc, got["step_times"], got
    mode = name.split("-")[1]
    cmd = [sys.executable, "-m", "sparsepo.train", *sparsepo_overrides(inputs, run_dir, mode, steps)]
    proc = bm.run_process(cmd, work / f"{name}-{tag}.log")
    st = bm.scalars(run_dir, "train/step_time")
    return proc, [st[s] for s in sorted(st)], {}


def run_system(name: str, inputs: dict, work: Path, a, rnd: int) -> dict:
    """A --short-steps run then a --steps run of one system: in-trainer step times of the long run,
    and CPU ms per step = (process CPU of the long run - of the short run) / (steps - short)."""
    short, _, _ = one_process(name, inputs, work, a, f"r{rnd}-short", a.short_steps)
    proc, times, got = one_process(name, inputs, work, a, f"r{rnd}", a.steps)
    kept = times[2:] or times
    row = {"system": name, "round": rnd, "steps": len(times), "median_step_s": statistics.median(kept),
           "mean_step_s": statistics.mean(kept), "peak_rss_mib": proc["peak_rss_mib"], "wall_s": proc["wall_s"],
           "cpu_s": proc["cpu_s"], "short_cpu_s": short["cpu_s"],
           "cpu_ms_per_step": 1000 * (proc["cpu_s"] - short["cpu_s"]) / (a.steps - a.short_steps),
           "lengths": got.get("lengths"), "settings": got.get("settings")}
    print(f"[trl-bench] {name} r{rnd}: {1000 * row['median_step_s']:.1f} ms/step median, {row['cpu_ms_per_step']:.1f} "
          f"CPU ms/step, {row['peak_rss_mib']:.0f} MiB, wall {proc['wall_s']:.0f}s", flush=True)
    return row


PROFILE_PARTS = {  # (path fragment, function) -> label; cumulative time per step
    ("sparsepo/trainer.py", "train"): "sparsepo: train() incl. setup/finish",
    ("sparsepo/trainer.py", "setup"): "sparsepo: setup (engine, data, reference)",
    ("sparsepo/trainer.py", "finish"): "sparsepo: finish (gather, save)",
    ("sparsepo/trainer.py", "micro_step"): "sparsepo: micro_step",
    ("sparsepo/models.py", "pair_forward"): "pair_forward (policy and reference)",
    ("deepspeed/runtime/engine.py", "forward"): "DeepSpeed engine forward (policy)",
    ("deepspeed/runtime/engine.py", "backward"): "DeepSpeed engine backward",
    ("deepspeed/runtime/engine.py", "step"): "DeepSpeed engine step (clip + Adam + ZeRO-3 bookkeeping)",
    ("torch/_tensor.py", "backward"): "torch autograd backward",
    ("torch/optim/optimizer.py", "wrapper"): "torch optimizer step",
    ("torch/optim/adam.py", "step"): "torch Adam step", ("torch/optim/adamw.py", "step"): "torch AdamW step",
    ("sparsepo/metrics.py", "log"): "sparsepo: metrics log",
    ("trl/trainer/dpo_trainer.py", "compute_loss"): "TRL compute_loss (policy + reference forward, loss)",
    ("trl/trainer/dpo_trainer.py", "training_step"): "TRL training_step",
    ("transformers/trainer.py", "training_step"): "HF Trainer training_step (forward + backward)",
    ("accelerate/accelerator.py", "backward"): "accelerate backward",
    ("accelerate/accelerator.py", "clip_grad_norm_"): "accelerate clip_grad_norm_",
    ("accelerate/optimizer.py", "step"): "accelerate optimizer step",
}


def profile_report(prof: Path, steps: int) -> dict:
    import pstats

    stats = pstats.Stats(str(prof)).stats  # {(file, line, fn): (cc, nc, tt, ct, callers)}
    parts = {}
    for (file, _, fn), (_, nc, _, ct, _) in stats.items():
        for (frag, name), label in PROFILE_PARTS.items():
            if fn == name and file.endswith(frag):
                parts[label] = {"calls": nc, "cum_ms_per_step": round(1000 * ct / steps, 2)}
    top = sorted(((1000 * tt / steps, f"{'/'.join(Path(f).parts[-2:])}:{fn}", nc)
                  for (f, _, fn), (_, nc, tt, _, _) in stats.items()), reverse=True)[:15]
    return {"steps": steps, "parts": parts,
            "top_self_ms_per_step": [{"ms": round(ms, 2), "fn": fn, "calls": n} for ms, fn, n in top]}


def sparsepo_profile_worker(a) -> None:
    """cProfile a whole `sparsepo.train` run in this process; dumped before sparsepo's os._exit."""
    import cProfile

    import sparsepo.engine.dist as dist_mod
    import sparsepo.train as train_mod

    prof, shutdown = cProfile.Profile(), dist_mod.shutdown

    def dump_then_shutdown(code):
        prof.disable()
        prof.dump_stats(a.out)
        shutdown(code)

    dist_mod.shutdown = dump_then_shutdown  # train.main imports it by name at call time
    prof.enable()
    train_mod.main(json.loads(a.data))


def profile_both(inputs: dict, work: Path, a) -> dict:
    """cProfile one sparsepo inline run and one TRL inline run of the same length."""
    sp = work / "sparsepo-inline.prof"
    ovs = sparsepo_overrides(inputs, work / "profile-inline", "inline", a.profile_steps)
    bm.run_process([sys.executable, str(Path(__file__).resolve()), "--profile-worker", "--data", json.dumps(ovs),
                    "--out", str(sp)], work / "profile-sparsepo.log")
    tp = work / "trl-inline.prof"
    bm.run_process([a.trl_python, str(Path(__file__).resolve()), "--worker", "--model", inputs["model"], "--data",
                    inputs["data"], "--steps", str(a.profile_steps), "--run-dir", str(work / "profile-trl"),
                    "--out", str(work / "profile-trl.json"), "--profile-out", str(tp)], work / "profile-trl.log")
    return {"sparsepo-inline": profile_report(sp, a.profile_steps), "trl-inline": profile_report(tp, a.profile_steps)}


PAIRS = {"inline": ("trl-inline", "sparsepo-inline"), "cache": ("trl-precompute", "sparsepo-cache")}


def per_round_ratios(runs: list[dict]) -> dict[str, list[float]]:
    """TRL's step time / sparsepo's, per interleaved round (> 1: sparsepo faster), like with like:
    inline vs inline, sparsepo's cache vs TRL's precompute_ref_log_probs."""
    by = {(r["system"], r["round"]): r["median_step_s"] for r in runs}
    rounds = sorted({r["round"] for r in runs})
    return {mode: [by[(trl, rnd)] / by[(ours, rnd)] for rnd in rounds if (trl, rnd) in by and (ours, rnd) in by]
            for mode, (trl, ours) in PAIRS.items()}


def targets(systems: dict, runs: list[dict]) -> dict:
    """Ratios of TRL's step time to sparsepo's (speed-ups): medians of rounds' medians, per-round
    ratios with their median/min/max, CPU time per step; the issue's target is >= 1.2 in both modes."""
    out = {}
    for mode, ratios in per_round_ratios(runs).items():
        trl, ours = PAIRS[mode]
        wall = systems[trl]["median_step_s"] / systems[ours]["median_step_s"]
        out[mode] = {"vs": trl, "speedup_median_of_rounds": wall, "per_round": [round(x, 3) for x in ratios],
                     "per_round_median": statistics.median(ratios), "per_round_min": min(ratios),
                     "per_round_max": max(ratios), "speedup_cpu": systems[trl]["cpu_ms_per_step"]
                     / systems[ours]["cpu_ms_per_step"], "ge_1.2": wall >= 1.2,
                     "memory_le_trl": systems[ours]["peak_rss_mib"] <= systems[trl]["peak_rss_mib"]}
    return out


def render(res: dict) -> str:
    lines = [f"Measured {res['date']} on {res['machine']}; load average {res['load_before']} before, "
             f"{res['load_after']} after. Command:", "", "```", res["command"], "```", "",
             f"Model: random-init Llama, hidden {res['inputs'].get('hidden_size', 64)}, "
             f"{res['inputs'].get('num_hidden_layers', 2)} layers, vocabulary {res['inputs']['vocab']} "
             f"({res['inputs']['n_params']:,} parameters); batch {BATCH} pairs of prompt {PROMPT} + response "
             f"{RESPONSE} tokens (sparsepo tokenised {res['lengths']['sparsepo']}, TRL {res['lengths']['trl']}); "
             f"{res['steps']} steps per run, {res['rounds']} interleaved rounds; TRL {res['trl_version']}.", "",
             "| system | wall step ms (median of rounds) | min–max over rounds | pairs/s | × TRL inline steps/s "
             "| CPU ms/step (median; min–max) | × TRL inline (CPU) | peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    base = res["systems"]["trl-inline"]
    for name, s in res["systems"].items():
        lines.append(f"| {name} | {1000 * s['median_step_s']:.1f} | {1000 * s['min_step_s']:.1f}–"
                     f"{1000 * s['max_step_s']:.1f} | {BATCH / s['median_step_s']:.0f} | "
                     f"{base['median_step_s'] / s['median_step_s']:.2f} | {s['cpu_ms_per_step']:.1f} "
                     f"({s['cpu_ms_min']:.1f}–{s['cpu_ms_max']:.1f}) | {base['cpu_ms_per_step'] / s['cpu_ms_per_step']:.2f} "
                     f"| {s['peak_rss_mib']:.0f} |")
    lines += ["", "Like with like (TRL's step time ÷ sparsepo's; > 1 = sparsepo faster):", ""]
    lines += [f"- {mode} vs {t['vs']}: {t['speedup_median_of_rounds']:.2f}× (median of rounds), per round "
              f"{t['per_round']} (min {t['per_round_min']:.2f}, max {t['per_round_max']:.2f}); CPU time "
              f"{t['speedup_cpu']:.2f}×" for mode, t in res["targets"].items()]
    lines += ["", "Settings as each side ran them (TRL's read back from its trainer):", ""]
    lines += [f"- {name}: " + ", ".join(f"{k}={v}" for k, v in st.items()) for name, st in res["settings"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model"), p.add_argument("--data"), p.add_argument("--run-dir"), p.add_argument("--out")
    p.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    p.add_argument("--world", default="runs/bench-quality/world", help="demo world whose tokenizer is used")
    p.add_argument("--workdir", default="runs/bench-trl")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--short-steps", type=int, default=10, help="length of the run subtracted for CPU/step")
    p.add_argument("--profile-steps", type=int, default=30, help="0: no profile")
    p.add_argument("--json", default=str(REPO / "docs" / "bench_trl.json"))
    p.add_argument("--stage-file", default="zero3.json", help="sparsepo's deepspeed.stage_file")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the model (one --workdir per size)")
    a = p.parse_args(argv)
    STAGE_FILE[0], SIZE[0] = a.stage_file, a.size
    if a.worker:
        return trl_worker(a)
    if a.profile_worker:
        return sparsepo_profile_worker(a)
    import subprocess

    from sparsepo.demo import prepare_world

    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bm.EXTENSIONS_DIR = work / "torch_extensions"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    world = prepare_world(Path(a.world), size="default", progress=False)
    inputs = build_inputs(work, Path(world.sft_dir), BATCH * a.steps)
    trl_version = subprocess.run([a.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                                 text=True, check=True).stdout.strip()
    # fill sparsepo's cache once, untimed (TRL's precompute pass is inside its timed process, before step 1)
    bm.run_process([sys.executable, "-m", "sparsepo.train",
                    *sparsepo_overrides(inputs, work / "precompute", "precompute", a.steps)], work / "precompute.log")
    runs = [run_system(name, inputs, work, a, rnd) for rnd in range(a.rounds) for name in SYSTEMS]
    systems = {}
    for name in SYSTEMS:
        mine = [r for r in runs if r["system"] == name]
        meds = [r["median_step_s"] for r in mine]
        cpus = [r["cpu_ms_per_step"] for r in mine]
        systems[name] = {"median_step_s": statistics.median(meds), "min_step_s": min(meds), "max_step_s": max(meds),
                         "cpu_ms_per_step": statistics.median(cpus), "cpu_ms_min": min(cpus), "cpu_ms_max": max(cpus),
                         "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
                         "peak_rss_mib_max": max(r["peak_rss_mib"] for r in mine)}
    trl_len = next(r["lengths"] for r in runs if r["lengths"])
    trl_set = {r["system"]: r["settings"] for r in runs if r["settings"]}
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other engineers' jobs, 1 thread "
                      "per process",
           "command": ("python benchmarks/bench_trl.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
           "steps": a.steps, "rounds": a.rounds, "trl_version": trl_version, "inputs": inputs,
           "lengths": {"sparsepo": sparsepo_lengths(inputs), "trl": trl_len}, "systems": systems, "runs": runs,
           "settings": {"sparsepo": {**SPARSEPO_SETTINGS, "stage_file": STAGE_FILE[0]}, **trl_set},
           "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    res["targets"] = targets(systems, runs)
    if a.profile_steps:
        res["profile"] = profile_both(inputs, work, a)
    Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    print(render(res))
    print(json.dumps(res["targets"], indent=1))
    if "profile" in res:
        print(json.dumps(res["profile"], indent=1))


if __name__ == "__main__":
    main()
