"""One ``Head`` per loaded model (sparsepo.logprobs.head): the same keys and the same numbers on the
plain and the lean path for every field a caller can ask for, the path chosen in one function,
``model.logits_chunk`` read in one place, and the kernel package importing nothing above it."""

from __future__ import annotations

import ast

import pytest
import torch
from test_families import VOCAB, batches, tiny_model
from test_shape import MODULES, graph

from sparsepo.logprobs.head import FIELDS, Head, LeanPathHead, PlainHead, StageHead, choose_head

pytestmark = pytest.mark.unit

K, CHUNK = 4, 5


def ask_everything(head, batch):
    ids = torch.randint(0, VOCAB, (*batch.input_ids.shape, 3), generator=torch.Generator().manual_seed(0))
    return head(batch.input_ids, batch.attention_mask, batch.response_mask, topk=K, ids=ids, entropy=True,
                sq_mass=True)


@pytest.mark.parametrize("case", ["llama", "gemma2", "gpt2"])
def test_one_call_gives_the_same_keys_and_numbers_on_both_paths(case):
    """Every field at once (log-probs, top-K, at-ids, entropy, log Σp²): the same key set (all of
    FIELDS), shapes and dtypes on both paths, values equal to 1e-6 in float32 (the entropy, ~5 nats
    summed over 211 terms by two float32 formulas, to 1e-5: a few ulps), ids equal."""
    model = tiny_model(case)
    plain, lean = Head.for_model(model, 0), Head.for_model(model, CHUNK)
    assert isinstance(plain, PlainHead) and isinstance(lean, LeanPathHead)
    for batch in batches():
        a, b = ask_everything(plain, batch), ask_everything(lean, batch)
        assert sorted(a) == sorted(b) == sorted(FIELDS)
        for name in FIELDS:
            assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
            if name == "topk_ids":
                assert torch.equal(a[name], b[name]), case
            else:
                tol = 1e-5 if name == "entropy" else 1e-6
                torch.testing.assert_close(b[name], a[name], atol=tol, rtol=1e-6, msg=f"{case} {name}")


def test_the_plain_fields_equal_a_hand_computation():
    """Position t from logits[t-1] (float64 by hand): log p(x_t), the entropy and log Σ_v p(v)², zero
    outside the response; seq_logps the response sum."""
    model = tiny_model("llama")
    batch = batches()[0]
    got = ask_everything(PlainHead(model), batch)
    logp = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double().log_softmax(-1)
    n, t = map(int, torch.nonzero(batch.response_mask)[3])
    row = logp[n, t - 1]
    assert abs(float(got["token_logps"][n, t]) - float(row[batch.input_ids[n, t]])) < 1e-5
    assert abs(float(got["entropy"][n, t]) - float(-(row.exp() * row).sum())) < 1e-5
    assert abs(float(got["log_sq_mass"][n, t]) - float(torch.logsumexp(2 * row, -1))) < 1e-5
    assert float(got["entropy"][batch.response_mask == 0].abs().sum()) == 0
    torch.testing.assert_close(got["seq_logps"], got["token_logps"].sum(-1))


def test_the_path_is_chosen_in_one_function(monkeypatch):
    import sparsepo.logprobs.lean as lean

    model = tiny_model("llama")
    assert type(choose_head(model, 0)) is PlainHead and type(choose_head(model, 3)) is LeanPathHead
    assert choose_head(model, 3).chunk == 3
    with pytest.raises(ValueError, match="logits_chunk=-1"):
        choose_head(model, -1)
    monkeypatch.setattr(lean, "FAMILIES", {})  # a family the table does not know: plain
    assert type(Head.for_model(model, 3)) is PlainHead
    stage = Head.for_layers(model.lm_head, None, 3)
    assert isinstance(stage, StageHead) and stage.chunk == 3
    assert Head.for_layers(torch.nn.Identity(), None, 3).chunk == 0  # a head that is no nn.Linear: plain


def test_model_logits_chunk_is_read_from_the_config_in_one_place():
    reads = [name for name, path in MODULES.items() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "logits_chunk"]
    assert reads == ["sparsepo.logprobs.head"]


def test_the_kernel_package_imports_nothing_above_it():
    edges = graph()
    up = {m: sorted(t for t in targets if not t.startswith("sparsepo.logprobs"))
          for m, targets in edges.items() if m.startswith("sparsepo.logprobs")}
    assert up and all(v == [] for v in up.values()), up
