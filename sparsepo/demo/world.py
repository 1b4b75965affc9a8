"""The embedded offline demo world: tokenizer, SFT model, preference pairs, held-out prompts.

    from sparsepo.demo import prepare_world
    paths = prepare_world("runs/demo/world")          # ~1-3 min on 2 CPU cores, then cached
    paths = prepare_world(tmp, size="tiny")           # a few seconds, for tests

    python -m sparsepo.demo.world --out runs/demo/world [--size tiny] [--seed 0] [--force]

A small-scale replica of the DPO paper's controlled-sentiment experiment, entirely offline on CPU
(this module orchestrates and caches; the steps live in `sizes`, `sft` and `pairs` beside it):

1. corpus: templated short reviews / stories of varied sentiment (`sparsepo.demo.corpus`);
2. tokenizer: a BPE tokenizer trained locally with `tokenizers`, wrapped as a transformers
   fast tokenizer with bos/eos/pad/unk and a chat template, saved to ``tokenizer/``;
3. SFT model: a tiny random-init Llama trained with next-token cross-entropy on the corpus, saved
   with the tokenizer to ``sft/`` (both load with ``Auto*.from_pretrained``);
4. preference pairs: two temperature-1 samples per training prompt from the SFT model, scored by
   the ground-truth reward (`sparsepo.demo.reward`) and labelled with Bradley-Terry noise,
   written to ``data/train.jsonl`` as ``{"prompt", "chosen", "rejected"}`` rows;
5. held-out prompts never used for SFT or pairs: ``data/eval_prompts.jsonl`` (``{"prompt"}`` rows);
6. ``world.json``: settings, fingerprint, sizes, SFT loss, timings, sample statistics. It is written
   last and atomically, so a half-built world is never taken for a finished one, and a later call
   with the same settings returns at once (the world is built once).

Text convention (everywhere: SFT, sampling, pairs, evaluation). Responses are stored WITHOUT a
leading space; the model sees ``tokenizer(prompt).input_ids + tokenizer(response,
add_special_tokens=False).input_ids + [eos]``, where ``tokenizer(prompt)`` starts with bos (the
tokenizer's post-processor adds it). The pre-tokenizer is Metaspace with ``prepend_scheme="always"``
(sentencepiece style: every piece gets a word-boundary marker), so those ids are exactly the
tokenisation of the text ``prompt + " " + response``, and decoding the response ids gives back the
response text. The chat template renders ``[user: prompt, assistant: response]`` to the same ids.

Preference labels. For samples a, b with rewards r_a, r_b, a is chosen with probability
``sigmoid((r_a - r_b) / tau)`` (Bradley-Terry, ``tau = 1.0`` reward units: a reward gap of 1 is
labelled correctly 73% of the time, a gap of 3 95%). Pairs whose two responses are the same text
(invalid data in this project), that have an empty response, or whose rewards are exactly equal (no
ground-truth preference: the label would be a coin flip) are skipped; the counts go to world.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsepo.atomic import atomic_write
from sparsepo.demo import corpus as demo_corpus
from sparsepo.demo.pairs import make_pairs
from sparsepo.demo.sampling import hf_progress_bars, torch_threads
from sparsepo.demo.sft import build_model, build_tokenizer, check_tokenizer, encode_examples, train_sft
from sparsepo.demo.sizes import SIZES, WorldSize

log = logging.getLogger("sparsepo.demo")

WORLD_FORMAT = 1
"""Bump when the world's construction changes, so cached worlds are rebuilt."""


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    tokenizer_dir: Path
    sft_dir: Path
    train_path: Path
    eval_prompts_path: Path
    meta_path: Path

    @classmethod
    def under(cls, root: str | Path) -> WorldPaths:
        root = Path(root)
        return cls(root=root, tokenizer_dir=root / "tokenizer", sft_dir=root / "sft",
                   train_path=root / "data" / "train.jsonl", eval_prompts_path=root / "data" / "eval_prompts.jsonl",
                   meta_path=root / "world.json")


def world_settings(size: str, seed: int) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {sorted(SIZES)}")
    return {"format": WORLD_FORMAT, "size": size, "seed": int(seed), **dataclasses.asdict(SIZES[size])}


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _cached(paths: WorldPaths, fp: str) -> bool:
    try:
        meta = json.loads(paths.meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("fingerprint") != fp:
        log.info("world at %s was built with other settings (%s != %s): rebuilding", paths.root,
                 meta.get("fingerprint"), fp)
        return False
    needed = [paths.train_path, paths.eval_prompts_path, paths.tokenizer_dir / "tokenizer.json",
              paths.sft_dir / "config.json", paths.sft_dir / "tokenizer.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        log.info("world at %s is missing %s: rebuilding", paths.root, missing)
        return False
    return True


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the world directory, so concurrent callers build it once."""
    import fcntl

    with open(root / ".world.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_jsonl(path: Path, rows) -> None:
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str, what: str) -> Iterator[None]:
        log.info("[world] %s ...", what)
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        log.info("[world] %s: done in %.1fs", what, self.timings[name])


# ---------------------------------------------------------------------------------------------------
# steps


# ---------------------------------------------------------------------------------------------------


def prepare_world(out_dir: str | Path, *, size: str = "default", seed: int = 0, force: bool = False,
                  progress: bool = True, num_threads: int | None = None) -> WorldPaths:
    """Build the demo world under `out_dir` (or return it at once when already built with these
    settings). See the module docstring for what is built. `num_threads`: torch intra-op threads
    while building (None: respect OMP_NUM_THREADS, else up to 4); restored afterwards."""
    paths = WorldPaths.under(out_dir)
    settings = world_settings(size, seed)
    fp = fingerprint(settings)
    if not force and _cached(paths, fp):
        log.info("[world] %s is ready (cached, fingerprint %s)", paths.root, fp)
        return paths
    paths.root.mkdir(parents=True, exist_ok=True)
    with _lock(paths.root):
        if not force and _cached(paths, fp):  # another process built it while we waited
            return paths
        with torch_threads(num_threads) as threads, hf_progress_bars(progress):
            _build(paths, settings, fp, SIZES[size], seed=seed, progress=progress, threads=threads)
    return paths


def _build(paths: WorldPaths, settings: dict, fp: str, size: WorldSize, *, seed: int, progress: bool,
           threads: int) -> None:
    t_start = time.perf_counter()
    log.info("[world] building %s world in %s (seed %d, fingerprint %s, %d torch threads)", settings["size"],
             paths.root, seed, fp, threads)
    paths.meta_path.unlink(missing_ok=True)  # from here on the directory is "not built"
    for d in (paths.tokenizer_dir, paths.sft_dir, paths.train_path.parent):
        shutil.rmtree(d, ignore_errors=True)
    paths.train_path.parent.mkdir(parents=True)
    timer = _Timer()
    rng = random.Random(seed)
    torch.manual_seed(seed)

    with timer.step("corpus", "synthetic corpus"):
        prompts = demo_corpus.all_prompts()
        rng.shuffle(prompts)
        eval_prompts = prompts[:size.n_eval_prompts]
        train_prompts = prompts[size.n_eval_prompts:]
        corpus = demo_corpus.build_corpus(train_prompts, size.corpus_size, rng)
        held_out = demo_corpus.build_corpus(train_prompts, min(512, max(64, size.corpus_size // 20)), rng)
        _write_jsonl(paths.train_path.parent / "sft_corpus.jsonl", ({"prompt": p, "response": r} for p, r in corpus))

    with timer.step("tokenizer", "tokenizer"):
        texts = [f"{p} {r}" for p, r in corpus] + prompts
        tokenizer = build_tokenizer(texts, size.vocab_size, size.max_position_embeddings)
        check_tokenizer(tokenizer, corpus[:200])
        tokenizer.save_pretrained(paths.tokenizer_dir)
        log.info("[world] tokenizer: %d tokens", len(tokenizer))

    with timer.step("sft", "SFT of a tiny Llama"):
        train_ids = encode_examples(tokenizer, corpus)
        held_ids = encode_examples(tokenizer, held_out)
        longest = max(len(x) for x in train_ids)
        if longest > size.max_position_embeddings:
            raise RuntimeError(f"corpus example of {longest} tokens exceeds max_position_embeddings")
        model = build_model(size, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("[world] model: %d parameters, corpus %d examples (mean %.1f tokens)", n_params, len(train_ids),
                 sum(map(len, train_ids)) / len(train_ids))
        sft = train_sft(model, train_ids, held_ids, size, pad_id=tokenizer.pad_token_id, seed=seed,
                        progress=progress)
        log.info("[world] SFT loss %.3f -> %.3f (held-out %.3f)", sft["sft_first_loss"], sft["sft_final_loss"],
                 sft["sft_eval_loss"])
        model.save_pretrained(paths.sft_dir)
        tokenizer.save_pretrained(paths.sft_dir)

    with timer.step("pairs", "preference pairs"):
        rows, pair_stats = make_pairs(model, tokenizer, train_prompts, size, seed=seed, progress=progress)
        _write_jsonl(paths.train_path, ({k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows))
        _write_jsonl(paths.train_path.parent / "train_scored.jsonl", rows)
        log.info("[world] %d pairs; SFT sample reward %.3f +- %.3f; chosen beats rejected in %.1f%% of pairs",
                 len(rows), pair_stats["sft_sample_mean_reward"], pair_stats["sft_sample_reward_std"],
                 100 * pair_stats["pairs_correctly_ordered"])

    with timer.step("eval_prompts", "held-out prompts"):
        used = {r["prompt"] for r in rows}
        assert not used & set(eval_prompts)
        _write_jsonl(paths.eval_prompts_path, ({"prompt": p} for p in eval_prompts))

    total = round(time.perf_counter() - t_start, 3)
    meta = {
        "fingerprint": fp,
        "settings": settings,
        "convention": "model input = tokenizer(prompt).input_ids (bos first) + tokenizer(response, "
                      "add_special_tokens=False).input_ids + [eos]; responses have no leading space; equals "
                      "the tokenisation of prompt + ' ' + response",
        "bt_tau": size.bt_tau,
        "paths": {k: str(v.relative_to(paths.root)) for k, v in dataclasses.asdict(paths).items() if k != "root"},
        "vocab_size": len(tokenizer),
        "special_tokens": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                           "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id},
        "n_params": n_params,
        "corpus_size": len(corpus),
        "n_eval_prompts": len(eval_prompts),
        **sft,
        **pair_stats,
        "timings_s": {**timer.timings, "total": total},
        "torch_threads": threads,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json_atomic(paths.meta_path, meta)  # last: marks the world as built
    log.info("[world] ready in %.1fs: %s", total, paths.root)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sparsepo.demo.world", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo/world")
    ap.add_argument("--size", default="default", choices=sorted(SIZES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = prepare_world(args.out, size=args.size, seed=args.seed, force=args.force,
                          progress=not args.no_progress, num_threads=args.threads)
    print(json.dumps({k: str(v) for k, v in dataclasses.asdict(paths).items()}, indent=2))


if __name__ == "__main__":
    main()
