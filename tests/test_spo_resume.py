"""SPO's in-flight samples are part of the checkpoint: with staleness s > 0 a step trains on the round
drawn s steps earlier (by weights a checkpoint no longer holds), and with generation.every_steps > 1
a step reuses the last round, so a resume that forgot them would train on other samples. Interrupted
at a step where both matter and resumed, the run equals the uninterrupted one per step."""

from __future__ import annotations

import pytest
import torch

from conftest import read_scalars, run_training

STEPS, HALF = 6, 3
SPO = ("method.name=spo", "generation.max_new_tokens=8", "optim.lr=1e-2",
       "optim.schedule=constant", "optim.warmup_steps=0", "train.micro_batch_size=2", "train.grad_accum=2",
       "generation.staleness=1", "generation.every_steps=2", f"checkpoint.every_steps={HALF}")


MODES = {"inline": (("reference.mode=inline", "method.kl_estimator=k3"), 1),  # k3: the π_old ratio resumes too
         # live: the save waits for the reference group's pending answers (collected in request order)
         "live": (("reference.mode=live", "topology.reference_ranks=1"), 2)}


@pytest.mark.parametrize("mode", [pytest.param("inline", marks=[pytest.mark.integration, pytest.mark.slow]),
                                  pytest.param("live", marks=[pytest.mark.distributed, pytest.mark.slow])])
def test_spo_with_staleness_resumes_exactly(tiny_world, tmp_path, mode):
    """Step 4 (index 3) is the first after the resume: it trains on the round drawn at index 2 (s = 1)
    and, as 3 % every_steps != 0, draws no fresh round but re-requests index 2's samples: both from
    the checkpoint. Two micro-batches per step: each micro-slot keeps its own rounds."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra, nproc = MODES[mode]
    run_training(tiny_world, full, *SPO, *extra, f"train.max_steps={STEPS}", nproc=nproc)
    run_training(tiny_world, part, *SPO, *extra, f"train.max_steps={HALF}", nproc=nproc)
    proc = run_training(tiny_world, part, *SPO, *extra, f"train.max_steps={STEPS}", resume="auto", nproc=nproc)
    assert f"continuing at step {HALF}" in proc.stdout + proc.stderr
    assert "SPO sample state restored" in proc.stdout + proc.stderr
    ratio = ("sample_is_ratio",) if "method.kl_estimator=k3" in extra else ()
    for tag in ("loss", "sample_kl", "sample_length", "staleness", *ratio):
        want, got = read_scalars(full, f"train/{tag}"), read_scalars(part, f"train/{tag}")
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), tag
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (tag, step, got, want)
    assert read_scalars(full, "train/sample_kl")[HALF + 1] > 1e-4  # the KL term sees the drifted policy
    if ratio:  # stale rounds: the policy has moved since they were drawn
        assert any(abs(v - 1.0) > 1e-4 for v in read_scalars(full, "train/sample_is_ratio").values())


class InOrderSource:
    """An inline scorer behind live's contract: a request is scored only when collected, and answers
    come in request order (a collect out of order is an error, as LiveSource's sequence check)."""

    def __init__(self, inner):
        self.inner, self.sent, self.collected = inner, [], 0

    def request(self, samples, ids, outputs):
        self.sent.append((samples, ids, outputs))
        return len(self.sent) - 1

    def collect(self, ticket):
        assert ticket == self.collected, f"collected request {ticket} before {self.collected}"
        self.collected += 1
        return self.inner.score_samples(*self.sent[ticket])


@pytest.mark.unit
def test_sample_state_round_trips_the_pending_rounds_in_request_order(tmp_path):
    """staleness 2, 2 micro-slots, every_steps 2: after 3 steps the state (through torch.save and a
    weights-only load) holds each slot's last round and its 2 pending rounds, collected in request
    order; a restored PolicySamples then gives the same fields as the original for 2 more steps,
    while a fresh one does not (it draws a new round and trains on it unstale)."""
    from sparsepo.config.generation import GenerationConfig
    from sparsepo.data.batching import collate_pairs
    from sparsepo.logprobs.head import PlainHead
    from sparsepo.policy_samples import PolicySamples
    from sparsepo.reference_role.sources import InlineSource
    from test_pipeline_reference import VOCAB, tiny_llama
    from test_spo_trainer import PlainPolicy

    policy, reference = PlainPolicy(tiny_llama(seed=0)), tiny_llama(seed=1)
    batches = [collate_pairs([dict(example_id=f"e{m}{i}", prompt_ids=list(range(3, 6 + i + m)), chosen_ids=[7, 2],
                                   rejected_ids=[8, 2]) for i in range(2)], 0) for m in range(2)]

    def make():
        return PolicySamples(GenerationConfig(max_new_tokens=5, staleness=2, every_steps=2),
                             source=InOrderSource(InlineSource(PlainHead(reference), (), topk=4)), topk=4, support="union",
                             seed=0, pad_id=0, eos_id=2, grad_accum=2, staleness=2)

    def walk(ps, steps):
        return [ps.fields(policy, batches[m], step=t, micro=m) for t in steps for m in range(2)]

    first = make()
    walk(first, range(3))
    torch.save(first.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert first.source.collected == len(first.source.sent) == 6
    assert {m: [e["step"] for e in q] for m, q in state["pending"].items()} == {0: [1, 2], 1: [1, 2]}
    restored, fresh = make(), make()
    assert restored.load_state_dict(state)
    want, got, other = walk(first, (3, 4)), walk(restored, (3, 4)), walk(fresh, (3, 4))
    assert len(restored.source.sent) == 4  # only the new rounds' requests: the restored ones were collected
    for (wf, wm), (gf, gm) in zip(want, got):
        assert wm["staleness"] == gm["staleness"] == 2.0
        for k in wf:
            assert torch.equal(wf[k], gf[k]), k
    assert other[0][1]["staleness"] == 0.0
    assert all(f["old_sample_token_logps"] is not None for f, _ in want)  # π_old of each stale round, restored
    assert not torch.equal(other[0][0]["policy_sample_token_logps"], want[0][0]["policy_sample_token_logps"])
    wrong = make()
    wrong.grad_accum = 1
    assert not wrong.load_state_dict(state) and wrong.pending == {}
