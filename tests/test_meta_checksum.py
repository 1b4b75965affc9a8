"""Issue 25: sparsepo.json carries the sha256 of its own body; a damaged one is a damaged checkpoint
(skipped by --resume auto, refused when named), never a config to argue with."""

from __future__ import annotations

import json
import logging

import pytest

from sparsepo.checkpoint import META, CheckpointError, find_resume, is_valid, resolve, seal
from test_checkpoint_integrity import cfg_for, fake_checkpoint

pytestmark = pytest.mark.unit


def sealed_checkpoint(tag_dir):
    tag = fake_checkpoint(tag_dir)
    meta = json.loads((tag / META).read_text())
    meta["config"] = {"method": {"name": "dpo", "beta": 0.1}}
    (tag / META).write_text(seal(meta))
    return tag


def test_seal_records_a_checksum_that_a_one_bit_flip_breaks(tmp_path):
    tag = sealed_checkpoint(tmp_path / "step-00000002")
    assert is_valid(tag) == (True, "")
    text = (tag / META).read_text()
    assert '"beta": 0.1' in text
    (tag / META).write_text(text.replace('"beta": 0.1', '"beta": 0.3'))  # 0.1 -> 0.3: one bit of '1' vs '3'
    assert is_valid(tag) == (False, f"{tag / META} is damaged (its content does not match its own sha256)")
    (tag / META).write_text(text.replace('"step": 2', '"step": 3'))  # any key, not only the config
    assert not is_valid(tag)[0]


def test_resume_skips_or_refuses_a_damaged_sparsepo_json(tmp_path, caplog):
    ckpts = tmp_path / "run" / "checkpoints"
    older = sealed_checkpoint(ckpts / "step-00000002")
    newest = sealed_checkpoint(ckpts / "step-00000004")
    (newest / META).write_text((newest / META).read_text().replace('"beta": 0.1', '"beta": 0.3'))
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        assert find_resume(cfg_for(tmp_path / "run", "auto")) == older
    assert f"skipping checkpoint {newest}: {newest / META} is damaged" in caplog.text
    with pytest.raises(CheckpointError, match=rf"cannot resume from {newest}: .*is damaged"):
        find_resume(cfg_for(tmp_path / "run", str(newest)))


def test_an_older_unsealed_sparsepo_json_is_accepted_with_a_warning(tmp_path, caplog):
    tag = fake_checkpoint(tmp_path / "step-00000002")  # json.dumps only: as sparsepo wrote it before
    with caplog.at_level(logging.WARNING, logger="sparsepo"):
        assert is_valid(tag) == (True, "")
    assert "carries no checksum of itself" in caplog.text
    assert resolve(tag) == tag
