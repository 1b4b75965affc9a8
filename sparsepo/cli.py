"""The `sparsepo` command.

    sparsepo demo                         # offline demo: prepare the world, train DPO, evaluate
    sparsepo demo --method simpo --nproc 2
    sparsepo demo --method spo            # SPO: samples scored by a live 2-stage reference group (+2 processes)
    sparsepo demo --method spo reference.mode=inline   # SPO scored by the reference on the policy rank
    sparsepo demo prepare                 # only build the demo world (cached)
    sparsepo train --config run.yaml [--nproc N] [--resume auto] [section.key=value ...]
    sparsepo precompute --config run.yaml [section.key=value ...]
    sparsepo eval --policy DIR --reference DIR --prompts FILE
    sparsepo sae train --config run.yaml --out runs/sae    # an SAE for FPO (sae-lens format)
    sparsepo sepo train-oracle --config run.yaml --out runs/oracle [--fraction 0.5]   # SePO's oracle
    sparsepo export CHECKPOINT_DIR OUT_DIR [--fp32-master]   # weights in the training precision (bf16 = final/)
    sparsepo config keys                  # every config key: type, default, what it does
    sparsepo config show --config run.yaml [section.key=value ...]   # the resolved config, nothing run

Config overrides (section.key=value) may stand anywhere on the command line, before or after options.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from sparsepo.demo.run import demo_reference, last_override as _last, print_eval as _print_eval
from sparsepo.launch.ports import free_port

RECIPES = Path(__file__).resolve().parent / "recipes"
DEMO_METHODS = ("dpo", "ipo", "simpo", "tdpo1", "tdpo2", "fpo", "sepo", "spo", "hinge", "robust", "exo_pair", "nca_pair",
                "bco_pair", "sppo_hard", "aot", "aot_pair", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                "sigmoid_norm", "cpo", "cpo_hinge", "cpo_ipo", "alphapo", "orpo", "sft")
"""`sparsepo.losses.METHODS`' names, without importing torch for `--help` (tests/test_cli.py keeps them equal)."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_command(config: str | None, overrides: list[str], *, nproc: int = 1, resume: str | None = None) -> list[str]:
    """The command line of a training job: plain python for one process, the deepspeed launcher for more."""
    args = (["--config", str(config)] if config else []) + (["--resume", resume] if resume else []) + list(overrides)
    if nproc <= 1:
        return [sys.executable, "-m", "sparsepo.train", *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
            "--master_port", str(free_port()), "--module", "sparsepo.train", *args]


def launch_train(config: str | None, overrides: list[str], *, nproc: int = 1, resume: str | None = None) -> int:
    """Run `sparsepo.train` in fresh processes (so a finished run's exit path cannot hurt the caller),
    once the config has passed every check that needs no process group (`sparsepo.prelaunch`): a
    refusal takes seconds and exits 2 here, with no launcher started."""
    code = check_before_launch(config, [*overrides, *([f"checkpoint.resume={resume}"] if resume else [])], nproc)
    if code:
        return code
    return subprocess.call(train_command(config, overrides, nproc=nproc, resume=resume), env=_env())


def check_before_launch(config: str | None, overrides: list[str], nproc: int) -> int:
    """0, or the exit code of a run refused before launch (2: a config error, 1: another failure
    of the same checks, which the launched processes would hit too), its reason on stderr."""
    from sparsepo.prelaunch import CONFIG_ERRORS, check_command

    try:
        check_command(config, overrides, world_size=max(1, nproc))
    except CONFIG_ERRORS as e:
        print(f"sparsepo: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. an oracle directory that cannot be read: said once, here
        print(f"sparsepo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    return launch_train(a.config, a.overrides, nproc=a.nproc, resume=a.resume)


def cmd_precompute(a: argparse.Namespace) -> int:
    return launch_train(a.config, [*a.overrides, "reference.mode=precompute"], nproc=a.nproc)


def cmd_prepare(a: argparse.Namespace) -> int:
    from sparsepo.demo import prepare_world

    paths = prepare_world(Path(a.workdir) / "world", size=a.size, seed=a.seed, force=a.force)
    print(f"demo world ready in {paths.root}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    if a.action == "prepare":
        return cmd_prepare(a)
    if a.action not in (None, "run") and "=" not in a.action:  # a typo: refused before the world is built
        import difflib

        near = difflib.get_close_matches(a.action, ["run", "prepare"], n=1)
        print(f"sparsepo demo: unknown action {a.action!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
              f"actions: run, prepare; config overrides look like key=value", file=sys.stderr)
        return 2
    if a.action not in (None, "run"):  # `sparsepo demo train.max_steps=5`: an override, not an action
        a.overrides.insert(0, a.action)
    from sparsepo.demo import evaluate_policy, prepare_world
    from sparsepo.losses import get_method
    from sparsepo.recipe import write_for_method

    world = prepare_world(Path(a.workdir) / "world", size=a.size, seed=a.seed, force=a.force)
    run_dir = Path(_last(a.overrides, "logging.output_dir") or Path(a.workdir) / f"run-{a.method}")
    # the evaluation compares the policy with the model it started from, whatever the command line chose
    reference = _last(a.overrides, "reference.path") or _last(a.overrides, "model.path") or world.sft_dir
    spec = get_method(a.method)
    samples, nproc = demo_reference(spec.needs_policy_samples, a.nproc, a.overrides)
    overrides = [f"model.path={world.sft_dir}", f"data.path={world.train_path}", f"method.name={a.method}",
                 f"logging.output_dir={run_dir}", "logging.overwrite=true", *samples, *a.overrides]
    if spec.needs_sae_features and not any(o.startswith("sae.path=") for o in a.overrides):
        sae = demo_sae(world, [f"method.name={a.method}", *a.overrides], force=a.force, steps=a.sae_steps)
        overrides.append(f"sae.path={sae}")
    if spec.needs_oracle_scores and not any(o.startswith("reference.oracle=") for o in a.overrides):
        overrides.append(f"reference.oracle={demo_oracle(world, a)}")
    # the demo recipe is written for DPO: pass the method only the keys its params have
    recipe = write_for_method(RECIPES / "demo.yaml", a.method, Path(a.workdir) / f"recipe-{a.method}.yaml")
    code = launch_train(str(recipe), overrides, nproc=nproc)
    if code != 0:
        print(f"sparsepo demo: training failed (exit {code})", file=sys.stderr)
        return code
    result = evaluate_policy(run_dir / "final", reference, world.eval_prompts_path, seed=a.seed)
    (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
    _print_eval(result, f"{a.method} on the demo")
    print("(one training seed: these figures move with train.seed; `python benchmarks/bench_quality.py` gives "
          "mean ± s.e. over seeds, docs/benchmarks_quality.md)")
    return 0


def _eval_refusal(a: argparse.Namespace) -> str | None:
    """What makes `sparsepo eval` impossible before anything loads, in one line (or None)."""
    for flag, path, kind in (("--policy", a.policy, "dir"), ("--reference", a.reference, "dir"),
                             ("--prompts", a.prompts, "file")):
        if not (Path(path).is_dir() if kind == "dir" else Path(path).is_file()):
            return f"{flag} {path}: no such {'model directory' if kind == 'dir' else 'file'}"
    if a.samples_per_prompt < 1:
        return f"--samples-per-prompt {a.samples_per_prompt} must be >= 1"
    return None


def cmd_eval(a: argparse.Namespace) -> int:
    """Every refusal is one line on stderr and exit 2 (a traceback only with SPARSEPO_DEBUG)."""
    from sparsepo.config import ConfigError
    from sparsepo.demo import evaluate_policy

    problem = _eval_refusal(a)  # a missing directory is reported as missing, before a loader takes it for a hub id
    if problem is None:
        try:
            result = evaluate_policy(a.policy, a.reference, a.prompts, samples_per_prompt=a.samples_per_prompt,
                                     seed=a.seed, reward=a.reward)
        except (ConfigError, ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
            if os.environ.get("SPARSEPO_DEBUG"):
                raise
            problem = " ".join(str(e).split()) or type(e).__name__
    if problem is not None:
        print(f"sparsepo eval: {problem}", file=sys.stderr)
        return 2
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    _print_eval(result, str(a.policy))
    return 0


def cmd_sae_train(a: argparse.Namespace) -> int:
    import logging

    from sparsepo.config import load_config
    from sparsepo.sae.runtime import train_for_run

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # the SAE being trained is the one FPO will use: satisfy the config's "fpo needs sae.path" check
    from sparsepo.config import ConfigError
    from sparsepo.config.paths import check_local_inputs

    try:
        cfg = load_config(a.config, [f"sae.path={a.out}", *a.overrides])
        check_local_inputs(cfg)
        stats = train_for_run(cfg, a.out, d_sae=a.d_sae, k=a.k, steps=a.steps, architecture=a.architecture,
                              max_tokens=a.max_tokens)  # refuses a reference with another tokenizer first
    except ConfigError as e:
        print(f"sparsepo: config error: {e}", file=sys.stderr)
        return 2
    print(f"SAE saved to {a.out}: explained variance {stats['explained_variance']:.3f}, L0 {stats['l0']:.1f}, "
          f"{stats['tokens']} tokens, {stats['total_seconds']:.1f}s")
    return 0


def demo_sae(world, method_overrides: list[str], *, force: bool, steps: int = 300) -> Path:
    """The demo's SAE, cached beside the world with the settings it was trained with (`demo.cached`)."""
    from sparsepo.demo.cached import demo_sae as cached_sae

    return cached_sae(world, method_overrides, steps=steps, force=force, recipe=RECIPES / "demo.yaml")


def demo_oracle(world, a: argparse.Namespace) -> Path:
    """The demo's SePO oracle (`demo.cached.demo_oracle`): retrained when the run asks for other settings."""
    from sparsepo.demo.cached import demo_oracle as cached_oracle

    return cached_oracle(world, oracle=a.oracle, seed=a.seed, nproc=a.nproc, overrides=a.overrides, force=a.force,
                         recipe=RECIPES / "demo.yaml", launch=launch_train)


def cmd_sepo_train_oracle(a: argparse.Namespace) -> int:
    import logging

    from sparsepo.oracle_train import train_oracle

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        train_oracle(a.config, a.out, launch=launch_train, fraction=a.fraction, model=a.model, heldout=a.heldout,
                     overrides=a.overrides, nproc=a.nproc, seed=a.seed)
    except (RuntimeError, ValueError) as e:
        print(f"sparsepo sepo train-oracle: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from sparsepo.checkpoint import CheckpointError
    from sparsepo.export import export_checkpoint

    try:
        done = export_checkpoint(a.checkpoint, a.out, fp32_master=a.fp32_master, adapter_only=a.adapter_only)
    except CheckpointError as e:
        print(f"sparsepo export: {e}", file=sys.stderr)
        return 1
    how = "PeftModel.from_pretrained(base, OUT)" if a.adapter_only else "AutoModelForCausalLM.from_pretrained"
    print(f"{done.describe()}: {done.checkpoint} -> {done.out} (load with {how})")
    if a.push_to_hub:
        from sparsepo.model_card import push_to_hub

        return push_to_hub(done.out, a.push_to_hub)
    return 0


CONFIG_HELP = "YAML run config (default: the built-in defaults; `sparsepo config keys` lists every key)"
OVERRIDES_HELP = ("config overrides section.key=value, e.g. method.beta=0.05 train.max_steps=20; anywhere on "
                  "the command line, later ones win")


def cmd_config_keys(a: argparse.Namespace) -> int:
    from sparsepo.config.keys import describe_keys

    print(describe_keys())
    return 0


def cmd_config_show(a: argparse.Namespace) -> int:
    import yaml

    from sparsepo.config import ConfigError, load_config, to_dict

    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"sparsepo: config error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsepo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy (see sparsepo/recipes/*.yaml)",
                       description="Train a policy. Overrides may stand anywhere: "
                                   "sparsepo train --config run.yaml --resume auto method.beta=0.1")
    t.add_argument("--config", help=CONFIG_HELP)
    t.add_argument("--nproc", type=int, default=1, help="processes on this node (deepspeed launcher when > 1)")
    t.add_argument("--resume", help="auto (newest valid checkpoint of the run directory) | a checkpoint directory; "
                                    "same as checkpoint.resume=...")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.set_defaults(fn=cmd_train)

    pc = sub.add_parser("precompute", help="score the dataset with the reference into the reference cache")
    pc.add_argument("--config", help=CONFIG_HELP)
    pc.add_argument("--nproc", type=int, default=1, help="processes on this node (deepspeed launcher when > 1)")
    pc.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pc.set_defaults(fn=cmd_precompute)

    d = sub.add_parser("demo", help="offline demo: prepare world -> train -> eval (or `demo prepare`)")
    d.add_argument("action", nargs="?", help="run (default) | prepare (only build the demo world)")
    d.add_argument("--method", default="dpo", choices=DEMO_METHODS, metavar="METHOD",
                   help=f"loss to train with, a row of the loss table: {', '.join(DEMO_METHODS)} (default dpo)")
    d.add_argument("--sae-steps", type=int, default=300, help="FPO: optimiser steps of the demo's SAE (default 300; "
                                                              "cached, trained again when this changes)")
    d.add_argument("--size", default="default", choices=["default", "tiny"], help="demo world size")
    d.add_argument("--workdir", default="runs/demo", help="where the world and the run directories go")
    d.add_argument("--nproc", type=int, default=1, help="policy processes (deepspeed launcher when > 1; SPO's live "
                                                        "reference ranks come on top)")
    d.add_argument("--seed", type=int, default=0, help="seed of the world and of the evaluation")
    d.add_argument("--force", action="store_true", help="rebuild the demo world even if cached")
    d.add_argument("--oracle", default="small", choices=["small", "policy"],
                   help="SePO's oracle starts from a ~8x smaller SFT model (weak-to-strong, default) or the policy's")
    d.add_argument("overrides", nargs="*", help="config overrides for training, e.g. train.max_steps=20")
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="win rate and KL of a policy against a reference, on the demo reward or yours")
    e.add_argument("--policy", required=True, help="policy model directory (e.g. <run>/final)")
    e.add_argument("--reference", required=True, help="reference model directory (e.g. the SFT model)")
    e.add_argument("--prompts", required=True, help="jsonl file of {\"prompt\"} rows: strings or lists of "
                                                     "{role, content} messages (chat template applied)")
    e.add_argument("--samples-per-prompt", type=int, default=1, help="responses sampled per prompt and model")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--reward", help="what scores the samples: a reward-model directory (sequence classification, "
                                    "one output) or module:callable, a Python reward(prompt, response) -> float; "
                                    "default: the demo's sentiment lexicon (meaningful on the demo world only)")
    e.add_argument("--out", help="also write the result as JSON to this file")
    e.set_defaults(fn=cmd_eval)

    sae = sub.add_parser("sae", help="sparse autoencoders for FPO").add_subparsers(dest="sae_command", required=True)
    st = sae.add_parser("train", help="train an SAE (sae-lens format) on the reference's layer sae.layer")
    st.add_argument("--config", help=CONFIG_HELP)
    st.add_argument("--out", required=True, help="directory to save the SAE in")
    st.add_argument("--d-sae", type=int, help="dictionary size (default 8 x model width)")
    st.add_argument("--k", type=int, default=32, help="active features per token (TopK)")
    st.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    st.add_argument("--architecture", default="topk", choices=["topk", "jumprelu"], help="SAE architecture")
    st.add_argument("--max-tokens", type=int, default=200_000, help="residual activations to train on")
    st.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    st.set_defaults(fn=cmd_sae_train)

    sepo = sub.add_parser("sepo", help="SePO's oracle").add_subparsers(dest="sepo_command", required=True)
    so = sepo.add_parser("train-oracle", help="DPO-train SePO's oracle and write DIR/oracle.json")
    so.add_argument("--config", help=CONFIG_HELP)
    so.add_argument("--out", required=True, help="oracle directory (then: reference.oracle=DIR)")
    so.add_argument("--fraction", type=float, default=1.0, help="seeded fraction of the pairs to train on; "
                    "the rest measure held-out accuracy")
    so.add_argument("--model", help="the oracle's starting model (default: the config's model.path)")
    so.add_argument("--heldout", help="held-out pairs file for the accuracy when --fraction is 1")
    so.add_argument("--seed", type=int, help="seed of the split (default: train.seed)")
    so.add_argument("--nproc", type=int, default=1, help="ranks of the oracle's DPO run (deepspeed launcher)")
    so.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    so.set_defaults(fn=cmd_sepo_train_oracle)

    x = sub.add_parser("export", help="checkpoint -> Hugging Face model directory")
    x.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest valid checkpoint)")
    x.add_argument("out", help="the Hugging Face model directory to write")
    x.add_argument("--fp32-master", action="store_true", help="write the fp32 master weights (default: the "
                   "training precision, so a bf16 run exports bf16 weights equal to its final/)")
    x.add_argument("--push-to-hub", metavar="REPO", help="also upload OUT (with its model card) to this Hub repo")
    x.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs: write the PEFT adapter directory instead of merging the adapters into the base")
    x.set_defaults(fn=cmd_export)

    c = sub.add_parser("config", help="inspect the configuration: every key, or the resolved config of a command line")
    cs = c.add_subparsers(dest="config_command", required=True)
    ck = cs.add_parser("keys", help="every config key with its type, default and documentation, by section")
    ck.set_defaults(fn=cmd_config_keys)
    cw = cs.add_parser("show", help="print the resolved YAML of --config plus overrides (runs nothing)")
    cw.add_argument("--config", help=CONFIG_HELP)
    cw.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    cw.set_defaults(fn=cmd_config_show)
    return p


def main(argv: list[str] | None = None) -> None:
    from sparsepo.config.argv import parse_with_overrides

    args = parse_with_overrides(build_parser(), argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()
