"""Weight decay as the Hugging Face Trainer (so TRL) applies it: biases and norm weights never decayed
(`engine.policy.parameter_groups`, used by `PolicyEngine.build`).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_optim_groups.py
"""

from __future__ import annotations

import pytest
import torch

from sparsepo.engine.policy import parameter_groups

pytestmark = pytest.mark.unit


def model():
    import transformers

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, attention_bias=True)
    return transformers.LlamaForCausalLM(config)


def test_two_groups_as_the_hf_trainer_makes_them():
    """The no-decay group is exactly what transformers' Trainer leaves out (its own method on the same
    model: biases, input/post-attention layernorms, the final norm); frozen parameters are in neither."""
    from transformers import Trainer

    m = model()
    m.model.embed_tokens.weight.requires_grad_(False)
    decay, no_decay = parameter_groups(m, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in m.named_parameters()}
    hf_decay = set(Trainer.get_decay_parameter_names(None, m))
    got_decay = {names[id(p)] for p in decay["params"]}
    got_no = {names[id(p)] for p in no_decay["params"]}
    assert got_decay == hf_decay - {"model.embed_tokens.weight"}
    assert got_no == {n for n, p in m.named_parameters() if p.requires_grad} - hf_decay
    assert "model.norm.weight" in got_no and "model.layers.0.self_attn.q_proj.bias" in got_no
    assert "model.layers.1.input_layernorm.weight" in got_no and "lm_head.weight" in got_decay


def test_no_weight_decay_keeps_one_plain_list():
    """weight_decay 0 (the default): the single list every earlier checkpoint's optimiser state was saved with."""
    m = model()
    got = parameter_groups(m, 0.0)
    assert all(isinstance(p, torch.nn.Parameter) for p in got) and len(got) == len(list(m.parameters()))
