"""Demo world sizes: everything that shapes a world (part of its cache fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass


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
