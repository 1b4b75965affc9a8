"""LoRA without training (`sparsepo.lora`, the `lora:` section): the adapters-off reference equals the
base model to the last bit, on both log-prob paths; the merge and the adapter directory match peft's
own model; the config refuses what cannot run.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_lora.py
"""

from __future__ import annotations

import pytest
import torch

from sparsepo import lora
from sparsepo.config import ConfigError, load_config
from sparsepo.config.lora import LoraConfig

pytestmark = pytest.mark.unit
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A 2-layer random Llama (vocab 50) saved with save_pretrained."""
    import transformers

    path = tmp_path_factory.mktemp("base")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_base(path):
    from sparsepo.models import load_frozen_model

    return load_frozen_model(str(path))


def trained_peft(path, lcfg: LoraConfig):
    """The base wrapped as training wraps it, with every adapter weight random (lora_B is zero at init,
    which would make adapters on and off agree and hide a reference that forgot to switch them off)."""
    from transformers import AutoModelForCausalLM

    model = lora.wrap(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), lcfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def batch(n: int = 3, t: int = 12):
    """A collated PairBatch-like object: ids, attention (row 2 left short) and response masks."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 50, (n, t), generator=g)
    attention = torch.ones(n, t, dtype=torch.long)
    attention[2, 9:] = 0
    response = torch.zeros(n, t)
    response[:, 5:] = 1
    response *= attention
    return SimpleNamespace(input_ids=ids, attention_mask=attention, response_mask=response,
                           example_ids=[f"e{i}" for i in range(n)])


def test_default_targets_every_decoder_linear_not_the_head(base_dir):
    model = lora.wrap(load_base(base_dir).requires_grad_(True), LoraConfig(r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == LINEAR
    assert all(lora.is_adapter_key(n) for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    got_trainable, total = lora.parameter_counts(model)
    # per adapted Linear(in, out): r*in (A) + out*r (B); 2 layers
    h, i, r = 16, 32, 4
    per_layer = 4 * (r * h + h * r) + 2 * (r * h + i * r) + (r * i + h * r)
    assert got_trainable == 2 * per_layer
    assert total == got_trainable + sum(p.numel() for p in load_base(base_dir).parameters())


def test_target_modules_and_modules_to_save(base_dir):
    model = lora.wrap(load_base(base_dir).requires_grad_(True),
                      LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n} == {"q_proj", "v_proj"}
    assert [n for n in trainable if "lm_head" in n] == ["base_model.model.lm_head.modules_to_save.default.weight"]
    with pytest.raises(ValueError, match="lora.target_modules"):
        lora.wrap(load_base(base_dir), LoraConfig(r=2, target_modules=["no_such_proj"]))


@pytest.mark.parametrize("chunk", [0, 4])
def test_adapters_off_reference_is_the_base_to_the_last_bit(base_dir, chunk):
    """score_batch (the inline source's scorer) on `AdaptersOff` vs a separately loaded base, on the plain
    path (chunk 0) and the lean one (chunk 4: finds the head through `.module`). modules_to_save on the
    embedding: its trained copy is switched off too. (With lm_head in modules_to_save the head is peft's
    wrapper, not an nn.Linear, and both the policy and this view take the plain path.)"""
    from sparsepo.logprobs.head import Head
    from sparsepo.reference.scorer import score_batch

    lcfg = LoraConfig(r=4, modules_to_save=["embed_tokens"])
    peft_model = trained_peft(base_dir, lcfg)
    view = lora.AdaptersOff(peft_model, peft_model.get_base_model())
    outputs = ("seq_logps", "token_logps", "topk_ids", "topk_logps")
    got = score_batch(Head.for_model(view, chunk), batch(), outputs, topk=5)
    want = score_batch(Head.for_model(load_base(base_dir), chunk), batch(), outputs, topk=5)
    for name in ("seq_logps", "token_logps", "topk_logps", "topk_ids"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    on = score_batch(Head.for_model(peft_model.get_base_model(), chunk), batch(), outputs, topk=5)
    assert not torch.allclose(on.seq_logps, want.seq_logps, atol=1e-3)  # the adapters matter, and are back on


def test_adapters_off_leaves_no_gradient_and_restores_training(base_dir):
    peft_model = trained_peft(base_dir, LoraConfig(r=4))
    view = lora.AdaptersOff(peft_model, peft_model.get_base_model())
    b = batch()
    assert not view(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.requires_grad
    assert peft_model.get_base_model()(input_ids=b.input_ids).logits.requires_grad


def test_merged_model_and_adapter_dir_match_peft(base_dir, tmp_path):
    """save_merged (final/ and `sparsepo export`): the merged plain model's logits equal peft's own
    merge_and_unload, and the adapter directory loads with PeftModel.from_pretrained to the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lcfg = LoraConfig(r=4, alpha=8.0, modules_to_save=["lm_head"])
    peft_model = trained_peft(base_dir, lcfg)
    state = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items() if lora.is_adapter_key(k)}
    b = batch()
    with torch.no_grad():
        unmerged = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        lora.save_merged(str(base_dir), lcfg, state, tmp_path / "merged", adapter_subdir="adapter")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        got = merged(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        want = peft_model.merge_and_unload()(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        loaded = PeftModel.from_pretrained(load_base(base_dir), tmp_path / "merged" / "adapter")
        again = loaded(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert not any("lora_" in k or "modules_to_save" in k for k in merged.state_dict())  # a plain HF model
    assert torch.equal(got, want)
    assert torch.allclose(got, unmerged, atol=1e-5)
    assert torch.equal(again, unmerged)


def test_peft_from_state_refuses_missing_or_foreign_adapters(base_dir):
    lcfg = LoraConfig(r=4)
    state = {k: v for k, v in trained_peft(base_dir, lcfg).get_base_model().state_dict().items()
             if lora.is_adapter_key(k)}
    with pytest.raises(ValueError, match="missing .*q_proj"):
        lora.peft_from_state(str(base_dir), lcfg, {k: v for k, v in state.items() if "layers.1.self_attn.q_proj" not in k})
    with pytest.raises(ValueError, match="unexpected"):
        lora.peft_from_state(str(base_dir), LoraConfig(r=4, target_modules=["q_proj"]), state)


def test_config_section():
    cfg = load_config(None, ["lora.r=16", "lora.target_modules=[q_proj, v_proj]", "lora.alpha=32"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32.0, ["q_proj", "v_proj"])
    assert load_config(None).lora.r == 0  # off by default
    assert load_config(None, ["lora.r=4", "lora.target_modules=q_proj"]).lora.target_modules == ["q_proj"]  # one = [one]
    for overrides, match in ((["lora.rank=4"], "unknown key 'lora.rank'"),
                             (["lora.r=4", "lora.target_modules=7"], "must be a list"),
                             (["lora.r=-1"], "lora.r=-1"),
                             (["lora.target_modules=[q_proj]"], "lora.r=0"),
                             (["lora.r=4", "lora.dropout=1.0"], "lora.dropout")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, overrides)


def test_qlora_refused_without_a_bitsandbytes_that_runs_nf4(monkeypatch, capsys):
    """QLoRA runs on CPU (bitsandbytes >= 0.50 has a CPU backend, tests/test_qlora_train.py); a machine
    without bitsandbytes, or with one that cannot quantise a block on the run's device, gets a one-line
    config error with the reason before anything loads."""
    import sys

    from sparsepo import train

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert lora.qlora_problem("cpu") is None  # the installed bitsandbytes runs NF4 on this CPU
    args = ["lora.r=8", "lora.load_in_4bit=true", "train.precision=bf16", "model.path=.", "data.path=."]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config error" in err and "needs the bitsandbytes package" in err and "\n" not in err.strip()
    monkeypatch.undo()

    import bitsandbytes

    def broken(*_a, **_k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", broken)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot run 4-bit NF4 on cpu (RuntimeError: no kernel for this device)" in err
