"""Pipeline-parallel reference: stage modules, last-stage scoring, and real multi-process pipelines.

Single process: reducing over `pipeline_layers` reproduces the HF logits; the per-stage loader
reproduces `from_pretrained`; the last stage's `score` equals `score_batch`. Multi-process: a DeepSpeed
PipelineModule launched with torchrun (2 stages; 3 stages with a middle stage that never sees the
batch; 2 stages x 2 replicas) scores padded batches of different lengths and its last stages'
outputs equal a single-process `score_batch` of the same model.

FPO's SAE features: the stage holding decoder layer ℓ carries its output to the last stage, which
alone holds the SAE; feature ids/values equal `score_batch(..., features=SAEFeatures(sae, layer=ℓ))`
for ℓ on the first stage (crossing one or two stage boundaries) and on the last stage.
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
from sparsepo.engine.pipeline import build_pipeline
from sparsepo.reference.partition import PipelineConfigError, max_stages, stage_parts
from sparsepo.reference.scoring import FEATURE_FIELDS, ScoreFn, score
from sparsepo.reference.stage_loader import StageLoader
from sparsepo.reference.stages import pipeline_layers, run_layers
from sparsepo.logprobs.head import PlainHead
from sparsepo.reference.scorer import score_batch

from conftest import REPO, free_port, train_env

VOCAB = 101
TOPK = 5
FIELDS = ("seq_logps", "token_logps", "topk_ids", "topk_logps")
D_SAE, SAE_TOPK, FEATURE_K = 64, 8, 4  # SAE width, its per-token TopK, FPO's k (<= SAE_TOPK: no zero ties)
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


def random_sae(seed: int):
    """A TopK SAE for the 32-wide tiny Llama with sae-lens' random initial weights (b_enc 0)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=D_SAE, k=SAE_TOPK))
    sae.requires_grad_(False)
    return sae.eval()


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    """Saved SAEs (sparsepo.sae.save_sae) for decoder layer 0 and layer 1: {layer: dir}."""
    from sparsepo.sae import save_sae

    root = tmp_path_factory.mktemp("sae")
    return {layer: save_sae(random_sae(10 + layer), root / f"layer{layer}", layer=layer) for layer in (0, 1)}


def sae_features(sae_dir: Path, layer: int):
    from sparsepo.sae.runtime import SAEFeatures
    from sparsepo.sae import load_sae

    return SAEFeatures(load_sae(str(sae_dir)), layer=layer, k=FEATURE_K)


# ---------------------------------------------------------------------------------------------
# single process
# ---------------------------------------------------------------------------------------------

@pytest.mark.unit
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


@pytest.mark.unit
def test_last_stage_scoring_equals_score_batch():
    model = tiny_llama(seed=2)
    layers = pipeline_layers(model)
    for rows in batch_rows(2):
        batch = collate_pairs(rows, pad_id=0)
        want = score_batch(PlainHead(model), batch, FIELDS, topk=TOPK)
        with torch.no_grad():
            logits = run_layers(layers, batch.input_ids, batch.attention_mask)
        got = score(logits, batch.input_ids, batch.response_mask, ("seq_logps", "token_logps", "topk_logps",
                                                                    "topk_ids"), topk=TOPK)
        seq, tok, topk_logps, topk_ids = got.values()
        torch.testing.assert_close(seq, want.seq_logps, atol=1e-5, rtol=0)
        torch.testing.assert_close(tok, want.token_logps, atol=1e-5, rtol=0)
        assert torch.equal(topk_ids, want.topk_ids)
        torch.testing.assert_close(topk_logps, want.topk_logps, atol=1e-5, rtol=0)
        outside = batch.response_mask == 0
        assert (tok[outside] == 0).all() and (topk_ids[outside] == 0).all() and (topk_logps[outside] == 0).all()
    # topk 0 / None: only the log-probs (the last stage's fields), and top-K cannot be asked for
    assert ScoreFn(0).fields == ScoreFn(None).fields == ("seq_logps", "token_logps")
    assert len(ScoreFn(0)(logits, (batch.input_ids, batch.response_mask))) == 2
    with pytest.raises(ValueError, match="need topk >= 1"):
        score(logits, batch.input_ids, batch.response_mask, FIELDS, topk=0)


@pytest.mark.unit
@pytest.mark.parametrize("layer", [0, 1])
def test_feature_layer_is_carried_to_the_head_and_scored_like_score_batch(layer):
    """pipeline_layers(feature_layer=ℓ) reduces to (logits, layer ℓ's output); the last-stage
    scoring adds the SAE's pooled top-k, equal to score_batch with SAEFeatures."""
    from sparsepo.sae.runtime import SAEFeatures

    model = tiny_llama(seed=2)
    features = SAEFeatures(random_sae(layer), layer=layer, k=FEATURE_K)
    plain, carried = pipeline_layers(model), pipeline_layers(model, feature_layer=layer)
    for rows in batch_rows(7):
        batch = collate_pairs(rows, pad_id=0)
        want = score_batch(PlainHead(model), batch, FIELDS + FEATURE_FIELDS, topk=TOPK, features=features)
        with torch.no_grad():
            logits, hidden = run_layers(carried, batch.input_ids, batch.attention_mask)
            torch.testing.assert_close(logits, run_layers(plain, batch.input_ids, batch.attention_mask), atol=0, rtol=0)
            with features.capture(model) as cap:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            torch.testing.assert_close(hidden, cap.take(), atol=1e-6, rtol=0)
        fn = ScoreFn(TOPK, features=features)
        assert fn.feature_layer == layer and fn.fields[-2:] == FEATURE_FIELDS
        out = fn((logits, hidden), (batch.input_ids, batch.response_mask))
        assert len(out) == 6
        got = dict(zip(fn.fields, out))
        assert got["feature_ids"].shape == (batch.input_ids.shape[0], FEATURE_K)
        assert torch.equal(got["feature_ids"], want.feature_ids)
        torch.testing.assert_close(got["feature_values"], want.feature_values, atol=1e-5, rtol=0)
        torch.testing.assert_close(got["seq_logps"], want.seq_logps, atol=1e-5, rtol=0)
        assert torch.equal(got["topk_ids"], want.topk_ids)
        assert (got["feature_values"] > 0).all()
    # a last stage without the SAE (or without the carried layer) refuses rather than serving less
    with pytest.raises(RuntimeError, match="needs the SAE on the last stage"):
        ScoreFn(TOPK, feature_layer=layer)((logits, hidden), (batch.input_ids, batch.response_mask))
    with pytest.raises(RuntimeError, match="layer output missing"):
        fn(logits, (batch.input_ids, batch.response_mask))


@pytest.mark.unit
def test_feature_layer_refusals(saved_model, sae_dirs):
    """Checked before any process group is touched."""
    model_dir, model = saved_model
    with pytest.raises(PipelineConfigError, match="feature layer 2 is out of range.*0..1"):
        pipeline_layers(model, feature_layer=2)
    with pytest.raises(PipelineConfigError, match="feature layer 5 is out of range"):
        build_pipeline(str(model_dir), num_stages=2, topk=TOPK, feature_layer=5, features=lambda: None)
    with pytest.raises(PipelineConfigError, match="feature_layer without features"):
        build_pipeline(str(model_dir), num_stages=2, topk=TOPK, feature_layer=1)
    with pytest.raises(PipelineConfigError, match="SAE reads layer 0, the pipeline carries layer 1"):
        ScoreFn(TOPK, feature_layer=1, features=sae_features(sae_dirs[0], 0))


@pytest.mark.unit
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


@pytest.mark.unit
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
                 partition: str = "uniform", timeout: int = 120, sae: tuple[Path, int] | None = None,
                 chunk: int = 0) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    batches_file = out / "batches.pt"
    torch.save(batches, batches_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), str(WORKER), "--model", str(model_dir),
           "--batches", str(batches_file), "--out", str(out), "--stages", str(stages), "--topk", str(TOPK),
           "--micro-batches", str(micro_batches), "--partition", partition, "--chunk", str(chunk)]
    if sae is not None:
        cmd += ["--sae", str(sae[0]), "--sae-layer", str(sae[1]), "--sae-k", str(FEATURE_K)]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"pipeline run failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return {r: json.loads((out / f"info_rank{r}.json").read_text()) for r in range(nproc)}


def check_against_score_batch(model, out: Path, infos: dict, batches: list, features=None) -> None:
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
        want = score_batch(PlainHead(model), batch, FIELDS + (FEATURE_FIELDS if features else ()), topk=TOPK,
                           features=features)
        got = scores[i]
        assert got["example_ids"] == list(batch.example_ids)
        if features is None:
            assert not set(FEATURE_FIELDS) & set(got)
        else:
            assert got["feature_ids"].shape == (batch.input_ids.shape[0], FEATURE_K)
            assert torch.equal(got["feature_ids"], want.feature_ids)
            torch.testing.assert_close(got["feature_values"], want.feature_values, atol=1e-5, rtol=0)
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
def test_two_stage_pipeline_on_the_lean_path_matches_score_batch(saved_model, tmp_path):
    """model.logits_chunk > 0: the last stage's head hands ``score`` its input (no (N,T,V) logits);
    the scores equal the plain single-process ones."""
    model_dir, model = saved_model
    batches = batch_rows(4)[:3]
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=2, stages=2, batches=batches, chunk=3)
    assert infos[0]["head_chunks"] == [] and infos[1]["head_chunks"] == [3]  # the head lives on the last stage
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


# --- FPO's SAE features through the pipeline ------------------------------------------------

def check_sae_placement(infos: dict, layer: int) -> None:
    """Only last stages load the SAE (and import sae-lens); every stage knows the carried layer."""
    for info in infos.values():
        assert info["feature_layer"] == layer
        assert info["holds_sae"] == info["sae_lens_imported"] == info["is_last_stage"], info
        assert info["outputs"] == list(FIELDS + FEATURE_FIELDS)


@pytest.mark.distributed
@pytest.mark.parametrize("layer", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1 (on the last stage): budget
def test_two_stage_pipeline_serves_sae_features(saved_model, sae_dirs, tmp_path, layer):
    """Layer 0 lives on stage 0 (its output crosses to stage 1), layer 1 on the last stage itself."""
    model_dir, model = saved_model
    batches = batch_rows(8)[:3]
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=2, stages=2, batches=batches, sae=(sae_dirs[layer], layer))
    assert infos[0]["parts"] == [0, 2, 4]
    check_sae_placement(infos, layer)
    check_against_score_batch(model, tmp_path / "out", infos, batches, features=sae_features(sae_dirs[layer], layer))


@pytest.mark.distributed
def test_three_stages_uneven_micro_batches_carry_layer_0_through_the_middle(saved_model, sae_dirs, tmp_path):
    """Layer 0's output rides through the middle stage (which never sees the batch); 5 pairs = 10 rows
    in 4 micro-batches of 3, 3, 2, 2 rows (DeepSpeed's eval total_loss would not add those up)."""
    model_dir, model = saved_model
    rng = random.Random(9)
    batches = [random_rows(rng, 5, 9, "u"), random_rows(rng, 2, 6, "v")]
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=3, stages=3, batches=batches, micro_batches=4,
                         sae=(sae_dirs[0], 0))
    assert infos[1]["parts"] == [0, 2, 3, 4]
    check_sae_placement(infos, 0)
    check_against_score_batch(model, tmp_path / "out", infos, batches, features=sae_features(sae_dirs[0], 0))


@pytest.mark.distributed
def test_two_stages_times_two_replicas_serve_sae_features(saved_model, sae_dirs, tmp_path):
    model_dir, model = saved_model
    batches = batch_rows(10)
    infos = run_pipeline(model_dir, tmp_path / "out", nproc=4, stages=2, batches=batches, sae=(sae_dirs[1], 1))
    check_sae_placement(infos, 1)
    assert [r for r, info in infos.items() if info["holds_sae"]] == [2, 3]
    check_against_score_batch(model, tmp_path / "out", infos, batches, features=sae_features(sae_dirs[1], 1))


@pytest.mark.distributed
def test_sae_load_failure_on_the_last_stage_fails_every_stage(saved_model, tmp_path):
    """Only the last stage loads the SAE; when that fails, the first stage must fail too (with the
    reason), not wait in DeepSpeed's collectives until the process-group timeout."""
    model_dir, _ = saved_model
    with pytest.raises(AssertionError, match="pipeline run failed") as err:
        run_pipeline(model_dir, tmp_path / "out", nproc=2, stages=2, batches=batch_rows(8)[:1],
                     sae=(tmp_path / "no-such-sae", 1), timeout=90)
    text = str(err.value)
    cause = "pipeline reference: the last stage (rank 1) could not load the SAE: FileNotFoundError"
    assert f"[rank1]: sparsepo.logprobs.families.PipelineConfigError: {cause}" in text, text[-3000:]
    assert f"[rank0]: RuntimeError: pipeline reference: loading the SAE on the last stage: rank 1 failed: " \
           f"PipelineConfigError: {cause}" in text, text[-3000:]
