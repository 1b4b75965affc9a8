"""Pooled SAE features (FPO's c̄, 2411.07618 Eq. 10) and reconstruction diagnostics.

Only masked (response) tokens are encoded, in chunks, and pooled with `index_add`, so the dense
(tokens × d_sae) activations exist one chunk at a time. For a TopK SAE the graph kept for
backward is small as well (the input chunk and the k winning indices per token).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_TOKENS = 4096


def _masked_tokens(sae, hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,D) selected token states and the (M,) row each came from."""
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be (N,T,D), got shape {tuple(hidden.shape)}")
    d_in = sae.cfg.d_in
    if hidden.shape[-1] != d_in:
        raise ValueError(f"hidden states have width {hidden.shape[-1]} but the SAE reads d_in={d_in}")
    w = sae.W_enc
    if w.device != hidden.device:
        raise ValueError(f"SAE is on {w.device} but the hidden states are on {hidden.device}: "
                         f"load it with load_sae(..., device='{hidden.device}') or sae.to(device)")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden {tuple(hidden.shape[:2])}")
    m = mask.to(hidden.device).bool()
    rows = m.nonzero(as_tuple=True)[0]
    return hidden[m], rows


POOLS = ("response", "predicting_states")


def pooling_mask(response_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Which positions' states FPO pools (N,T), from the response mask (N,T): "response" = the response
    tokens' own states (this repository's default); "predicting_states" = the states that predict
    them, position t−1 for each response token t (the official FPO code's `fm[:, :-1]` under the
    shifted label mask). Same dtype as the response mask."""
    if pool == "response":
        return response_mask
    if pool != "predicting_states":
        raise ValueError(f"pool must be one of {', '.join(POOLS)} (got {pool!r})")
    return torch.nn.functional.pad(response_mask[:, 1:], (0, 1))


def pooled_features(sae, hidden: torch.Tensor, mask: torch.Tensor, *,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """(N,F) mean of `sae.encode` over the positions where mask (N,T) is 1; zeros for empty rows.

    Differentiable w.r.t. `hidden` (N,T,D); the SAE's own parameters should be frozen. Output is in
    the SAE's dtype (sae-lens casts the input to it inside `encode`).
    """
    tokens, rows = _masked_tokens(sae, hidden, mask)
    n = hidden.shape[0]
    sums = torch.zeros(n, sae.cfg.d_sae, dtype=sae.W_enc.dtype, device=hidden.device)
    for start in range(0, tokens.shape[0], chunk_tokens):
        acts = sae.encode(tokens[start:start + chunk_tokens])
        sums = sums.index_add(0, rows[start:start + chunk_tokens], acts.to(sums.dtype))
    counts = mask.to(hidden.device).bool().sum(dim=1).clamp(min=1).to(sums.dtype)
    return sums / counts.unsqueeze(-1)


def sparse_topk(pooled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N,k) long, values (N,k)) of the k largest pooled features per row, largest first."""
    if not 0 < k <= pooled.shape[-1]:
        raise ValueError(f"k={k} must be in 1..{pooled.shape[-1]} (the SAE's number of features)")
    values, ids = torch.topk(pooled, k, dim=-1)
    return ids, values


@torch.no_grad()
def reconstruction_stats(sae, hidden: torch.Tensor, mask: torch.Tensor | None = None, *,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, float]:
    """How well the SAE reconstructs the masked token states (sae-lens' definitions).

    explained_variance = 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean over the selected tokens);
    l0 = mean number of active features per token; mse = mean squared error per element.
    `hidden` may also be a flat (M,D) tensor of token states, with mask None.
    """
    if hidden.ndim == 2 and mask is None:
        hidden = hidden.unsqueeze(0)
    tokens, _ = _masked_tokens(sae, hidden, mask)
    m, d = tokens.shape
    if m == 0:
        return {"explained_variance": float("nan"), "l0": float("nan"), "mse": float("nan"), "tokens": 0}
    sse = 0.0
    l0 = 0.0
    s1 = torch.zeros(d, dtype=torch.float64, device=tokens.device)
    s2 = torch.zeros(d, dtype=torch.float64, device=tokens.device)
    for start in range(0, m, chunk_tokens):
        x = tokens[start:start + chunk_tokens]
        acts = sae.encode(x)
        x64 = x.double()
        sse += (sae.decode(acts).double() - x64).pow(2).sum().item()
        l0 += (acts != 0).sum().item()
        s1 += x64.sum(0)
        s2 += x64.pow(2).sum(0)
    total_var = (s2 - s1.pow(2) / m).sum().item()
    return {
        "explained_variance": 1.0 - sse / total_var if total_var > 0 else float("nan"),
        "l0": l0 / m,
        "mse": sse / (m * d),
        "tokens": m,
    }
