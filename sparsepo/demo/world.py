"""The embedded offline demo world: tokenizer, SFT model, preference pairs, held-out prompts.

    from sparsepo.demo import prepare_world
    paths = prepare_world("runs/demo/world")          # ~1-3 min on 2 CPU cores, then cached
    paths = prepare_world(tmp, size="tiny")           # a few seconds, for tests

    python -m sparsepo.demo.world --out runs/demo/world [--size tiny] [--seed 0] [--force]

A small-scale replica of the DPO paper's controlled-sentiment experiment, entirely offline on CPU:

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
import math
import random
import shutil
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsepo.atomic import atomic_write
from sparsepo.demo import corpus as demo_corpus
from sparsepo.demo.reward import ground_truth_reward
from sparsepo.demo.sampling import Sample, hf_progress_bars, sample_responses, torch_threads

log = logging.getLogger("sparsepo.demo")

WORLD_FORMAT = 1
"""Bump when the world's construction changes, so cached worlds are rebuilt."""

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"

CHAT_TEMPLATE = (
    "{#- demo convention: bos + prompt + ' ' + response + eos; no role headers -#}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{#- the response follows the prompt directly -#}{%- endif -%}"
)


@dataclass(frozen=True)
class WorldSize:
    """Everything that shapes a world (part of the cache fingerprint)."""

    vocab_size: int  # BPE target size, special tokens included (the trainer may stop earlier)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    corpus_size: int  # SFT examples
    sft_steps: int
    sft_batch_size: int
    sft_lr: float
    n_pairs: int  # preference pairs wanted in data/train.jsonl
    n_eval_prompts: int
    max_new_tokens: int  # sampling budget for the pair responses
    sample_batch_size: int
    bt_tau: float = 1.0  # Bradley-Terry temperature, in reward units


SIZES: dict[str, WorldSize] = {
    "default": WorldSize(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                         max_position_embeddings=256, corpus_size=16000, sft_steps=300, sft_batch_size=64,
                         sft_lr=3e-3, n_pairs=1500, n_eval_prompts=128, max_new_tokens=48,
                         sample_batch_size=256),
    "tiny": WorldSize(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      max_position_embeddings=256, corpus_size=2000, sft_steps=80, sft_batch_size=32,
                      sft_lr=5e-3, n_pairs=64, n_eval_prompts=16, max_new_tokens=32, sample_batch_size=128),
}


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


def build_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation) + ["▁"],
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 unk_token=UNK, model_max_length=max_length, padding_side="right",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def check_tokenizer(tokenizer, examples: list[tuple[str, str]]) -> None:
    """The joining convention holds: separate = joint tokenisation, response decode round-trips."""
    for prompt, response in examples:
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if p[:1] != [tokenizer.bos_token_id]:
            raise RuntimeError("demo tokenizer does not start prompts with bos")
        if tokenizer(prompt + " " + response)["input_ids"] != p + r:
            raise RuntimeError(f"demo tokenizer: prompt/response tokenisation is not stable for {prompt!r} {response!r}")
        if tokenizer.decode(r, skip_special_tokens=True) != response:
            raise RuntimeError(f"demo tokenizer does not round-trip {response!r}")
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if tokenizer(chat, add_special_tokens=False)["input_ids"] != p + r + [tokenizer.eos_token_id]:
            raise RuntimeError("demo chat template disagrees with the joining convention")


def encode_examples(tokenizer, examples: list[tuple[str, str]]) -> list[list[int]]:
    """bos + prompt + response + eos ids per (prompt, response): the demo convention."""
    prompts = tokenizer([p for p, _ in examples])["input_ids"]
    responses = tokenizer([r for _, r in examples], add_special_tokens=False)["input_ids"]
    return [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)]


def build_model(size: WorldSize, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads, max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def _pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train_sft(model, train: list[list[int]], held_out: list[list[int]], size: WorldSize, *, pad_id: int,
              seed: int, progress: bool) -> dict:
    """Next-token cross-entropy on whole sequences (bos + prompt + response + eos), AdamW, cosine LR."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, size.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, size.sft_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(size.sft_steps), desc="sft", disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(train), (size.sft_batch_size,), generator=gen).tolist()
        ids, _, labels = _pad_batch([train[i] for i in idx], pad_id)
        # right padding + causal attention: real tokens never see the pads, whose labels are -100, so
        # no attention mask is needed (and SDPA keeps its fast causal path)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    with torch.no_grad():
        total = count = 0.0
        for s in range(0, len(held_out), 128):
            ids, _, labels = _pad_batch(held_out[s:s + 128], pad_id)
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
    return {"sft_first_loss": round(losses[0], 4), "sft_final_loss": round(sum(tail) / len(tail), 4),
            "sft_eval_loss": round(total / max(1.0, count), 4), "sft_steps": len(losses)}


def make_pairs(model, tokenizer, prompts: list[str], size: WorldSize, *, seed: int,
               progress: bool) -> tuple[list[dict], dict]:
    """Two SFT samples per prompt -> Bradley-Terry-labelled pairs; stops at size.n_pairs pairs."""
    gen = torch.Generator().manual_seed(seed + 1)
    label_rng = random.Random(seed + 2)
    eos = tokenizer.eos_token_id
    rows: list[dict] = []
    stats = {"prompts_used": 0, "skipped_identical": 0, "skipped_empty": 0, "skipped_equal_reward": 0,
             "samples": 0, "sample_reward_sum": 0.0, "sample_reward_sq": 0.0, "sample_tokens": 0,
             "samples_ended": 0}
    start = 0
    while len(rows) < size.n_pairs and start < len(prompts):
        want = size.n_pairs - len(rows)
        chunk = prompts[start:start + int(want * 1.25) + 8]
        start += len(chunk)
        prompt_ids = tokenizer(chunk)["input_ids"]
        doubled = [p for p in prompt_ids for _ in range(2)]
        samples: list[Sample] = sample_responses(model, doubled, max_new_tokens=size.max_new_tokens, eos_id=eos,
                                                 generator=gen, batch_size=size.sample_batch_size,
                                                 progress=progress, desc="pairs")
        texts = tokenizer.batch_decode([s.ids for s in samples], skip_special_tokens=True)
        for j, prompt in enumerate(chunk):
            a, b = texts[2 * j].strip(), texts[2 * j + 1].strip()
            for s, t in ((samples[2 * j], a), (samples[2 * j + 1], b)):
                r = ground_truth_reward(t)
                stats["samples"] += 1
                stats["sample_reward_sum"] += r
                stats["sample_reward_sq"] += r * r
                stats["sample_tokens"] += len(s.ids)
                stats["samples_ended"] += int(s.ended)
            if len(rows) >= size.n_pairs:
                continue
            stats["prompts_used"] += 1
            if not a or not b:
                stats["skipped_empty"] += 1
                continue
            if a == b:
                stats["skipped_identical"] += 1
                continue
            ra, rb = ground_truth_reward(a), ground_truth_reward(b)
            if ra == rb:
                stats["skipped_equal_reward"] += 1
                continue
            p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / size.bt_tau))
            a_wins = label_rng.random() < p_a
            chosen, rejected = (a, b) if a_wins else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "reward_chosen": ra if a_wins else rb, "reward_rejected": rb if a_wins else ra,
                         "p_chosen": round(p_a if a_wins else 1 - p_a, 4)})
    n = max(1, stats["samples"])
    mean = stats["sample_reward_sum"] / n
    summary = {
        "n_pairs": len(rows),
        "prompts_used": stats["prompts_used"],
        "skipped_identical": stats["skipped_identical"],
        "skipped_empty": stats["skipped_empty"],
        "skipped_equal_reward": stats["skipped_equal_reward"],
        "sft_sample_count": stats["samples"],
        "sft_sample_mean_reward": round(mean, 4),
        "sft_sample_reward_std": round(math.sqrt(max(0.0, stats["sample_reward_sq"] / n - mean * mean)), 4),
        "sft_sample_mean_tokens": round(stats["sample_tokens"] / n, 2),
        "sft_sample_ended_fraction": round(stats["samples_ended"] / n, 4),
        "pairs_correctly_ordered": round(sum(r["reward_chosen"] > r["reward_rejected"] for r in rows)
                                         / max(1, len(rows)), 4),
        "mean_reward_chosen": round(sum(r["reward_chosen"] for r in rows) / max(1, len(rows)), 4),
        "mean_reward_rejected": round(sum(r["reward_rejected"] for r in rows) / max(1, len(rows)), 4),
    }
    if len(rows) < size.n_pairs:
        log.warning("[world] only %d valid pairs from %d prompts (wanted %d)", len(rows), len(prompts), size.n_pairs)
    return rows, summary


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
