"""The live reference pipeline reproduces each supported family's own forward, exactly.

For every entry of ``sparsepo.logprobs.families.FAMILIES`` (and Mistral / Phi-3 with and without
``sliding_window``) a tiny random model built from its transformers config class, seeded, with a
sliding window of W = 4 where the family has one, scores batches whose sequences are longer than
3W (right padding as ``collate_pairs`` makes it, and the same rows left-padded):

* ``run_layers(pipeline_layers(model))`` gives the model's own log-probs (1e-5, fp32), and
  decoder layer ℓ's output as carried to the head equals ``capture_residual(model, ℓ)``;
* a 2-stage and a 3-stage cut built by ``StageLoader`` from a saved safetensors directory gives
  the same, each stage reading exactly its own tensors (non-persistent buffers re-created, no
  full-model fallback); a fallback, when forced, is logged with its real cause;
* the inputs exercise the window: widening it changes the model's own output.

Families the pipeline cannot split are refused from the config alone, naming the family and
``reference.mode=cache``.

    PYTHONPATH=$PWD python -m pytest -q tests/test_families.py
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

from sparsepo.data.batching import collate_pairs
from sparsepo.logprobs.families import FAMILIES, SLIDING, UnsupportedModelError, check_live_supported, layer_attention
from sparsepo.reference.partition import stage_parts
from sparsepo.logprobs.head import PlainHead
from sparsepo.reference.scorer import score_batch
from sparsepo.reference.stage_loader import StageLoader
from sparsepo.reference.stages import DecoderLayerStage, EmbeddingStage, HeadStage, pipeline_layers, run_layers
from sparsepo.sae.hooks import capture_residual

pytestmark = pytest.mark.unit

VOCAB, LAYERS, WINDOW = 211, 3, 4
FIELDS = ("seq_logps", "token_logps", "topk_ids", "topk_logps")
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]


def _configs():
    import transformers as T

    return {  # case -> (model_type, config)
        "llama": T.LlamaConfig(**COMMON),
        "mistral": T.MistralConfig(**COMMON, sliding_window=None),
        "mistral-sliding": T.MistralConfig(**COMMON, sliding_window=WINDOW),
        "qwen2-sliding": T.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3-sliding": T.Qwen3Config(**COMMON, head_dim=8, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=1),
        "gemma": T.GemmaConfig(**COMMON, head_dim=8),
        "gemma2": T.Gemma2Config(**COMMON, head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING,
                                 final_logit_softcapping=1.0, attn_logit_softcapping=5.0),
        "gemma3": T.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING,
                                     final_logit_softcapping=1.0, rope_local_base_freq=100.0),
        "gpt_neox": T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
                                    rotary_pct=0.5, use_parallel_residual=True, bos_token_id=1, eos_token_id=2),
        "gpt2": T.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=4, vocab_size=VOCAB, n_positions=128,
                             bos_token_id=1, eos_token_id=2),
        "phi3": T.Phi3Config(**COMMON, sliding_window=None),
        "phi3-sliding": T.Phi3Config(**COMMON, sliding_window=WINDOW),
        "olmo": T.OlmoConfig(**COMMON),
    }


CASES = sorted(_configs())


def tiny_model(case: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[case])
    with torch.no_grad():  # random norm weights / biases: an identity norm would hide a missing one
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.requires_grad_(False)
    return model


def batches(seed: int = 0):
    """Two right-padded batches (collate_pairs) with sequences up to 26 > 3W tokens, and the first
    left-padded."""
    rng = random.Random(seed)

    def seq(lo, hi):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))]

    rows = [[dict(example_id=f"{tag}{i}", prompt_ids=seq(2, 10), chosen_ids=seq(3, 16), rejected_ids=seq(1, 12))
             for i in range(n)] for tag, n in (("a", 2), ("b", 3))]
    out = [collate_pairs(r, pad_id=0) for r in rows]
    assert max(int(b.attention_mask.sum(1).max()) for b in out) >= 3 * WINDOW
    out.append(left_padded(out[0]))
    return out


def left_padded(batch):
    """The same rows with the padding moved to the left (a left-padding collate's layout)."""
    from dataclasses import replace

    shift = (batch.attention_mask == 0).sum(1)
    roll = lambda t: torch.stack([r.roll(int(s)) for r, s in zip(t, shift)])  # noqa: E731
    return replace(batch, input_ids=roll(batch.input_ids), attention_mask=roll(batch.attention_mask),
                   response_mask=roll(batch.response_mask))


def model_outputs(model, batch, layer: int):
    want = score_batch(PlainHead(model), batch, FIELDS, topk=5)
    with capture_residual(model, layer) as cap:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return want, cap.take()


def check_equal(logits, hidden, want, want_hidden, batch):
    from sparsepo.reference.scoring import score

    got = score(logits, batch.input_ids, batch.response_mask, FIELDS, topk=5)
    torch.testing.assert_close(got["token_logps"], want.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["seq_logps"], want.seq_logps, atol=1e-5, rtol=0)
    assert torch.equal(got["topk_ids"], want.topk_ids)
    torch.testing.assert_close(got["topk_logps"], want.topk_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=0)


def test_every_family_in_the_table_is_tested():
    assert {_configs()[c].model_type for c in CASES} == set(FAMILIES)


@pytest.mark.parametrize("case", CASES)
def test_pipeline_layers_equal_the_models_own_forward(case):
    model = tiny_model(case)
    check_live_supported(model.config)
    for layer in range(LAYERS):
        items = pipeline_layers(model, feature_layer=layer)
        assert len(items) == LAYERS + 2
        for batch in batches():
            want, want_hidden = model_outputs(model, batch, layer)
            with torch.no_grad():
                logits, hidden = run_layers(items, batch.input_ids, batch.attention_mask)
            check_equal(logits, hidden, want, want_hidden, batch)


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("-sliding") or c.startswith("gemma2")
                                  or c.startswith("gemma3")])
def test_the_inputs_exercise_the_sliding_window(case):
    """A window wider than the sequences changes the model's own output, so the equality test above
    would catch a pipeline that ignores the window (or puts it on the wrong layers)."""
    model = tiny_model(case)
    assert any(layer_attention(model.config, i) == SLIDING for i in range(LAYERS))
    batch = batches()[1]
    narrow = score_batch(PlainHead(model), batch, ("token_logps",), topk=0).token_logps
    model.config.sliding_window = 10_000
    wide = score_batch(PlainHead(model), batch, ("token_logps",), topk=0).token_logps
    assert (narrow - wide).abs().max() > 1e-3


def stage_modules(block) -> list:
    """The model modules a stage block holds, in item_paths order."""
    out = []
    for item in block.items:
        if isinstance(item, EmbeddingStage):
            out += [item.embed_tokens] + ([item.embed_positions] if item.embed_positions is not None else [])
        elif isinstance(item, DecoderLayerStage):
            out.append(item.layer)
        else:
            assert isinstance(item, HeadStage)
            out += [item.norm, item.lm_head]
    return out


def expected_keys(loader: StageLoader, lo: int, hi: int) -> set[str]:
    keys = set()
    for i in range(lo, hi):
        for path in loader.item_paths(i):
            for key in loader.skeleton.get_submodule(path).state_dict():
                k = f"{path}.{key}"
                keys.add(loader.key_map.get(k) or loader.key_map[f"{loader.family.embed}.{key}"])  # tied head
    return keys


@pytest.mark.parametrize("case", CASES)
def test_stage_loader_cuts_equal_the_models_own_forward(case, tmp_path):
    model = tiny_model(case, seed=1)
    model.save_pretrained(tmp_path)
    loader = StageLoader(str(tmp_path))
    layer = 1
    full = {name: buf for name, buf in model.named_buffers()}
    for parts in (stage_parts(LAYERS, 2), stage_parts(LAYERS, 3, "layers")):
        blocks = []
        for lo, hi in zip(parts[:-1], parts[1:]):
            loader.tensors_read.clear()
            block = loader.build(lo, hi, feature_layer=layer)
            assert sorted(loader.tensors_read) == sorted(expected_keys(loader, lo, hi)), (lo, hi)
            paths = [p for i in range(lo, hi) for p in loader.item_paths(i)]
            for path, module in zip(paths, stage_modules(block), strict=True):
                for name, buf in module.named_buffers():  # non-persistent ones included
                    torch.testing.assert_close(buf, full[f"{path}.{name}"], atol=0, rtol=0)
            blocks.append(block)
        assert loader.fallback_cause is None and loader._full is None
        for batch in batches(2):
            want, want_hidden = model_outputs(model, batch, layer)
            with torch.no_grad():
                logits, hidden = run_layers(blocks, batch.input_ids, batch.attention_mask)
            check_equal(logits, hidden, want, want_hidden, batch)


def test_a_buffer_the_model_cannot_recreate_falls_back_with_its_cause(tmp_path, caplog):
    model = tiny_model("gemma", seed=2)
    model.save_pretrained(tmp_path)
    loader = StageLoader(str(tmp_path))
    loader.skeleton._init_weights = lambda module: None  # as if the model's init did not know the buffer
    with caplog.at_level(logging.WARNING, logger="sparsepo.reference.stage_loader"):
        blocks = [loader.build(0, 2), loader.build(2, LAYERS + 2)]
    cause = "non-persistent buffer model.embed_tokens.embed_scale (GemmaTextScaledWordEmbedding) is not in the " \
            "checkpoint and GemmaForCausalLM._init_weights does not re-create it"
    assert loader.fallback_cause == cause
    assert f"loading the full model from {tmp_path} on CPU to keep one stage, because {cause}" in caplog.text
    batch = batches()[0]
    want = score_batch(PlainHead(model), batch, FIELDS, topk=5)
    with torch.no_grad():
        logits = run_layers(blocks, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(logits.float().log_softmax(-1)[:, :-1].gather(-1, batch.input_ids[:, 1:, None])
                               .squeeze(-1) * batch.response_mask[:, 1:], want.token_logps[:, 1:], atol=1e-5, rtol=0)


def test_keys_that_do_not_follow_the_module_names_fall_back_with_their_cause(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    tiny_model("llama", seed=3).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({k.replace("model.layers.", "model.blocks."): v for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loader = StageLoader(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sparsepo.reference.stage_loader"):
        loader.build(1, 2)
    assert loader.fallback_cause == ("the checkpoint has no tensor for model.layers.0.self_attn.q_proj.weight (its "
                                     "keys do not follow the module names, even through the model's own loading "
                                     "renames)")
    assert loader.fallback_cause in caplog.text


# --- refusals, from the config alone ---------------------------------------------------------

def _refused():
    import transformers as T

    return {
        "gemma3": (T.Gemma3Config(text_config=dict(**COMMON, head_dim=8)), "Gemma3ForCausalLM"),
        "opt": (T.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                            vocab_size=VOCAB), "reproduce only Llama"),
        "gemma3_text": (T.Gemma3TextConfig(**COMMON, head_dim=8, use_bidirectional_attention=True),
                        "use_bidirectional_attention"),
        "llama": (T.LlamaConfig(**COMMON, layer_types=["full_attention", "sliding_attention", "full_attention"]),
                  "a full causal mask"),
    }


@pytest.mark.parametrize("case", sorted(_refused()))
def test_unsupported_models_are_refused_from_the_config_alone(case, tmp_path):
    config, why = _refused()[case]
    with pytest.raises(UnsupportedModelError) as err:
        check_live_supported(config)
    message = str(err.value)
    assert f"model family {case!r}" in message and why in message and "reference.mode=cache" in message, message
    config.save_pretrained(tmp_path)  # a directory with no weights: refused before anything loads
    with pytest.raises(UnsupportedModelError, match="reference.mode=cache"):
        StageLoader(str(tmp_path))


def test_live_launch_refuses_an_unsupported_family_before_loading_anything(tmp_path, monkeypatch):
    """train.run_live checks the reference's config first: no weights, no process group, no bridge."""
    import sparsepo.bridge
    from sparsepo import train
    from sparsepo.config import load_config

    _refused()["gemma3"][0].save_pretrained(tmp_path)  # config.json only
    cfg = load_config(None, [f"model.path={tmp_path}", "reference.mode=live", "method.name=dpo",
                                    "topology.reference_ranks=1", "topology.pipeline_stages=1"])
    monkeypatch.setattr(sparsepo.bridge, "connect", lambda *a, **k: pytest.fail("bridge reached"))
    with pytest.raises(UnsupportedModelError, match="model family 'gemma3'.*reference.mode=cache"):
        train.run_live(cfg, preempt=None)
