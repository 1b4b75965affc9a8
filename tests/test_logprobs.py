"""The lean log-prob path (sparsepo.logprobs) against the plain one (full float32 logits), on every
family of the table (tiny random models from tests/test_families.py, sequences longer than the
sliding window, right- and left-padded): every field the scorer and the policy read, in float32 to
1e-6 (plus 1e-6 relative: with several BLAS threads a sum of ~5 nats lands a few ulps away) and in bf16 to a stated bound, gradients in float32, and the head never sees a prompt or
padding position."""

from __future__ import annotations

import pytest
import torch
from test_families import CASES, VOCAB, batches, tiny_model

from sparsepo.logprobs.head import Head, LeanPathHead, PlainHead
from sparsepo.logprobs.lean import HeadInput, chunked_logps, hidden_forward, lean_head
from sparsepo.models import pair_forward
from sparsepo.reference.scoring import score

pytestmark = pytest.mark.unit

FIELDS = ("seq_logps", "token_logps", "topk_logps", "topk_ids", "request_logps")
K, CHUNK = 5, 7  # 7 does not divide the response lengths: the last chunk is short


def request_ids(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (*batch.input_ids.shape, 3), generator=g)


def both(model, batch, ids, chunk=CHUNK):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    plain = score(logits, batch.input_ids, batch.response_mask, FIELDS, topk=K, request_ids=ids)
    src = hidden_forward(model, batch.input_ids, batch.attention_mask, chunk)
    lean = score(src, batch.input_ids, batch.response_mask, FIELDS, topk=K, request_ids=ids)
    return plain, lean


@pytest.mark.parametrize("case", CASES)
def test_lean_scores_equal_the_plain_ones_in_float32(case):
    model = tiny_model(case)
    assert lean_head(model) is not None
    for i, batch in enumerate(batches()):
        plain, lean = both(model, batch, request_ids(batch, i))
        for name in FIELDS:
            assert lean[name].shape == plain[name].shape and lean[name].dtype == plain[name].dtype, name
            if name == "topk_ids":
                assert torch.equal(lean[name], plain[name]), (case, i)
            else:
                torch.testing.assert_close(lean[name], plain[name], atol=1e-6, rtol=1e-6, msg=f"{case} {i} {name}")  # rtol: BLAS threads


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_lean_scores_in_bf16_stay_within_the_stated_bound(case):
    """Same bf16 hidden state and head on both paths; log_softmax in float32 per chunk on the lean one.
    Bound: 2e-2 absolute on log-probs (bf16 head GEMMs over different row sets may round differently),
    top-K ids equal where the plain top-K values are separated by more than that."""
    model = tiny_model(case).to(torch.bfloat16)
    for i, batch in enumerate(batches()):
        plain, lean = both(model, batch, request_ids(batch, i))
        for name in ("seq_logps", "token_logps", "topk_logps", "request_logps"):
            bound = 2e-2 * (batch.response_mask.sum(-1).max() if name == "seq_logps" else 1)
            assert (lean[name] - plain[name]).abs().max() <= bound, (case, i, name)
        assert (lean["topk_ids"] == plain["topk_ids"]).float().mean() > 0.99


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_lean_gradients_equal_the_plain_ones(case):
    """pair_forward with chunk > 0 (checkpointed chunks) and chunk = 0: same values and same
    parameter gradients in float32 for a loss reading seq log-probs, token log-probs and the
    log-probs at given ids (TDPO's policy top-K)."""
    grads = []
    for chunk in (0, CHUNK):
        model = tiny_model(case)
        model.requires_grad_(True)
        batch = batches()[0]
        ids = request_ids(batch)
        head = Head.for_model(model, chunk)
        assert isinstance(head, LeanPathHead) == (chunk > 0)  # which path runs
        fwd = pair_forward(head, batch, ids=ids)
        w = torch.linspace(-1, 1, fwd.token_logps.shape[-1])
        loss = fwd.seq_logps.sum() + (fwd.token_logps * w).sum() + (fwd.logps_at_ids.exp() * 0.3).sum()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-6)
    assert g0.keys() == g1.keys() and all(g.abs().sum() > 0 for g in g0.values() if g.numel() > VOCAB * 4)
    for name in g0:  # 1e-6 of the tensor's scale (the tied embedding's gradient reaches ~10)
        assert (g1[name] - g0[name]).abs().max() <= 1e-6 * max(1.0, float(g0[name].abs().max())), name


def test_the_head_sees_response_positions_only_and_chunk_rows_at_most(monkeypatch):
    import sparsepo.logprobs.lean as lp

    model = tiny_model("llama")
    batch = batches()[0]
    calls, rows = [], []
    logits = lp.LeanHead.logits
    monkeypatch.setattr(lp.LeanHead, "logits", lambda self, h: rows.append(h.shape[0]) or logits(self, h))
    handle = model.lm_head.register_forward_hook(lambda _m, args, _o: calls.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        src = hidden_forward(model, batch.input_ids, batch.attention_mask, CHUNK)
        chunked_logps(src, batch.input_ids, batch.response_mask)
    finally:
        handle.remove()
    n, m = batch.input_ids.shape[0], int(batch.response_mask.sum())
    assert calls == [n, m]  # the model's own forward (logits_to_keep=1: one position per row), then one lean call
    assert max(rows) <= CHUNK and sum(rows) == m and len(rows) == -(-m // CHUNK)
    assert m < batch.input_ids.numel() // 2  # prompts and padding were skipped


@pytest.mark.parametrize("chunk", [1, CHUNK, 10_000])
@pytest.mark.parametrize("empty", [False, True])
def test_one_head_module_call_forward_and_backward_whatever_the_chunk_count(chunk, empty):
    """What keeps multi-rank ZeRO-3 in step (its hooks gather the head's weight per module call, in
    the forward and, through the call's output, in the backward): the lm_head module runs once and its
    backward hook once per scoring pass, for any chunk count — also with no response token at all."""
    model = tiny_model("llama")
    model.requires_grad_(True)
    batch = batches()[0]
    mask = torch.zeros_like(batch.response_mask) if empty else batch.response_mask
    forwards, backwards = [], []
    hooks = [model.lm_head.register_forward_hook(lambda *_: forwards.append(1)),
             model.lm_head.register_full_backward_pre_hook(lambda *_: backwards.append(1))]
    try:
        src = hidden_forward(model, batch.input_ids, batch.attention_mask, chunk)
        got = chunked_logps(src, batch.input_ids, mask, ids=request_ids(batch))
        (got["seq_logps"].sum() + got["logps_at"].sum()).backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(forwards) == 2 and len(backwards) == 1, (forwards, backwards)
    assert model.lm_head.weight.grad is not None
    assert (float(model.lm_head.weight.grad.abs().sum()) == 0) == empty


def test_a_model_the_table_does_not_know_keeps_the_plain_path(monkeypatch):
    import sparsepo.logprobs.lean as lp

    model = tiny_model("llama")
    monkeypatch.setattr(lp, "FAMILIES", {})
    batch = batches()[0]
    assert hidden_forward(model, batch.input_ids, batch.attention_mask, CHUNK) is None
    head = Head.for_model(model, CHUNK)
    assert isinstance(head, PlainHead) and head.forward(batch.input_ids, batch.attention_mask).logits.dtype == torch.float32
    assert pair_forward(head, batch).token_logps.dtype == torch.float32


def test_an_empty_response_mask_gives_zeros():
    model = tiny_model("llama")
    batch = batches()[0]
    src = hidden_forward(model, batch.input_ids, batch.attention_mask, CHUNK)
    got = chunked_logps(HeadInput(src.hidden, src.head, 3), batch.input_ids, torch.zeros_like(batch.response_mask),
                        topk=K)
    assert all(float(v.abs().sum()) == 0 for v in got.values())


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_lean_sq_mass_equals_the_plain_one_and_is_computed_only_when_asked(case):
    """WPO's log Σ_v p(v|x_<t)²: the same on both paths (float32, 1e-6), zero outside the response,
    without gradient even from a model with gradients; None unless pair_forward(sq_mass=True)."""
    model = tiny_model(case)
    model.requires_grad_(True)
    for batch in batches():
        plain = pair_forward(Head.for_model(model, 0), batch, sq_mass=True)
        lean = pair_forward(Head.for_model(model, CHUNK), batch, sq_mass=True)
        torch.testing.assert_close(lean.log_sq_mass, plain.log_sq_mass, atol=1e-6, rtol=1e-6)
        assert not lean.log_sq_mass.requires_grad and not plain.log_sq_mass.requires_grad
        assert float(plain.log_sq_mass[batch.response_mask == 0].abs().sum()) == 0
        assert float(plain.log_sq_mass[batch.response_mask != 0].max()) < 0
    assert all(pair_forward(Head.for_model(model, c), batch).log_sq_mass is None for c in (0, CHUNK))


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_the_pipeline_head_hands_the_lean_path_its_input(case):
    """pipeline_layers(chunk=) (the live reference's last stage): the head returns a HeadInput, and
    score() on it equals score() on the plain pipeline's logits (what ScoreFn computes)."""
    from sparsepo.reference.stages import pipeline_layers, run_layers

    model = tiny_model(case)
    for i, batch in enumerate(batches()):
        ids = request_ids(batch, i)
        with torch.no_grad():
            logits = run_layers(pipeline_layers(model), batch.input_ids, batch.attention_mask)
            src = run_layers(pipeline_layers(model, chunk=CHUNK), batch.input_ids, batch.attention_mask)
        assert isinstance(src, HeadInput) and src.chunk == CHUNK
        plain = score(logits, batch.input_ids, batch.response_mask, FIELDS, topk=K, request_ids=ids)
        lean = score(src, batch.input_ids, batch.response_mask, FIELDS, topk=K, request_ids=ids)
        for name in FIELDS:
            torch.testing.assert_close(lean[name], plain[name], atol=1e-6, rtol=1e-6, msg=f"{case} {i} {name}")  # rtol: BLAS threads


def test_the_config_default_is_the_measured_chunk():
    from sparsepo.config.sections import ModelConfig
    from sparsepo.logprobs.lean import DEFAULT_CHUNK

    assert ModelConfig().logits_chunk == DEFAULT_CHUNK == 128  # docs/benchmarks.md, "Lean log-probs"
