"""The GPU issue's workload (issue 19), at any size: a random-init Llama built from config, a WordLevel
tokenizer, and random-word pairs whose every sequence has exactly prompt + response tokens.

    python benchmarks/workload.py --preset issue19 --out runs/gpu-bench/work   # 0.94 B, 512 pairs of 128 + 384

Used by benchmarks/profile_step.py and benchmarks/gpu_bench.py. Prompt = bos + (prompt - 1) words,
response = (response - 1) words + eos (sparsepo adds bos to the prompt and eos to each response;
TRL does the same with this tokenizer), one word = one token.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass(frozen=True, kw_only=True)
class Workload:
    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int
    prompt: int
    response: int
    pairs: int
    batch: int  # pairs per optimiser step (one process)
    steps: int = 30
    skip: int = 5  # the median is over steps skip+1..steps (issue 19: steps 6-30)
    tied: bool = False

    @property
    def seq(self) -> int:
        return self.prompt + self.response

    @property
    def tokens_per_step(self) -> int:
        """Tokens through the policy per optimiser step: chosen and rejected rows of every pair."""
        return 2 * self.batch * self.seq


PRESETS = {
    # issue 19: 0.94 B parameters, 8 pairs x 2 x 512 = 8,192 tokens a step, bf16, 30 steps, median of 6-30
    "issue19": Workload(hidden=2048, layers=16, heads=16, mlp=5504, vocab=32000, prompt=128, response=384,
                        pairs=512, batch=8),
    # the CPU profile of docs/profile.md: small, but with a vocabulary-sized head and real attention
    "cpu-profile": Workload(hidden=256, layers=4, heads=4, mlp=688, vocab=8000, prompt=32, response=96, pairs=64,
                            batch=4, steps=4, skip=2),
    # the smoke tests' size (seconds on one CPU core)
    "tiny": Workload(hidden=32, layers=2, heads=2, mlp=64, vocab=200, prompt=8, response=8, pairs=16, batch=2,
                     steps=3, skip=1),
}


def preset(name: str, **changes) -> Workload:
    return replace(PRESETS[name], **changes)


def words(vocab: int) -> list[str]:
    """vocab - len(SPECIALS) distinct lowercase words (base-26 spellings of 0, 1, ...)."""
    out = []
    for i in range(vocab - len(SPECIALS)):
        w, n = "", i
        while True:
            w, n = chr(97 + n % 26) + w, n // 26
            if n == 0:
                break
        out.append("w" + w)
    return out


def build_tokenizer(vocab: int, out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate((*SPECIALS, *words(vocab)))}
    tk = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                      special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>")
    tok.save_pretrained(out)
    return tok


def build(w: Workload, out: Path, *, seed: int = 0) -> dict:
    """Model dir, tokenizer (in the model dir) and pairs.jsonl under `out`; reused when present."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    model_dir, data = out / "model", out / "pairs.jsonl"
    spec = out / "workload.json"
    if spec.is_file() and json.loads(spec.read_text()) == asdict(w) and (model_dir / "config.json").is_file():
        return {"model": str(model_dir), "data": str(data), "n_params": json.loads((out / "n_params").read_text())}
    tok = build_tokenizer(w.vocab, model_dir)
    cfg = LlamaConfig(vocab_size=w.vocab, hidden_size=w.hidden, intermediate_size=w.mlp, num_hidden_layers=w.layers,
                      num_attention_heads=w.heads, num_key_value_heads=w.heads, max_position_embeddings=w.seq,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=w.tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    vocab_words, rng = words(w.vocab), random.Random(seed)
    rows = [{"prompt": " ".join(rng.choices(vocab_words, k=w.prompt - 1)),
             "chosen": " " + " ".join(rng.choices(vocab_words, k=w.response - 1)),
             "rejected": " " + " ".join(rng.choices(vocab_words, k=w.response - 1))} for _ in range(w.pairs)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "n_params").write_text(json.dumps(n_params))
    spec.write_text(json.dumps(asdict(w)))
    return {"model": str(model_dir), "data": str(data), "n_params": n_params}


def sparsepo_overrides(w: Workload, built: dict, *, precision: str = "fp32") -> list[str]:
    """The run settings both benchmark scripts use: AdamW lr 1e-5 constant, clip 1.0, no warm-up, no
    checkpoint at the end, log every step (the per-step times, read from metrics.jsonl) and nothing to
    TensorBoard (TRL's side runs report_to=[]), data lengths that keep every token."""
    return [f"model.path={built['model']}", f"data.path={built['data']}", f"data.max_length={w.seq}",
            f"data.max_prompt_length={w.prompt}", "method.name=dpo", "optim.lr=1e-5", "optim.schedule=constant",
            "optim.warmup_steps=0", "optim.grad_clip=1.0", f"train.micro_batch_size={w.batch}",
            f"train.max_steps={w.steps}", "train.epochs=1000", f"train.precision={precision}",
            "checkpoint.at_end=false", "logging.log_every=1", "logging.report_to=[]", "logging.overwrite=true",
            "logging.progress=false"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="issue19", choices=sorted(PRESETS))
    p.add_argument("--out", required=True)
    a = p.parse_args()
    print(json.dumps(build(PRESETS[a.preset], Path(a.out))))


if __name__ == "__main__":
    main()
