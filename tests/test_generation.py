"""SPO's sampling: keyed sampling and sample masks (pure), and generation from a ZeRO-3
PolicyEngine on 1 and 2 ranks (the same samples for the same seed)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, free_port, train_env
from sparsepo.generation import KeyedSampler, Prompts, sample_batch

WORKER = REPO / "tests" / "dist_scripts" / "generation_worker.py"


@pytest.mark.unit
def test_keyed_sampler_draws_from_the_softmax():
    """Gumbel-max with per-(key, position) noise: over 4000 keys the argmax frequencies match
    softmax(logits / T) within 4 standard errors, and a key's draw does not depend on its batch nor on the batch's prompt width."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = (logits / 0.7).softmax(-1)
    keys = [f"e{i}" for i in range(4000)]
    draws = KeyedSampler(keys, seed=3, prompt_width=5, temperature=0.7)(torch.zeros(4000, 5), logits.expand(4000, 4)).argmax(-1)
    freq = torch.bincount(draws, minlength=4) / 4000
    stderr = (probs * (1 - probs) / 4000).sqrt()
    assert ((freq - probs).abs() < 4 * stderr).all(), (freq, probs)
    alone = KeyedSampler(keys[7:8], seed=3, prompt_width=2, temperature=0.7)(torch.zeros(1, 2), logits[None]).argmax(-1)
    assert alone.item() == draws[7].item()


@pytest.mark.unit
def test_top_p_keeps_the_nucleus_only():
    logits = torch.tensor([[3.0, 2.0, -5.0, -6.0]])  # probs ~ (0.73, 0.27, 2e-4, 9e-5)
    out = KeyedSampler(["k"], seed=0, prompt_width=1, top_p=0.9)(torch.zeros(1, 1), logits)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


@pytest.mark.unit
def test_sample_batch_ends_at_eos_and_repacks_right_padded():
    """Prompts [7, 8] and [9] (left-padded), generated [4, 2(eos), 0, 0] and [5, 6, 3, 1] (no eos):
    sample 0 keeps 4 and its eos, sample 1 runs to max tokens."""
    prompts = Prompts(input_ids=torch.tensor([[7, 8], [0, 9]]), attention_mask=torch.tensor([[1, 1], [0, 1]]),
                      lengths=torch.tensor([2, 1]), keys=["a#0", "b#0"])
    generated = torch.tensor([[7, 8, 4, 2, 0, 0], [0, 9, 5, 6, 3, 1]])
    s = sample_batch(generated, prompts, eos_id=2, pad_id=0)
    assert s.input_ids.tolist() == [[7, 8, 4, 2, 0], [9, 5, 6, 3, 1]]
    assert s.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert s.sample_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert s.lengths.tolist() == [2, 4]


def _run(model_dir, out, nproc, params):
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(WORKER), "--model", str(model_dir), "--out", str(out), "--params", params]
    env = {**train_env(), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {}
    for r in range(nproc):
        samples.update(torch.load(out / f"samples_rank{r}.pt"))
    return samples, [json.loads((out / f"info_rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.distributed
@pytest.mark.slow  # 15 s; two ranks generating in the default run: test_spo_trainer.py::test_spo_two_ranks_match_one_rank
def test_two_rank_generation_equals_one_rank(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=101, max_position_embeddings=128, eos_token_id=2,
                      pad_token_id=0, bos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    one, info1 = _run(tmp_path / "model", tmp_path / "one", 1, "gathered")
    two, info2 = _run(tmp_path / "model", tmp_path / "two", 2, "gathered")
    synced, info_s = _run(tmp_path / "model", tmp_path / "synced", 2, "synced")
    assert sorted(one) == sorted(two) == sorted(synced) and len(one) == 16
    for key in one:
        for other in (two, synced):
            assert torch.equal(one[key][0], other[key][0]) and torch.equal(one[key][1], other[key][1]), key
    ends = [(ids, mask) for ids, mask in one.values()]
    for ids, mask in ends:  # a sample ends at its first eos or after max_new_tokens=12
        generated = ids[mask.bool()]
        assert 1 <= len(generated) <= 12 and (2 not in generated[:-1].tolist())
        assert generated[-1] == 2 or len(generated) == 12
        assert mask[: int(mask.argmax())].sum() == 0 and mask[int(mask.argmax()):].all()
    assert {i["path"] for i in info2} == {"gathered"} and {i["path"] for i in info_s} == {"synced"}
    for info in info2 + info_s:  # still sharded after generating, and trained a step
        assert info["local"] <= 0.55 * info["full"]
    assert info2[0]["loss"] == pytest.approx(info_s[0]["loss"], abs=1e-6)
