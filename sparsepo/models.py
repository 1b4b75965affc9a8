"""Hugging Face models and tokenizers, and the one forward pass both sides share.

`pair_forward` runs chosen + rejected of a collated batch through a causal LM in one forward and
returns per-token and sequence log-probs of the response tokens (plus, when asked, the log-probs at
given token ids, for sparse-distribution methods). The policy (inside its DeepSpeed engine) and the
reference scorer both call it, so the two sides can never disagree on alignment or masking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepo.logprobs import chunked_logps, hidden_forward
from sparsepo.losses.common import gather_logps, log_sq_mass, token_logps_from_logits, topk_logps_from_logits


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


def load_frozen_model(path: str, *, device: torch.device | str = "cpu", precision: str = "fp32",
                      attn_implementation: str = "sdpa"):
    """A model for scoring only: eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation).to(device)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class PairForward:
    """Outputs for 2B rows (chosen rows first, then rejected), T padded positions."""

    token_logps: torch.Tensor  # (2B,T) log p(x_t | x_<t), zero outside the response
    seq_logps: torch.Tensor  # (2B,) sum over response tokens
    logits: torch.Tensor | None = None  # (2B,T,V) float32 on the plain path (logits_chunk=0); None on the lean one
    logps_at_ids: torch.Tensor | None = None  # (2B,T,K) log-probs at pair_forward's `ids`, zero outside the response
    log_sq_mass: torch.Tensor | None = None  # (2B,T) log Σ_v p(v|x_<t)², no gradient, zero outside (sq_mass=True)


def response_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logps (N,T), seq_logps (N,)) of the response tokens from float32 logits (N,T,V):
    position t from logits[t-1], position 0 is 0, zero outside the response mask."""
    token_logps = token_logps_from_logits(logits, input_ids) * response_mask
    return token_logps, token_logps.sum(-1)


def pair_forward(model, batch, *, ids: torch.Tensor | None = None, chunk: int = 0, sq_mass: bool = False) -> PairForward:
    """The policy's forward of a collated batch. `ids` (2B,T,K): also the log-probs at those ids
    (TDPO: the reference's top-K). `sq_mass`: also log Σ_v p(v|x_<t)² at each response position
    (WPO's weights; `losses.common.log_sq_mass`), without gradient. `chunk` > 0: the lean path
    (`sparsepo.logprobs`), no (2B,T,V) logits, `chunk` response positions per head call; 0, or a
    family the lean path does not know: the plain path, full float32 logits kept in `logits`."""
    src = hidden_forward(model, batch.input_ids, batch.attention_mask, chunk) if chunk > 0 else None
    if src is not None:
        got = chunked_logps(src, batch.input_ids, batch.response_mask, ids=ids, sq_mass=sq_mass)
        return PairForward(token_logps=got["token_logps"], seq_logps=got["seq_logps"], logps_at_ids=got.get("logps_at"),
                           log_sq_mass=got.get("log_sq_mass"))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits.float()
    token_logps, seq_logps = response_logps(logits, batch.input_ids, batch.response_mask)
    at = logps_at(logits, ids, batch.response_mask) if ids is not None else None
    sq = sq_mass_at_response(logits, batch.response_mask) if sq_mass else None
    return PairForward(token_logps=token_logps, seq_logps=seq_logps, logits=logits, logps_at_ids=at, log_sq_mass=sq)


def sq_mass_at_response(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,T): log Σ_v p(v|x_<t)² at position t (from logits[t-1]; position 0 is 0), zero outside the mask."""
    return torch.nn.functional.pad(log_sq_mass(logits[:, :-1]), (1, 0)) * mask


def topk_at_response(logits: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k next-token log-probs (values, ids), zeroed outside the response mask."""
    values, ids = topk_logps_from_logits(logits, k)
    keep = mask.unsqueeze(-1)
    return values * keep, (ids * keep.long())


def logps_at(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return gather_logps(logits, ids) * mask.unsqueeze(-1)
