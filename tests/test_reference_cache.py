"""Reference cache: fingerprint sensitivity, atomic shards, tamper/truncation refusal, record alignment."""

import json

import pytest
import torch

from sparsepo.reference.cache import (
    INDEX,
    CacheError,
    CacheReader,
    fingerprint_components,
    write_index,
    write_shard,
)
from sparsepo.reference.outputs import MisalignedOutputs, ReferenceOutputs


@pytest.fixture
def dirs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 32}')
    (model / "model.safetensors").write_bytes(b"\x00weights" * 10)
    (model / "tokenizer.json").write_text('{"vocab": [1, 2]}')
    (model / "tokenizer_config.json").write_text("{}")
    (model / "README.md").write_text("notes")
    return model


def comps(model, data="d0", **settings):
    return fingerprint_components(model_dir=str(model), tokenizer_dir=str(model), data=data,
                                  settings={"outputs": ["seq_logps"], "precision": "fp32", **settings})


def test_fingerprint_changes_with_what_changes_numbers(dirs):
    base = comps(dirs)
    assert comps(dirs) == base  # deterministic
    (dirs / "README.md").write_text("other notes")  # not a model or tokenizer file
    assert comps(dirs) == base
    assert comps(dirs, data="d1")["data"] != base["data"]
    assert comps(dirs, topk=8)["settings"] != base["settings"]
    (dirs / "tokenizer.json").write_text('{"vocab": [1, 3]}')
    tok = comps(dirs)
    assert tok["tokenizer"] != base["tokenizer"] and tok["model"] == base["model"]
    (dirs / "model.safetensors").write_bytes(b"\x01weights" * 10)
    assert comps(dirs)["model"] != base["model"]


def records(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"seq_logps": [torch.randn(1, generator=g)[0], torch.randn(1, generator=g)[0]],
             "token_logps": [torch.randn(3, generator=g), torch.randn(2, generator=g)]} for _ in range(n)]


def build(tmp, model, n=5, shard=2):
    c = comps(model)
    ids = [f"id{i}" for i in range(n)]
    recs = records(n)
    entries = [write_shard(tmp, s, ids[s * shard:(s + 1) * shard], recs[s * shard:(s + 1) * shard])
               for s in range((n + shard - 1) // shard)]
    write_index(tmp, c, entries)
    return c, ids, recs


def test_read_back_by_example_id_across_shards(tmp_path, dirs):
    c, ids, recs = build(tmp_path / "cache", dirs)
    reader = CacheReader(tmp_path / "cache", c)
    got = reader.get(["id4", "id0", "id3"])
    for g, i in zip(got, [4, 0, 3]):
        assert torch.equal(g["token_logps"][0], recs[i]["token_logps"][0])
        assert torch.equal(g["seq_logps"][1], recs[i]["seq_logps"][1])
    with pytest.raises(CacheError, match="no entry for example ids"):
        reader.get(["nope"])


def test_mismatch_names_the_component(tmp_path, dirs):
    c, *_ = build(tmp_path / "cache", dirs)
    with pytest.raises(CacheError) as e:
        CacheReader(tmp_path / "cache", comps(dirs, data="other"))
    assert "data differs" in str(e.value) and "precompute" in str(e.value)
    with pytest.raises(CacheError) as e:
        CacheReader(tmp_path / "cache", comps(dirs, topk=4))
    assert "settings differs" in str(e.value) and '"topk": 4' in str(e.value)


def test_missing_index_means_no_cache(tmp_path, dirs):
    build(tmp_path / "cache", dirs)
    (tmp_path / "cache" / INDEX).unlink()
    with pytest.raises(CacheError, match="index.json missing"):
        CacheReader(tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_refused(tmp_path, dirs, damage):
    c, ids, _ = build(tmp_path / "cache", dirs)
    shard = tmp_path / "cache" / "shard-00001.pt"
    payload = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(payload[: len(payload) // 2])
    elif damage == "flip":
        shard.write_bytes(payload[:-10] + bytes([payload[-10] ^ 0xFF]) + payload[-9:])
    else:
        shard.unlink()
    reader = CacheReader(tmp_path / "cache", c)
    reader.get(["id0"])  # shard 0 is intact
    with pytest.raises(CacheError, match="shard-00001.pt"):
        reader.get(["id2"])


def test_index_damage_is_refused(tmp_path, dirs):
    build(tmp_path / "cache", dirs)
    (tmp_path / "cache" / INDEX).write_text('{"format": 1, "fingerp')
    with pytest.raises(CacheError, match="damaged"):
        CacheReader(tmp_path / "cache")


def test_records_round_trip_through_a_padded_batch():
    # 2 pairs; response masks (chosen rows 0-1, rejected rows 2-3) with different padding
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.float)
    token = torch.arange(16, dtype=torch.float).view(4, 4) * mask
    topk = torch.arange(32, dtype=torch.float).view(4, 4, 2) * mask.unsqueeze(-1)
    ro = ReferenceOutputs(example_ids=["a", "b"], seq_logps=token.sum(-1), token_logps=token, topk_logps=topk)
    recs = ro.to_records(mask)
    assert recs[0]["token_logps"][0].tolist() == [1.0, 2.0]  # chosen of pair a: positions 1, 2
    assert recs[1]["token_logps"][1].tolist() == [13.0, 14.0, 15.0]  # rejected of pair b
    back = ReferenceOutputs.from_records(["a", "b"], recs, mask)
    assert torch.equal(back.token_logps, token) and torch.equal(back.topk_logps, topk)
    assert torch.equal(back.seq_logps, ro.seq_logps)


def test_records_from_other_tokenisation_are_refused():
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.float)
    ro = ReferenceOutputs(example_ids=["a"], token_logps=torch.ones(2, 3) * mask)
    recs = ro.to_records(mask)
    other = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.float)
    with pytest.raises(MisalignedOutputs, match="example a .rejected. has 1 tokens"):
        ReferenceOutputs.from_records(["a"], recs, other)
    with pytest.raises(MisalignedOutputs, match="records for a batch of 2"):
        ReferenceOutputs.from_records(["a", "b"], recs, torch.cat([mask, mask]))


def test_index_is_plain_json_with_checksums(tmp_path, dirs):
    build(tmp_path / "cache", dirs)
    index = json.loads((tmp_path / "cache" / INDEX).read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-00000.pt", "shard-00001.pt", "shard-00002.pt"]
    assert all(len(s["sha256"]) == 64 for s in index["shards"])
    assert not list((tmp_path / "cache").glob("*.tmp"))


def flip_a_byte(shard):
    payload = shard.read_bytes()
    shard.write_bytes(payload[:-10] + bytes([payload[-10] ^ 0xFF]) + payload[-9:])


def test_every_shard_is_verified_when_the_cache_is_opened(tmp_path, dirs):
    from sparsepo.reference_role.offline import open_cache

    c, *_ = build(tmp_path / "cache", dirs)  # shards 0, 1, 2
    open_cache(tmp_path / "cache", c)
    flip_a_byte(tmp_path / "cache" / "shard-00002.pt")
    with pytest.raises(CacheError, match="shard-00002.pt is damaged"):
        open_cache(tmp_path / "cache", c)  # before any get()
    # each rank checks its share: shard s on rank s % world_size
    reader = CacheReader(tmp_path / "cache", c)
    assert reader.verify(rank=1, world_size=2) == []
    assert ["shard-00002.pt" in m for m in reader.verify(rank=0, world_size=2)] == [True]


@pytest.mark.integration
@pytest.mark.slow  # default-time budget (2026-12-05: the default run was 18 min on an idle box); the verification itself: the unit tests above
def test_damaged_shard_is_refused_before_training_starts(tiny_world, tmp_path):
    from conftest import run_training

    common = ("method.name=dpo", f"reference.cache_dir={tmp_path / 'cache'}", "reference.shard_size=8")
    run_training(tiny_world, tmp_path / "pre", *common, "reference.mode=precompute", nproc=1)
    shards = sorted((tmp_path / "cache").glob("shard-*.pt"))
    assert len(shards) >= 3, shards
    flip_a_byte(shards[-1])  # the last shard: read only at the end of an epoch before, on first use
    proc = run_training(tiny_world, tmp_path / "run", *common, "train.micro_batch_size=2", nproc=2, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"{shards[-1].name} is damaged" in out, out[-3000:]
    assert "step 1 " not in out and not (tmp_path / "run" / "tensorboard").exists(), out[-3000:]


def test_full_disk_names_the_file_and_publishes_nothing(tmp_path):
    """A 1 MiB tmpfs (mounting needs root; skipped otherwise) and a 2 MB shard."""
    import subprocess

    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        big = [{"seq_logps": [torch.zeros(()), torch.zeros(())], "token_logps": [torch.zeros(250_000),
                                                                                   torch.zeros(250_000)]}]
        with pytest.raises(CacheError) as e:
            write_shard(disk / "cache", 0, ["id0"], big)
        msg = str(e.value)
        assert str(disk / "cache" / "shard-00000.pt") in msg and "nothing was published" in msg
        assert "bytes needed" in msg and "free" in msg
        assert list((disk / "cache").iterdir()) == []  # neither the shard nor a temporary file
    finally:
        subprocess.run(["umount", str(disk)], check=True)
