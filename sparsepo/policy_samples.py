"""SPO's samples inside the training step: draw them from the policy, score both sides, hand the loss
its `needs_policy_samples` fields. The trainer builds one `PolicySamples` when the method's table row
asks for samples and calls `fields` once per micro-batch; it never branches on the method's name.

Per micro-batch (the KL of sparsepo.losses.spo / sparsepo.losses.kl):
  1. every `generation.every_steps` steps: keyed samples from the micro-batch's prompts (or from
     generation.prompts_path) (`PolicyEngine.generate`, ZeRO-3 gathered or synced); other steps reuse that micro-slot's round;
  2. the policy's forward on the samples, WITH gradient: token log-probs and its top-K ids (K =
     reference.topk), the KL's support;
  3. the reference side from the source (request/collect: inline scores at once; live sends a REQUEST
     over the bridge and the group's pipeline answers; both by the one scoring function) at the
     sampled tokens and the support ids (and its own top-K when kl_support="union"); with staleness
     s > 0 the step uses the round drawn s steps earlier (its support ids chosen then), so the
     reference's answer can arrive while the policy trains;
  4. both sides' log-probs at the same support ids (duplicates of the union masked to no mass).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from sparsepo.data.prompts import prompts_for
from sparsepo.generation import KeyedSampler, SampleBatch, prompts_from, prompts_of, sample_batch
from sparsepo.losses.kl import mask_support, union_support
from sparsepo.logprobs.head import Head, PlainHead
from sparsepo.reference_role.sources import SampleSource
from sparsepo.logprobs.head import fields as head_fields

log = logging.getLogger("sparsepo")


@dataclass
class PendingRound:
    """A sample round drawn at `step` whose reference scores regularise step + staleness."""

    step: int
    samples: SampleBatch
    ids: torch.Tensor  # (S,T,K) the policy's support ids, chosen when the round was drawn
    ticket: Any = None  # what source.collect redeems (None when restored from a checkpoint: ref is set)
    ref: dict | None = None  # the reference's scores, once collected
    old: torch.Tensor | None = None  # (S,T) the drawing policy's token log-probs (π_old of the k1/k3 ratio)

    def wait(self, source) -> dict:
        """The reference's scores, collected from `source` on first use (live answers in request order)."""
        if self.ref is None:
            self.ref = source.collect(self.ticket)
        return self.ref


class PolicySamples:
    """Owns the sample rounds of one policy rank (at most one per micro-slot index, reused between rounds)."""

    def __init__(self, gen, *, source, topk: int, support: str, seed: int, pad_id: int, eos_id: int,
                 prompts: list | None = None, rank: int = 0, dp: int = 1, grad_accum: int = 1, staleness: int = 0,
                 head: Head | None = None):
        """`prompts`: (id, token ids) from generation.prompts_path (`data.prompts.load_prompts`), or None
        to sample from each micro-batch's own prompts. `source`: the run's reference source, with
        request(samples, ids, outputs) -> ticket and collect(ticket) -> {name: tensor} (inline or live).
        `staleness` s: samples drawn at step t regularise step t + s (the first steps reuse step 0's).
        `head`: the policy's `sparsepo.logprobs.head.Head` (plain or lean, chosen where the policy was
        loaded); None: the plain path on the policy given to `fields`."""
        if not isinstance(source, SampleSource):
            raise ValueError(f"{type(source).__name__} cannot score policy samples: SPO needs reference.mode=inline "
                             f"or live")
        self.gen, self.source, self.topk, self.support = gen, source, topk, support
        self.seed, self.pad_id, self.eos_id = seed, pad_id, eos_id
        self.prompts, self.rank, self.dp, self.grad_accum = prompts, rank, dp, grad_accum
        self.staleness = staleness
        self.head = head
        self.rounds: dict[int, object] = {}
        self.round_logps: dict[int, torch.Tensor] = {}  # per micro-slot: the drawing policy's token log-probs
        self.pending: dict[int, deque[PendingRound]] = {}
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

    def _forward(self, policy, samples):
        """One forward of the policy on the samples, WITH gradient: its head's output (`Head.forward`)."""
        head = self.head if self.head is not None else PlainHead(policy)
        return head.forward(samples.input_ids, samples.attention_mask)

    def _support_ids(self, out, samples):
        """(the policy's top-K ids at each sample position (the KL's support), its token log-probs), no gradient."""
        with torch.no_grad():
            got = head_fields(out, samples.input_ids, samples.sample_mask, topk=self.topk)
            return got["topk_ids"], got["token_logps"]

    @staticmethod
    def _policy_side(out, samples, ids):
        """(token log-probs (S,T), log-probs at `ids` (S,T,K), entropy (S,T) no grad), zero outside the samples."""
        got = head_fields(out, samples.input_ids, samples.sample_mask, ids=ids, entropy=True)
        return got["token_logps"], got["logps_at"], got["entropy"]

    def state_dict(self) -> dict:
        """The in-flight sample state, for the checkpoint: per micro-slot the last round (reused while
        step % every_steps != 0) and the pending rounds of staleness s > 0 with their support ids and
        reference scores. They were drawn by weights the checkpoint no longer holds, so a resume cannot
        redraw them. Scores not yet collected are waited for here, in request order (live answers in order)."""
        entries = sorted(((e.step, micro, e) for micro, queue in self.pending.items() for e in queue),
                         key=lambda t: t[:2])
        for _, _, entry in entries:
            entry.wait(self.source)
        return {"grad_accum": self.grad_accum, "dp": self.dp, "rounds": {m: _plain(r) for m, r in self.rounds.items()},
                "round_logps": {m: v.cpu() for m, v in self.round_logps.items()},
                "pending": {m: [{"step": e.step, "samples": _plain(e.samples), "ids": e.ids.cpu(),
                                 "ref": {k: v.cpu() for k, v in e.ref.items()},
                                 **({} if e.old is None else {"old": e.old.cpu()})} for e in q]
                            for m, q in self.pending.items()}}

    def load_state_dict(self, state: dict, device="cpu") -> bool:
        """Continue from `state_dict()`'s state (the collected scores need no new request); False (state
        left fresh, with a warning) when the global batch was split otherwise: its micro-slots differ."""
        if (state["grad_accum"], state["dp"]) != (self.grad_accum, self.dp):
            log.warning("SPO sample state of grad_accum %d x %d rank(s) does not fit grad_accum %d x %d: the "
                        "samples start afresh and the resume is not exact", state["grad_accum"], state["dp"],
                        self.grad_accum, self.dp)
            return False
        self.rounds = {int(m): _batch(r, device) for m, r in state["rounds"].items()}
        self.round_logps = {int(m): v.to(device) for m, v in state.get("round_logps", {}).items()}
        self.pending = {int(m): deque(PendingRound(e["step"], _batch(e["samples"], device), e["ids"].to(device),
                                                   ref={k: v.to(device) for k, v in e["ref"].items()},
                                                   old=e["old"].to(device) if "old" in e else None) for e in q)
                        for m, q in state["pending"].items()}
        if "round_logps" not in state and (self.rounds or self.pending):
            log.warning("SPO sample state written by an older sparsepo keeps no log-probs of the policy that drew "
                        "its rounds: k1/k3 regularise those rounds without the importance ratio until they are redrawn")
        return True

    def fields(self, policy, batch, *, step: int, micro: int) -> tuple[dict, dict]:
        """(LossInputs fields for needs_policy_samples, metrics) for this micro-batch."""
        fresh = step % self.gen.every_steps == 0 or micro not in self.rounds
        if fresh:
            samples, metrics = self._draw(policy, batch, step, micro)
        else:
            samples, metrics = self.rounds[micro], {"gen_time": 0.0, "samples_fresh": 0.0}
        outputs = ("token_logps", "request_logps") + (("topk_ids", "topk_logps") if self.support == "union" else ())
        if self.staleness == 0:  # synchronous: one forward gives the support ids and the loss's log-probs
            out = self._forward(policy, samples)
            request_ids, token_logps = self._support_ids(out, samples)
            if fresh:
                self.round_logps[micro] = token_logps
            # reused rounds (every_steps > 1) were drawn by an older policy: k1/k3 weight them by πθ/π_old
            old = None if self.gen.every_steps == 1 else self.round_logps.get(micro)
            t0 = time.perf_counter()
            ref = self.source.collect(self.source.request(samples, request_ids, outputs))
            metrics.update(staleness=0.0, sample_ref_wait=time.perf_counter() - t0)
        else:  # samples drawn now regularise step + s; this step uses the round drawn at max(0, step - s)
            with torch.no_grad():
                ids_now, token_logps = self._support_ids(self._forward(policy, samples), samples)
            if fresh:
                self.round_logps[micro] = token_logps
            queue = self.pending.setdefault(micro, deque())
            queue.append(PendingRound(step, samples, ids_now, ticket=self.source.request(samples, ids_now, outputs),
                                      old=self.round_logps.get(micro)))
            entry, t0 = queue[0], time.perf_counter()
            ref = entry.wait(self.source)
            metrics["sample_ref_wait"] = time.perf_counter() - t0
            if len(queue) == self.staleness + 1:
                queue.popleft()
            drawn, samples, request_ids, old = entry.step, entry.samples, entry.ids, entry.old
            out = self._forward(policy, samples)
            metrics["staleness"] = float(step - drawn)
        mask = samples.sample_mask
        ids, keep = union_support(request_ids, ref.get("topk_ids"))
        policy_tok, policy_support, entropy = self._policy_side(out, samples, ids)
        ref_support = ref["request_logps"] if self.support == "policy" else torch.cat([ref["request_logps"],
                                                                                        ref["topk_logps"]], -1)
        keep = keep & (mask.unsqueeze(-1) != 0)
        fields = dict(sample_mask=mask, policy_sample_token_logps=policy_tok,
                      ref_sample_token_logps=ref["token_logps"].to(policy_tok.dtype),
                      old_sample_token_logps=old,
                      policy_sample_topk_logps=mask_support(policy_support, keep),
                      ref_sample_topk_logps=mask_support(ref_support.to(policy_support.dtype), keep))
        metrics.update(sample_entropy=float(entropy.sum() / mask.sum().clamp(min=1)),
                       sample_length=float(samples.lengths.mean()))
        return fields, metrics



def _plain(samples: SampleBatch) -> dict:
    """A SampleBatch as tensors and strings (loadable with torch.load(weights_only=True))."""
    return {"input_ids": samples.input_ids.cpu(), "attention_mask": samples.attention_mask.cpu(),
            "sample_mask": samples.sample_mask.cpu(), "keys": list(samples.keys)}


def _batch(d: dict, device) -> SampleBatch:
    return SampleBatch(input_ids=d["input_ids"], attention_mask=d["attention_mask"], sample_mask=d["sample_mask"],
                       keys=list(d["keys"])).to(device)
