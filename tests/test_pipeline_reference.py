"""Pipeline-parallel reference: stage modules, last-stage scoring, and real multi-process pipelines.

Single process: reducing over `pipeline_layers` reproduces the HF logits; the per-stage loader
reproduces `from_pretrained`; `score_logits` equals `score_batch`. Multi-process: a DeepSpeed
PipelineModule launched with torchrun (2 stages; 3 stages with a middle stage that never sees the
batch; 2 stages x 2 replicas) scores padded batches of different lengths and its last stages'
outputs equal a single-process `score_batch` of the same model.
"""

from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsepo.data.batching import collate_pairs
from sparsepo.reference.pipeline import (
    PipelineConfigError,
    StageLoader,
    max_stages,
    pipeline_layers,
    run_layers,
    score_logits,
    stage_parts,
)
from sparsepo.reference.scorer import score_batch

from conftest import REPO, free_port, train_env

VOCAB = 101
TOPK = 5
FIELDS = ("seq_logps", "token_logps", "topk_ids", "topk_logps")
WORKER = REPO / "tests" / "dist_scripts" / "pipeline_reference_worker.py"


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    model.eval()
    model.requires_grad_(False)
    return model


def random_rows(rng: random.Random, pairs: int, max_len: int, tag: str) -> list[dict]:
    def seq():
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, max_len))]

    return [dict(example_id=f"{tag}-{i}", prompt_ids=seq(), chosen_ids=seq(), rejected_ids=seq())
            for i in range(pairs)]


def batch_rows(seed: int = 0) -> list[list[dict]]:
    """Four batches of different sizes and lengths (every one padded: lengths drawn per sequence)."""
    rng = random.Random(seed)
    return [random_rows(rng, 2, 5, "a"), random_rows(rng, 3, 11, "b"), random_rows(rng, 2, 3, "c"),
            random_rows(rng, 1, 8, "d")]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(seed=0)
    model.save_pretrained(path)
    return path, model


# ---------------------------------------------------------------------------------------------
# single process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_reduce_over_pipeline_layers_equals_hf_forward(tie):
    model = tiny_llama(seed=1, layers=3, tie=tie)
    for rows in batch_rows(1):
        batch = collate_pairs(rows, pad_id=0)
        assert (batch.attention_mask == 0).any() or batch.input_ids.shape[0] == 2
        with torch.no_grad():
            ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            layers = pipeline_layers(model)
            assert len(layers) == 3 + 2
            out = functools.reduce(lambda x, layer: layer(x), layers, (batch.input_ids, batch.attention_mask))
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(run_layers(layers, batch.input_ids, batch.attention_mask), out, atol=0, rtol=0)


def test_last_stage_scoring_equals_score_batch():
    model = tiny_llama(seed=2)
    layers = pipeline_layers(model)
    for rows in batch_rows(2):
        batch = collate_pairs(rows, pad_id=0)
        want = score_batch(model, batch, FIELDS, topk=TOPK)
        with torch.no_grad():
            logits = run_layers(layers, batch.input_ids, batch.attention_mask)
        seq, tok, topk_logps, topk_ids = score_logits(logits, batch.input_ids, batch.response_mask, TOPK)
        torch.testing.assert_close(seq, want.seq_logps, atol=1e-5, rtol=0)
        torch.testing.assert_close(tok, want.token_logps, atol=1e-5, rtol=0)
        assert torch.equal(topk_ids, want.topk_ids)
        torch.testing.assert_close(topk_logps, want.topk_logps, atol=1e-5, rtol=0)
        outside = batch.response_mask == 0
        assert (tok[outside] == 0).all() and (topk_ids[outside] == 0).all() and (topk_logps[outside] == 0).all()
    # topk 0 / None: only the log-probs
    assert len(score_logits(logits, batch.input_ids, batch.response_mask, 0)) == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("tie", [False, True])
def test_stage_loader_builds_stages_from_the_checkpoint(tmp_path, precision, tie):
    """Each stage reads only its tensors; chained stage blocks equal the from_pretrained model."""
    from sparsepo.models import load_frozen_model

    tiny_llama(seed=3, layers=3, tie=tie).save_pretrained(tmp_path)
    loader = StageLoader(str(tmp_path), precision)
    assert loader.weight_map is not None and loader.num_items == 5
    full = load_frozen_model(str(tmp_path), precision=precision)
    for parts in (stage_parts(3, 2), stage_parts(3, 3, "layers"), stage_parts(3, 5)):
        blocks = [loader.build(lo, hi) for lo, hi in zip(parts[:-1], parts[1:])]
        for block, lo, hi in zip(blocks, parts[:-1], parts[1:]):
            assert len(block.items) == hi - lo
            assert all(p.dtype == full.dtype and not p.requires_grad for p in block.parameters())
        batch = collate_pairs(batch_rows(3)[1], pad_id=0)
        with torch.no_grad():
            out = functools.reduce(lambda x, b: b(x), blocks, (batch.input_ids, batch.attention_mask))
            ref = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    counts = loader.item_params()
    assert sum(counts) == sum(p.numel() for p in full.parameters()) + (full.lm_head.weight.numel() if tie else 0)


def test_stage_parts_and_refusals():
    assert stage_parts(2, 2) == [0, 2, 4]
    assert stage_parts(2, 3) == [0, 2, 3, 4]
    assert stage_parts(2, 4) == [0, 1, 2, 3, 4]
    assert stage_parts(5, 2, "layers") == [0, 4, 7]  # embed + 3 layers | 2 layers + head
    assert stage_parts(4, 3, "parameters", [100, 10, 10, 10, 10, 100]) == [0, 1, 5, 6]
    assert max_stages(2) == 4 and max_stages(2, "layers") == 2
    with pytest.raises(PipelineConfigError, match=r"num_stages=5 > 4.*2 decoder layers \+ embedding \+ head = 4"):
        stage_parts(2, 5)
    with pytest.raises(PipelineConfigError, match=r"num_stages=3 > 2"):
        stage_parts(2, 3, "layers")
    with pytest.raises(PipelineConfigError, match="not one of"):
        stage_parts(2, 2, "profile")


# ---------------------------------------------------------------------------------------------
# multi-process (torchrun, gloo on CPU)
# ---------------------------------------------------------------------------------------------

def run_pipeline(model_dir: Path, out: Path, *, nproc: int, stages: int, batches: list, micro_batches: int = 1,
                 partition: str = "uniform", timeout: int = 120) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    batches_file = out / "batches.pt"
    torch.save(batches, batches_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(WORKER), "--model", str(model_dir),
           "--batches", str(batches_file), "--out", str(out), "--stages", str(stages), "--topk", str(TOPK),
           "--micro-batches", str(micro_batches), "--partition", partition]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"pipeline run failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return {r: json.loads((out / f"info_rank{r}.json").read_text()) for r in range(nproc)}


def check_against_score_batch(model, out: Path, infos: dict, batches: list) -> None:
    scores: dict[int, dict] = {}
    for rank, info in infos.items():
        if info["is_last_stage"]:
            part = torch.load(out / f"scores_rank{rank}.pt")
            assert not set(part) & set(scores)
            scores.update(part)
        else:
            assert not (out / f"scores_rank{rank}.pt").exists()
    assert sorted(scores) == list(range(len(batches)))
    for i, rows in enumerate(batches):
        batch = collate_pairs(rows, pad_id=0)
        want = score_batch(model, batch, FIELDS, topk=TOPK)
        got = scores[i]
        assert got["example_ids"] == list(batch.example_ids)
        assert got["token_logps"].shape == batch.input_ids.shape
        torch.testing.assert_close(got["seq_logps"], want.seq_logps, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["token_logps"], want.token_logps, atol=1e-5, rtol=0)
        assert torch.equal(got["topk_ids"], want.topk_ids)
        torch.testing.assert_close(got["topk_logps"], want.topk_logps, atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_two_stage_pipeline_matches_score_batch(saved_model, tmp_path):
    model_dir, model = saved_model
    batches = batch_rows(4)[:3]
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=2, stages=2, batches=batches)
    assert [infos[r]["stage"] for r in (0, 1)] == [0, 1]
    assert infos[0]["last_stage_ranks"] == [1] and infos[0]["first_stage_ranks"] == [0]
    assert infos[0]["parts"] == [0, 2, 4]
    # each stage holds only its slice: stage 0 = embedding + layer 0, stage 1 = layer 1 + norm + head
    items = [p.numel() for p in model.parameters()]
    assert infos[0]["stage_params"] + infos[1]["stage_params"] == sum(items)
    check_against_score_batch(model, tmp_path / "out", infos, batches)


@pytest.mark.distributed
def test_three_stage_pipeline_middle_stage_without_batch(saved_model, tmp_path):
    """Stage 1 (decoder layer 1 only) is passed None: only the end stages read the data."""
    model_dir, model = saved_model
    batches = batch_rows(5)[:2]
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=3, stages=3, batches=batches, micro_batches=2)
    assert infos[1]["parts"] == [0, 2, 3, 4] and infos[1]["stage"] == 1
    check_against_score_batch(model, tmp_path / "out", infos, batches)


@pytest.mark.distributed
def test_two_stages_times_two_replicas(saved_model, tmp_path):
    """World 4 = 2 stages x 2 replicas: rank = stage * R + replica; each replica scores its own batches."""
    model_dir, model = saved_model
    batches = batch_rows(6)
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=4, stages=2, batches=batches)
    assert [(infos[r]["stage"], infos[r]["replica"]) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(info["last_stage_ranks"] == [2, 3] and info["first_stage_ranks"] == [0, 1] for info in infos.values())
    check_against_score_batch(model, tmp_path / "out", infos, batches)
