"""The run's scorer, chosen once (`reference_role.scorers.scorer_for`): the frozen reference or SePO's oracle
pair, each owning its name, model paths, cache-key part, check, loading and wire format, so no mode
tests ``"oracle_scores" in outputs`` itself. Model directories hold a config and a tokenizer only."""

from __future__ import annotations

import ast
import json

import pytest
from test_run_tokenizer import WORDS, argv, model_dir
from test_shape import MODULES

from sparsepo.config import load_config
from sparsepo.reference.oracle import OracleError
from sparsepo.reference_role.scorers import OracleScorer, ReferenceScorer, scorer_for

pytestmark = pytest.mark.unit


@pytest.fixture
def dirs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}) + "\n")
    odd = model_dir(tmp_path / "odd", WORDS[:4] + list(reversed(WORDS[4:])))
    d = dict(policy=model_dir(tmp_path / "policy"), ref=model_dir(tmp_path / "ref"), odd=odd, data=data,
             out=tmp_path / "run", oracle=tmp_path / "oracle")
    d["oracle"].mkdir()
    return d


def oracle_cfg(d, oracle):
    (d["oracle"] / "oracle.json").write_text(json.dumps({"oracle": str(oracle), "reference": str(d["ref"])}))
    return load_config(None, argv(d, "method.name=sepo", f"reference.oracle={d['oracle']}"))


def test_the_reference_scorer(dirs):
    cfg = load_config(None, argv(dirs, f"reference.path={dirs['ref']}"))
    scorer = scorer_for(cfg, ("seq_logps",))
    assert isinstance(scorer, ReferenceScorer) and scorer.name == str(dirs["ref"])
    assert scorer.model_paths() == [str(dirs["ref"])] and scorer.fingerprints() == {}
    scorer.check()
    records = [{"seq_logps": 1.0}]
    assert scorer.wire(None, records, eos_id=2) is records  # sent as scored


def test_the_oracle_scorer_owns_its_paths_key_and_check(dirs, tmp_path):
    trained = model_dir(tmp_path / "trained")  # another model than the oracle's reference (same tokenizer)
    (trained / "model.safetensors").write_bytes(b"the oracle's weights")
    scorer = scorer_for(oracle_cfg(dirs, trained), ("oracle_scores",))
    assert isinstance(scorer, OracleScorer) and str(dirs["oracle"]) in scorer.name
    assert scorer.model_paths() == [str(trained), str(dirs["ref"])]
    assert set(scorer.fingerprints()) == {"oracle", "oracle_reference"}
    with pytest.raises(OracleError, match="the oracle tokenizer at"):
        scorer_for(oracle_cfg(dirs, dirs["odd"]), ("oracle_scores",)).check()


def test_no_mode_tests_for_the_oracle_itself():
    """server, offline and sources ask the scorer; `"oracle_scores" in ...` is decided in scorers.py."""
    found = sorted(name for name, path in MODULES.items() if name.startswith(("sparsepo.reference", "sparsepo.train"))
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In)
                   and getattr(node.left, "value", None) == "oracle_scores")
    assert found == ["sparsepo.reference_role.scorers"]


def test_only_sources_that_score_samples_serve_spo_and_a_pending_round_collects_once():
    from sparsepo.config.generation import GenerationConfig
    from sparsepo.policy_samples import PendingRound, PolicySamples
    from sparsepo.reference_role.sources import CacheSource, InlineSource, NoReference, SampleSource

    assert isinstance(InlineSource(None, (), topk=1), SampleSource)
    for source in (CacheSource(None, (), "cpu"), NoReference()):
        assert not isinstance(source, SampleSource)
        with pytest.raises(ValueError, match="SPO needs reference.mode=inline or live"):
            PolicySamples(GenerationConfig(), source=source, topk=1, support="policy", seed=0, pad_id=0, eos_id=2)

    class Counting:
        calls = 0

        def collect(self, ticket):
            self.calls += 1
            return {"ticket": ticket}

    source, entry = Counting(), PendingRound(step=3, samples=None, ids=None, ticket="t3")
    assert entry.wait(source) == {"ticket": "t3"} and entry.wait(source) is entry.ref and source.calls == 1
