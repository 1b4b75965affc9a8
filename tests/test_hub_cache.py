"""model.path / model.tokenizer / reference.path as Hub ids found in the local Hugging Face cache
(offline), a clear refusal when absent, and a missing local path never taken for a Hub id."""

import pytest

from sparsepo.config import ConfigError, load_config
from sparsepo.config.paths import check_local_inputs, could_be_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding `org/tiny` (refs/main -> one snapshot with config and tokenizer)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snap / "config.json").write_text("{}")
    (snap / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_a_cached_hub_id_resolves_to_its_snapshot(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory named org/tiny
    cfg = load_config(None, ["model.path=org/tiny", "reference.path=org/tiny", "model.tokenizer=org/tiny"])
    check_local_inputs(cfg)
    assert cfg.model.path == cfg.reference.path == cfg.model.tokenizer == str(hub_cache)


def test_an_absent_hub_id_names_the_key_the_id_and_the_cache(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_local_inputs(load_config(None, ["model.path=org/other"]))
    msg = str(e.value)
    assert msg.startswith("model.path org/other: no such local directory, and no Hub model 'org/other' in the local "
                          "Hugging Face cache") and str(hub_cache.parents[2]) in msg


def test_a_missing_local_path_is_reported_as_missing_not_as_a_hub_id(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in ("runs/demo/run-spo/final", "./final", str(tmp_path / "nope")):
        with pytest.raises(ConfigError, match=r"no such directory \(sparsepo never downloads"):
            check_local_inputs(load_config(None, [f"model.path={path}"]))
    assert [could_be_hub_id(v) for v in ("gpt2", "org/name-1.5B", "a/b/c", "../x", "/x", "~/x")] == \
           [True, True, False, False, False, False]
