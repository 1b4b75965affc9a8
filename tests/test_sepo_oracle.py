"""SePO's oracle pair: token scores by hand, the manifest, and the tokenizer / vocabulary refusal.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sepo_oracle.py -q
"""

import json
import shutil

import pytest
import torch

from sparsepo.data import collate_pairs
from sparsepo.logprobs.head import Head, PlainHead
from sparsepo.reference.oracle import OracleError, OraclePair, check_compatible, read_manifest
from sparsepo.reference.scorer import score_batch


def tiny_llama(seed: int, vocab: int = 23):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def pairs_batch():
    rows = [{"example_id": "a", "prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 9, 2], "rejected_ids": [10, 2]},
            {"example_id": "b", "prompt_ids": [1, 4], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 15, 2]}]
    return collate_pairs(rows, pad_id=0)


@pytest.mark.unit
@pytest.mark.parametrize("chunk", [0, 2])
def test_oracle_scores_equal_a_hand_computation(chunk):
    """r_t = log softmax(oracle logits[t-1])[x_t] − log softmax(reference logits[t-1])[x_t] on the
    response tokens, 0 elsewhere; computed here position by position with plain torch. chunk 2: the
    lean log-prob path (model.logits_chunk), two response positions per head chunk."""
    oracle, reference = tiny_llama(1), tiny_llama(2)
    batch = pairs_batch()
    ro = score_batch(OraclePair(Head.for_model(oracle, chunk), Head.for_model(reference, chunk)), batch, ("oracle_scores",), topk=16)
    assert ro.example_ids == ["a", "b"] and ro.present() == ["oracle_scores"]
    with torch.no_grad():
        lo = oracle(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        lr = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    expected = torch.zeros(batch.input_ids.shape, dtype=torch.float64)
    for n in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[n, t]:
                tok = batch.input_ids[n, t]
                expected[n, t] = (torch.log_softmax(lo[n, t - 1], -1)[tok] - torch.log_softmax(lr[n, t - 1], -1)[tok])
    assert ro.oracle_scores.shape == expected.shape
    assert torch.allclose(ro.oracle_scores.double(), expected, atol=1e-5), (ro.oracle_scores, expected)
    assert (ro.oracle_scores[batch.response_mask == 0] == 0).all()
    assert ro.oracle_scores[batch.response_mask != 0].abs().min() > 0  # two different models: nonzero rewards


@pytest.mark.unit
def test_oracle_pair_serves_only_oracle_scores():
    with pytest.raises(RuntimeError, match="only.*oracle_scores.*seq_logps"):
        OraclePair(PlainHead(tiny_llama(1)), PlainHead(tiny_llama(2))).score_batch(pairs_batch(), ("seq_logps",))


@pytest.mark.unit
def test_manifest_missing_names_the_command(tmp_path):
    with pytest.raises(OracleError, match="sparsepo sepo train-oracle"):
        read_manifest(tmp_path)
    (tmp_path / "oracle.json").write_text(json.dumps({"oracle": "run/final"}))
    with pytest.raises(OracleError, match="reference"):
        read_manifest(tmp_path)
    sft = tmp_path / "abs" / "sft"
    (tmp_path / "oracle.json").write_text(json.dumps({"oracle": "run/final", "reference": str(sft), "fraction": 0.5}))
    with pytest.raises(OracleError, match=r"\"oracle\" names 'run/final', which is no model directory"):
        read_manifest(tmp_path)  # refused here, not as the hub's "Repo id must be in the form ..."
    for d in (tmp_path / "run" / "final", sft):
        d.mkdir(parents=True)
    m = read_manifest(tmp_path)
    assert (m.oracle, m.reference, m.fraction) == (str(tmp_path / "run/final"), str(sft), 0.5)


@pytest.mark.unit
def test_a_manifest_with_a_working_directory_relative_path_still_resolves(tmp_path, monkeypatch):
    """Older manifests stored the oracle's reference as given on the command line, relative to the
    working directory (`sparsepo demo`'s runs/demo/world/sft-small): read from that directory it is
    found there; a path that exists beside the manifest wins."""
    oracle_dir, sft = tmp_path / "runs" / "oracle", tmp_path / "runs" / "sft"
    for d in (oracle_dir / "run" / "final", sft):
        d.mkdir(parents=True)
    (oracle_dir / "oracle.json").write_text(json.dumps({"oracle": "run/final", "reference": "runs/sft"}))
    monkeypatch.chdir(tmp_path)
    m = read_manifest(oracle_dir)
    assert (m.oracle, m.reference) == (str(oracle_dir / "run" / "final"), str(sft))


def other_tokenizer_copy(world, dst):
    """A copy of the SFT model whose tokenizer has one extra token (same model, same vocab size)."""
    from transformers import AutoTokenizer

    shutil.copytree(world.sft_dir, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(["<zzz_oracle_only>"])
    tok.save_pretrained(dst)
    return dst


def test_tokenizer_mismatch_is_refused_before_scoring(tiny_world, tmp_path, monkeypatch):
    """A run whose oracle has another tokenizer stops in the oracle check, naming both paths, before
    any model is loaded or a batch scored (cache mode: no cache written)."""
    from sparsepo.config import load_config
    from sparsepo.reference_role import offline

    odd = other_tokenizer_copy(tiny_world, tmp_path / "odd")
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    (oracle_dir / "oracle.json").write_text(json.dumps({"oracle": str(odd), "reference": str(tiny_world.sft_dir)}))
    with pytest.raises(OracleError) as e:
        check_compatible(str(tiny_world.sft_dir), str(tiny_world.sft_dir), read_manifest(oracle_dir))
    assert str(odd) in str(e.value) and str(tiny_world.sft_dir) in str(e.value) and "tokenizer" in str(e.value)

    cfg = load_config(None, [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                             "method.name=sepo", f"reference.oracle={oracle_dir}",
                             f"logging.output_dir={tmp_path / 'run'}"])
    loaded = []
    monkeypatch.setattr("sparsepo.models.load_frozen_model", lambda *a, **k: loaded.append(a) or None)
    with pytest.raises(OracleError, match="oracle tokenizer"):
        offline.load_scorer(cfg, ("oracle_scores",), "cpu")
    with pytest.raises(OracleError, match="oracle tokenizer"):
        offline.local_components(cfg, "data-fp", ("oracle_scores",))
    assert loaded == []


def test_vocabulary_mismatch_is_refused(tiny_world, tmp_path):
    from transformers import AutoConfig

    big = tmp_path / "big"
    shutil.copytree(tiny_world.sft_dir, big)
    config = AutoConfig.from_pretrained(big)
    config.vocab_size += 8
    config.save_pretrained(big)
    (tmp_path / "oracle.json").write_text(json.dumps({"oracle": str(tiny_world.sft_dir), "reference": str(big)}))
    with pytest.raises(OracleError, match=rf"oracle reference at {big} has a vocabulary of \d+ but the policy"):
        check_compatible(str(tiny_world.sft_dir), str(tiny_world.sft_dir), read_manifest(tmp_path))


def test_cache_key_includes_both_oracle_models(tiny_world, tmp_path):
    """Changing the oracle's reference changes the cache key (settings part) though the policy's
    reference and data are the same."""
    from sparsepo.config import load_config
    from sparsepo.reference_role import offline

    from transformers import AutoModelForCausalLM

    def moved_copy(name, by):
        shutil.copytree(tiny_world.sft_dir, tmp_path / name)
        copy = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            for p in copy.parameters():
                p.add_(by)
        copy.save_pretrained(tmp_path / name)
        return tmp_path / name

    oracle, other = moved_copy("oracle", 0.02), moved_copy("other", 0.01)  # an oracle is not its own reference
    keys = []
    for ref in (tiny_world.sft_dir, other):
        d = tmp_path / f"o{len(keys)}"
        d.mkdir()
        (d / "oracle.json").write_text(json.dumps({"oracle": str(oracle), "reference": str(ref)}))
        cfg = load_config(None, [f"model.path={tiny_world.sft_dir}", "method.name=sepo", f"reference.oracle={d}"])
        keys.append(offline.local_components(cfg, "data-fp", ("oracle_scores",)))
    assert keys[0]["model"] == keys[1]["model"] and keys[0]["settings"] != keys[1]["settings"]
    assert "oracle_reference" in keys[0]["settings_detail"]


@pytest.mark.unit
@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "tdpo1", "tdpo2", "fpo", "sepo", "spo"])
def test_demo_recipe_for_every_method_passes_only_its_params_keys(method):
    """`sparsepo demo --method X` re-targets the DPO demo recipe: no method row dies on `method.beta`."""
    import dataclasses

    import yaml

    from sparsepo.config import ConfigError, config_from_dict
    from sparsepo.losses import METHODS
    from sparsepo.recipe import for_method

    from conftest import RECIPE

    raw = for_method(yaml.safe_load(RECIPE.read_text()), method)
    fields = {f.name for f in dataclasses.fields(METHODS[method].params_cls)}
    assert raw["method"]["name"] == method and set(raw["method"]) - {"name"} <= fields
    assert ("beta" in raw["method"]) == ("beta" in fields)
    try:
        cfg = config_from_dict(raw, overrides=["sae.path=x", "reference.oracle=x"])
    except ConfigError as e:  # spo is refused by the trainer, for another reason
        assert method == "spo" and "unknown key" not in str(e), str(e)
    else:
        assert cfg.method.name == method


@pytest.mark.integration
def test_small_oracle_model_is_4x_smaller_and_fits_the_policy(tiny_world, tmp_path):
    """The demo's weak-to-strong starting model: the world's tokenizer and vocabulary (so the oracle
    check passes), at least 4x fewer parameters than the policy, cached on a second call."""
    from sparsepo.demo.small import MANIFEST, prepare_small_sft
    from sparsepo.demo.world import WorldPaths

    world = tmp_path / "world"
    shutil.copytree(tiny_world.root, world)
    paths = WorldPaths.under(world)
    small = prepare_small_sft(paths)
    stats = json.loads((small / MANIFEST).read_text())
    assert stats["n_params"] * 4 <= stats["policy_n_params"]
    assert stats["sft_final_loss"] < stats["sft_first_loss"]
    (tmp_path / "oracle.json").write_text(json.dumps({"oracle": str(small), "reference": str(paths.sft_dir)}))
    check_compatible(str(paths.sft_dir), str(paths.sft_dir), read_manifest(tmp_path))
    mtime = (small / "model.safetensors").stat().st_mtime_ns
    assert prepare_small_sft(paths) == small and (small / "model.safetensors").stat().st_mtime_ns == mtime
