"""SPO's samples inside the training step: draw them from the policy, score both sides, hand the loss
its `needs_policy_samples` fields. The trainer builds one `PolicySamples` when the method's table row
asks for samples and calls `fields` once per micro-batch; it never branches on the method's name.

Per micro-batch (the KL of sparsepo.losses.spo / sparsepo.losses.kl):
  1. every `generation.every_steps` steps: keyed samples from the micro-batch's prompts (or from
     generation.prompts_path) (`PolicyEngine.generate`, ZeRO-3 gathered or synced); other steps reuse that micro-slot's round;
  2. the policy's forward on the samples, WITH gradient: token log-probs and its top-K ids (K =
     reference.topk), the KL's support;
  3. the reference side from the source (`score_samples`: the one scoring function) at the sampled
     tokens and the support ids (and its own top-K when kl_support="union");
  4. both sides' log-probs at the same support ids (duplicates of the union masked to no mass).
"""

from __future__ import annotations

import logging
import time

import torch

from sparsepo.data.prompts import prompts_for
from sparsepo.generation import KeyedSampler, prompts_from, prompts_of, sample_batch
from sparsepo.losses.kl import mask_support, union_support
from sparsepo.models import logps_at, response_logps, topk_at_response

log = logging.getLogger("sparsepo")


class PolicySamples:
    """Owns the sample rounds of one policy rank (at most one per micro-slot index, reused between rounds)."""

    def __init__(self, gen, *, source, topk: int, support: str, seed: int, pad_id: int, eos_id: int,
                 prompts: list | None = None, rank: int = 0, dp: int = 1, grad_accum: int = 1):
        """`prompts`: (id, token ids) from generation.prompts_path (`data.prompts.load_prompts`), or None
        to sample from each micro-batch's own prompts."""
        if not hasattr(source, "score_samples"):
            raise ValueError(f"{type(source).__name__} cannot score policy samples: SPO needs reference.mode=inline")
        self.gen, self.source, self.topk, self.support = gen, source, topk, support
        self.seed, self.pad_id, self.eos_id = seed, pad_id, eos_id
        self.prompts, self.rank, self.dp, self.grad_accum = prompts, rank, dp, grad_accum
        self.rounds: dict[int, object] = {}
        self.logged_path = False

    def _draw(self, policy, batch, step: int, micro: int) -> tuple[object, dict]:
        g = self.gen
        if self.prompts is None:
            prompts = prompts_of(batch, self.pad_id, g.samples_per_prompt)
        else:
            items = prompts_for(self.prompts, step=step, micro=micro, rank=self.rank, dp=self.dp,
                                grad_accum=self.grad_accum, per_slot=batch.num_pairs)
            prompts = prompts_from(items, self.pad_id, g.samples_per_prompt, device=batch.input_ids.device)
        sampler = KeyedSampler(prompts.keys, seed=self.seed * 1_000_003 + step, prompt_width=prompts.input_ids.shape[1],
                               temperature=g.temperature, top_p=g.top_p)
        t0 = time.perf_counter()
        ids, path = policy.generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=g.max_new_tokens,
                                    processor=sampler, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                    params=g.params)
        seconds = time.perf_counter() - t0
        samples = sample_batch(ids, prompts, eos_id=self.eos_id, pad_id=self.pad_id)
        self.rounds[micro] = samples
        tokens = float(samples.lengths.sum())
        if not self.logged_path:
            log.info("SPO generation: path=%s, %d samples, %.0f tokens in %.3fs (%.0f tokens/s on this rank)",
                     path, len(samples.keys), tokens, seconds, tokens / max(seconds, 1e-9))
            self.logged_path = True
        return samples, {"gen_time": seconds, "gen_tokens_per_s": tokens / max(seconds, 1e-9), "samples_fresh": 1.0}

    def fields(self, policy, batch, *, step: int, micro: int) -> tuple[dict, dict]:
        """(LossInputs fields for needs_policy_samples, metrics) for this micro-batch."""
        if step % self.gen.every_steps == 0 or micro not in self.rounds:
            samples, metrics = self._draw(policy, batch, step, micro)
        else:
            samples, metrics = self.rounds[micro], {"gen_time": 0.0, "samples_fresh": 0.0}
        mask = samples.sample_mask
        logits = policy(input_ids=samples.input_ids, attention_mask=samples.attention_mask, use_cache=False).logits.float()
        policy_tok, _ = response_logps(logits, samples.input_ids, mask)
        _, policy_ids = topk_at_response(logits.detach(), mask, self.topk)
        outputs = ("token_logps", "request_logps") + (("topk_ids", "topk_logps") if self.support == "union" else ())
        ref = self.source.score_samples(samples, policy_ids, outputs)
        ids, keep = union_support(policy_ids, ref.get("topk_ids"))
        ref_support = ref["request_logps"] if self.support == "policy" else torch.cat([ref["request_logps"],
                                                                                        ref["topk_logps"]], -1)
        keep = keep & (mask.unsqueeze(-1) != 0)
        fields = dict(sample_mask=mask, policy_sample_token_logps=policy_tok,
                      ref_sample_token_logps=ref["token_logps"].to(policy_tok.dtype),
                      policy_sample_topk_logps=mask_support(logps_at(logits, ids, mask), keep),
                      ref_sample_topk_logps=mask_support(ref_support.to(logits.dtype), keep))
        with torch.no_grad():
            logp = logits[:, :-1].log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            valid = mask[:, 1:]
            metrics.update(sample_entropy=float((entropy * valid).sum() / valid.sum().clamp(min=1)),
                           sample_length=float(samples.lengths.mean()))
        return fields, metrics

