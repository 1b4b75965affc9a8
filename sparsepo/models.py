"""Hugging Face models and tokenizers, and the one forward pass both sides share.

`pair_forward` runs chosen + rejected of a collated batch through a model's `Head` in one forward and
returns per-token and sequence log-probs of the response tokens (plus, when asked, the log-probs at
given token ids, for sparse-distribution methods). The policy (inside its DeepSpeed engine) and the
reference scorer both call it, so the two sides can never disagree on alignment or masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsepo.config.sections import ConfigError
from sparsepo.logprobs.head import Head, fields


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    return tok


class TokenizerMismatch(ConfigError):
    """A model that scores the run's tokens (reference, oracle, an SAE's model) with another tokenizer."""


def token_digest(tokenizer) -> str:
    """sha256 of what maps text to ids and ids to meaning: the backend's JSON (or the vocabulary), the
    special ids and a probe encoding (not the chat template: the data is rendered once, by the run's
    tokenizer)."""
    import hashlib
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps({"special": [tokenizer.bos_token_id, tokenizer.eos_token_id], "size": len(tokenizer),
                        "probe": tokenizer("Probe: Hello, world 123.")["input_ids"]}, sort_keys=True)
    return hashlib.sha256((body + extra).encode()).hexdigest()


def check_same_tokens(role: str, path: str, run_tokenizer: str, run_model: str, error=TokenizerMismatch) -> None:
    """Refuse (``error``, naming both directories) a ``role`` model at ``path`` whose tokenizer differs
    from the run's (``config.paths.run_tokenizer``) or whose vocabulary size differs from the policy's at
    ``run_model``: its log-probs would describe other tokens. Reads tokenizer files and configs only,
    never weights. A model directory without tokenizer files is taken to use the run's tokenizer."""
    from transformers import AutoConfig

    from sparsepo.config.paths import TOKENIZER_FILES

    def loaded(what: str, where: str, fn):
        try:
            return fn(where)
        except (OSError, ValueError) as e:
            raise error(f"{role}: cannot load the {what} at {where}: {e}") from e

    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        mine = token_digest(loaded(f"{role} tokenizer", path, load_tokenizer))
        if mine != token_digest(loaded("run tokenizer", run_tokenizer, load_tokenizer)):
            raise error(f"the {role} tokenizer at {path} differs from the policy tokenizer at {run_tokenizer}; "
                        f"its scores would be over other tokens. Use a {role} with the policy's tokenizer")
    vocab = loaded(f"{role} model config", path, AutoConfig.from_pretrained).vocab_size
    policy_vocab = loaded("policy model config", run_model, AutoConfig.from_pretrained).vocab_size
    if vocab != policy_vocab:
        raise error(f"the {role} at {path} has a vocabulary of {vocab} but the policy at {run_model} has "
                    f"{policy_vocab}; it must share the policy's vocabulary")


def load_frozen_model(path: str, *, device: torch.device | str = "cpu", precision: str = "fp32",
                      attn_implementation: str = "auto", quantization=None):
    """A model for scoring only: eval mode, no gradients. ``quantization``: a transformers quantization
    config (QLoRA's 4-bit reference, ``lora.quantization_config``), loaded straight onto ``device``."""
    from transformers import AutoModelForCausalLM

    from sparsepo.config.device import attention_kwargs, precision_dtype

    dtype = precision_dtype(precision)

    if quantization is not None:
        from sparsepo.lora import portable_4bit

        model = portable_4bit(AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization, device_map={"": torch.device(device)},
            **attention_kwargs(attn_implementation)))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **attention_kwargs(attn_implementation)).to(device)
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
    aux_loss: torch.Tensor | None = None  # () an MoE router's load-balancing loss, with gradient (router_aux=True)
    logit_mean: torch.Tensor | None = None  # (2B,T) mean logit predicting each response token (plain path only)
    entropy: torch.Tensor | None = None  # (2B,T) entropy of p(·|x_<t) at response positions, no gradient (stats=True)
    top1_ids: torch.Tensor | None = None  # (2B,T) argmax of p(·|x_<t) at response positions (stats=True)


def pair_forward(head: Head, batch, *, ids: torch.Tensor | None = None, sq_mass: bool = False,
                 router_aux: bool = False, logit_mean: bool = False, stats: bool = False) -> PairForward:
    """The policy's forward of a collated batch through its `head` (`sparsepo.logprobs.head.Head`: the
    plain or the lean path, chosen when the model was loaded). `ids` (2B,T,K): also the log-probs at
    those ids (TDPO: the reference's top-K). `sq_mass`: also log Σ_v p(v|x_<t)² at each response
    position (WPO's weights; `logprobs.plain.log_sq_mass`), without gradient. `router_aux`: an MoE
    model's router load-balancing loss too (`aux_loss`), from the model's own forward (the plain path).
    `logit_mean`: TRL's `logits/*` input where the path holds full logits (`plain.Logits.fields`).
    `stats`: also the entropy and the top-1 id at each response position (TRL's `entropy` and
    `mean_token_accuracy`; no gradient, both paths)."""
    aux = None
    if router_aux:
        out = head.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                         output_router_logits=True)
        aux = getattr(out, "aux_loss", None)
        if aux is None:
            inner = getattr(head.model, "module", head.model)
            raise ValueError(f"model.router_aux_loss_coef > 0 but {type(inner).__name__} returns no router "
                             f"aux_loss (not a mixture-of-experts model)")
        got = fields(out.logits, batch.input_ids, batch.response_mask, ids=ids, sq_mass=sq_mass, logit_mean=logit_mean,
                     entropy=stats, topk=int(stats))
    else:
        got = head(batch.input_ids, batch.attention_mask, batch.response_mask, ids=ids, sq_mass=sq_mass,
                   logit_mean=logit_mean, entropy=stats, topk=int(stats))
    top1 = got.get("topk_ids")
    return PairForward(token_logps=got["token_logps"], seq_logps=got["seq_logps"], logps_at_ids=got.get("logps_at"),
                       log_sq_mass=got.get("log_sq_mass"), aux_loss=aux, logit_mean=got.get("logit_mean"),
                       entropy=got.get("entropy"), top1_ids=None if top1 is None else top1[..., 0])
