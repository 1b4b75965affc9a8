"""An MoE policy's router load-balancing loss (`model.router_aux_loss_coef`, TRL's aux loss): the
trainer adds coef x the model's own aux_loss to the method's loss, and a policy without a router is
refused before launch.

    PYTHONPATH=$PWD python -m pytest -q tests/test_router_aux.py
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import read_scalars, run_training
from test_prelaunch import model_dir, sparsepo

COEF = 0.5


@pytest.mark.unit
@pytest.mark.parametrize("coef,says", [("0.1", "needs a mixture-of-experts policy"), ("-1", "must be >= 0")])
def test_a_router_loss_without_a_router_is_refused_before_launch(coef, says, tmp_path, monkeypatch, capsys):
    from sparsepo import cli

    started = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, **k: started.append(cmd) or 0)
    assert sparsepo("train", f"model.path={model_dir(tmp_path / 'm')}", f"model.router_aux_loss_coef={coef}") == 2
    assert says in capsys.readouterr().err and started == []


def moe_dir(tokenizer, path):
    import transformers as T

    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(T.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # ~65 s: two training runs, one of them on 2 ranks
@pytest.mark.distributed
def test_zero3_over_two_ranks_equals_one_rank_with_the_router_loss(tiny_world, tmp_path):
    """The MoE policy's fused expert weights partitioned by ZeRO-3 over 2 ranks train exactly as on
    one rank with grad_accum 2 (same global batches), router loss included (measured: equal bit for bit)."""
    import transformers as T

    model = moe_dir(T.AutoTokenizer.from_pretrained(tiny_world.sft_dir), tmp_path / "moe")
    common = (f"model.path={model}", "train.max_steps=3", "train.micro_batch_size=2", "method.name=dpo",
              "model.router_aux_loss_coef=0.1", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant")
    run_training(tiny_world, tmp_path / "one", *common, "train.grad_accum=2", nproc=1)
    run_training(tiny_world, tmp_path / "two", *common, nproc=2)
    for tag in ("train/loss", "train/router_aux_loss"):
        one, two = read_scalars(tmp_path / "one", tag), read_scalars(tmp_path / "two", tag)
        assert sorted(one) == [1, 2, 3] and all(two[s] == pytest.approx(one[s], abs=1e-6) for s in one), (tag, one, two)


def test_step_one_loss_is_ln2_plus_the_weighted_router_loss(tiny_world, tmp_path):
    """At step 1 the policy is the reference, so DPO gives exactly ln 2 and the logged loss is
    ln 2 + coef x aux, aux the initial model's own load-balancing loss on step 1's batch (computed
    here, outside the trainer). A trainer that drops the router loss logs ln 2."""
    import transformers as T

    from sparsepo import data as pdata
    from sparsepo.config import load_config
    from sparsepo.schedule import Schedule

    tok = T.AutoTokenizer.from_pretrained(tiny_world.sft_dir)
    model = T.AutoModelForCausalLM.from_pretrained(moe_dir(tok, tmp_path / "moe"))
    overrides = [f"model.path={tmp_path / 'moe'}", f"data.path={tiny_world.train_path}", "train.max_steps=1",
                 "train.micro_batch_size=2", "method.name=dpo", f"model.router_aux_loss_coef={COEF}"]
    run_training(tiny_world, tmp_path / "run", *overrides)
    cfg = load_config("sparsepo/recipes/demo.yaml", overrides)
    ds, _ = pdata.load_preference_dataset(cfg.data, tok)
    rows = Schedule.from_config(cfg, num_rows=len(ds), dp=1).rows_for(0, 0, 0)
    batch = pdata.collate_pairs(pdata.gather_rows(ds, list(rows)), tok.pad_token_id)
    with torch.no_grad():
        aux = model.eval()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           output_router_logits=True).aux_loss.item()
    assert aux > 1.0  # Switch-style balance loss: num_experts x Σ f_i P_i, 1 when perfectly balanced
    logged = read_scalars(tmp_path / "run", "train/router_aux_loss")[1]
    assert logged == pytest.approx(aux, abs=1e-5)
    assert read_scalars(tmp_path / "run", "train/loss")[1] == pytest.approx(math.log(2) + COEF * aux, abs=1e-5)
