"""Hugging Face models and tokenizers, and the one forward pass both sides share.

`pair_forward` runs chosen + rejected of a collated batch through a model's `Head` in one forward and
returns per-token and sequence log-probs of the response tokens (plus, when asked, the log-probs at
given token ids, for sparse-distribution methods). The policy (inside its DeepSpeed engine) and the
reference scorer both call it, so the two sides can never disagree on alignment or masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepo.logprobs.head import Head


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def load_frozen_model(path: str, *, device: torch.device | str = "cpu", precision: str = "fp32"):
    """A model for scoring only: eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class PairForward:
    """Outputs for 2B rows (chosen rows first, then rejected), T padded positions."""

    token_logps: torch.Tensor  # (2B,T) log p(x_t | x_<t), zero outside the response
    seq_logps: torch.Tensor  # (2B,) sum over response tokens
    logps_at_ids: torch.Tensor | None = None  # (2B,T,K) log-probs at pair_forward's `ids`, zero outside the response
    log_sq_mass: torch.Tensor | None = None  # (2B,T) log Σ_v p(v|x_<t)², no gradient, zero outside (sq_mass=True)


def pair_forward(head: Head, batch, *, ids: torch.Tensor | None = None, sq_mass: bool = False) -> PairForward:
    """The policy's forward of a collated batch through its `head` (`sparsepo.logprobs.head.Head`: the
    plain or the lean path, chosen when the model was loaded). `ids` (2B,T,K): also the log-probs at
    those ids (TDPO: the reference's top-K). `sq_mass`: also log Σ_v p(v|x_<t)² at each response
    position (WPO's weights; `logprobs.plain.log_sq_mass`), without gradient."""
    got = head(batch.input_ids, batch.attention_mask, batch.response_mask, ids=ids, sq_mass=sq_mass)
    return PairForward(token_logps=got["token_logps"], seq_logps=got["seq_logps"], logps_at_ids=got.get("logps_at"),
                       log_sq_mass=got.get("log_sq_mass"))
