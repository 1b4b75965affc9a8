"""Issue 25: a degenerate SePO oracle (its two models the same, by path or by weights) is refused
before anything is scored; a batch whose oracle scores are all equal is warned about."""

import json
import logging
import shutil

import pytest

from sparsepo.logprobs.head import Head
from sparsepo.reference.oracle import OracleError, OraclePair, oracle_manifest, read_manifest
from test_sepo_oracle import pairs_batch, tiny_llama


@pytest.mark.unit
def test_the_same_directory_twice_is_refused(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "oracle.json").write_text(json.dumps({"oracle": "sft", "reference": str(tmp_path / "sft")}))
    with pytest.raises(OracleError, match=r"\"oracle\" and \"reference\" are the same model .*r_t would be 0"):
        read_manifest(tmp_path)


def test_the_same_weights_under_two_paths_are_refused(tiny_world, tmp_path):
    from sparsepo.config import load_config

    shutil.copytree(tiny_world.sft_dir, tmp_path / "copy")  # the oracle "trained" for zero steps
    (tmp_path / "oracle.json").write_text(json.dumps({"oracle": str(tmp_path / "copy"),
                                                      "reference": str(tiny_world.sft_dir)}))
    cfg = load_config(None, [f"model.path={tiny_world.sft_dir}", "method.name=sepo", f"reference.oracle={tmp_path}"])
    with pytest.raises(OracleError, match=r"hold the same weights \(fingerprint"):
        oracle_manifest(cfg)


@pytest.mark.unit
def test_a_batch_whose_oracle_scores_are_all_equal_warns(caplog, monkeypatch):
    from sparsepo.reference import oracle

    monkeypatch.setitem(oracle._FLAT, "batches", 0)  # warned the 1st, 2nd, 4th... time: start from the 1st
    batch = pairs_batch()
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        OraclePair(Head.for_model(tiny_llama(1), 0), Head.for_model(tiny_llama(2), 0)).token_scores(batch)  # a real oracle: no warning
        assert "tie order" not in caplog.text
        same = Head.for_model(tiny_llama(3), 0)
        scores = OraclePair(same, same).token_scores(batch)
    assert (scores == 0).all()
    assert "every response token of batch ['a', 'b']" in caplog.text and "tie order" in caplog.text
