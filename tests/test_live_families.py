"""Live mode equals cache mode for families whose forward differs from Llama's in the ways that
silently broke the pipeline before: a Mistral with a sliding window shorter than the sequences, and
Gemma 2 (alternating sliding/full layers, logit soft-capping, scaled embeddings). Each is a tiny
random model from its transformers config with the demo world's tokenizer; three steps, 1 policy
rank + a 2-stage pipeline reference group against 1 process reading the cache.

    PYTHONPATH=$PWD python -m pytest -q tests/test_live_families.py
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import read_scalars, run_training

pytestmark = pytest.mark.distributed

WINDOW = 4  # the demo pairs are 15-40 tokens: every sequence exceeds the window
STEPS = ("train.max_steps=3", "train.micro_batch_size=2", "optim.lr=1e-3", "optim.schedule=constant",
         "optim.warmup_steps=0", "method.name=dpo")
LIVE = ("reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2")


def family_config(case: str, vocab: int):
    import transformers as T

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if case == "mistral-sliding":
        return T.MistralConfig(**common, sliding_window=WINDOW)
    if case == "mixtral-sliding":  # MoE, no table row (sparsepo.logprobs.layout); experts merged by the stage loader
        return T.MixtralConfig(**common, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)
    if case == "granite":  # a table row for its embedding multiplier and logits scaling
        return T.GraniteConfig(**common, embedding_multiplier=3.0, logits_scaling=4.0, residual_multiplier=0.5)
    return T.Gemma2Config(**common, head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention",
                          "full_attention"], final_logit_softcapping=1.0, attn_logit_softcapping=5.0)


@pytest.mark.parametrize("case", [pytest.param("mistral-sliding", marks=pytest.mark.slow),  # sliding: gemma2
                                  pytest.param("gemma2", marks=pytest.mark.slow),  # budget: lean = plain in-process
                                  pytest.param("mixtral-sliding", marks=pytest.mark.slow),  # default-time budget
                                  pytest.param("granite", marks=pytest.mark.slow)])
def test_live_equals_cache_beyond_the_window(case, tiny_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.sft_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(case, len(tokenizer)))
    model_dir = tmp_path / case
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    shutil.copy(tiny_world.sft_dir / "generation_config.json", model_dir) \
        if (tiny_world.sft_dir / "generation_config.json").exists() else None
    common = (f"model.path={model_dir}", *STEPS)
    run_training(tiny_world, tmp_path / "cache", *common, nproc=1)
    run_training(tiny_world, tmp_path / "live", *common, *LIVE, nproc=3)
    cache, live = read_scalars(tmp_path / "cache", "train/loss"), read_scalars(tmp_path / "live", "train/loss")
    assert sorted(live) == sorted(cache) == [1, 2, 3]
    for step in cache:
        assert live[step] == pytest.approx(cache[step], abs=1e-5), (case, step, live, cache)
    # step 1 starts from the reference itself: a wrong reference would show here first
    assert read_scalars(tmp_path / "live", "train/accuracy")[1] == read_scalars(tmp_path / "cache", "train/accuracy")[1]
