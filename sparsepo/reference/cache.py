"""The reference cache: reference outputs per example id, in sharded files, verified on load.

Layout of a cache directory:

    index.json          written last (atomically): format, fingerprint components, shards with
                        their sha256 and example ids. No index -> not a cache (an interrupted
                        precompute leaves none, so it is never mistaken for a finished one).
    shard-00000.pt      torch.save({"example_ids": [...], "records": [{field: [chosen, rejected]}]})

The fingerprint is a dict of components (model weights, tokenizer, data, settings, format); a
mismatch names the components that differ. Every shard's size and sha256 are checked when the
cache is opened (`CacheReader.verify`, each rank its share: `offline.open_cache`), and again when a
shard is read, so a truncated or edited shard is refused before training starts, never trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from sparsepo.atomic import DiskFull, atomic_write
from sparsepo.hashing import update_with_file

FORMAT_VERSION = 1
INDEX = "index.json"


class CacheError(RuntimeError):
    """A reference cache that is missing, stale, or damaged."""


def hash_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def hash_files(directory: str | Path, patterns: Iterable[str]) -> str:
    """sha256 over the named files of a model/tokenizer directory (name + content, sorted)."""
    directory = Path(directory)
    h = hashlib.sha256()
    found = sorted({p for pat in patterns for p in directory.glob(pat) if p.is_file()})
    if not found:
        raise CacheError(f"nothing to fingerprint in {directory} (looked for {', '.join(patterns)})")
    for path in found:
        h.update(path.name.encode())
        update_with_file(h, path)
    return h.hexdigest()[:16]


MODEL_FILES = ("config.json", "*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "*.jinja",
                   "vocab.*", "merges.txt", "tokenizer.model")


def fingerprint_components(*, model_dir: str, tokenizer_dir: str, data: str, settings: dict) -> dict:
    """The parts of the cache key. `settings` holds every option that changes the numbers."""
    return {
        "format": str(FORMAT_VERSION),
        "model": hash_files(model_dir, MODEL_FILES),
        "tokenizer": hash_files(tokenizer_dir, TOKENIZER_FILES),
        "data": data,
        "settings": hash_bytes(json.dumps(settings, sort_keys=True).encode())[:16],
        "settings_detail": json.dumps(settings, sort_keys=True),
    }


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.pt"


def write_shard(cache_dir: str | Path, index: int, example_ids: list[str], records: list[dict]) -> dict:
    """Write one shard atomically; returns its index entry."""
    import io

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"example_ids": list(example_ids), "records": records}, buf)
    payload = buf.getvalue()
    publish(cache_dir / shard_name(index), payload)
    return {"file": shard_name(index), "sha256": hash_bytes(payload), "bytes": len(payload),
            "example_ids": list(example_ids)}


def write_index(cache_dir: str | Path, components: dict, shards: list[dict]) -> Path:
    path = Path(cache_dir) / INDEX
    body = {"format": FORMAT_VERSION, "fingerprint": components, "shards": shards}
    publish(path, json.dumps(body, indent=1).encode())
    return path


def publish(path: Path, payload: bytes) -> None:
    """`atomic_write`, with a full disk reported as a cache error (which file, the bytes needed and
    free, nothing published: an older file at `path` is untouched) and where to find more space."""
    try:
        atomic_write(path, payload)
    except DiskFull as e:
        raise CacheError(f"{e.strerror}. Free some space or point reference.cache_dir at a larger disk.") from e


def diff_components(found: dict, expected: dict) -> list[str]:
    keys = [k for k in expected if k != "settings_detail"]
    out = [k for k in keys if found.get(k) != expected.get(k)]
    return out


class CacheReader:
    """Reads reference records by example id, verifying fingerprint and shard checksums."""

    def __init__(self, cache_dir: str | Path, expected: dict | None = None):
        self.dir = Path(cache_dir)
        path = self.dir / INDEX
        if not path.is_file():
            raise CacheError(f"no reference cache at {self.dir} ({INDEX} missing); run `sparsepo precompute`")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{path} is damaged ({e}); delete {self.dir} and run `sparsepo precompute`") from e
        self.components = index.get("fingerprint", {})
        if expected is not None:
            differ = diff_components(self.components, expected)
            if differ:
                detail = ""
                if "settings" in differ:
                    detail = (f" cache settings {self.components.get('settings_detail')} vs run settings "
                              f"{expected.get('settings_detail')}.")
                raise CacheError(
                    f"reference cache at {self.dir} does not match this run: {', '.join(differ)} "
                    f"differ{'s' if len(differ) == 1 else ''}.{detail} Delete it (or point "
                    f"reference.cache_dir elsewhere) and run `sparsepo precompute`.")
        self.shards = index["shards"]
        self.location = {eid: (s, j) for s, shard in enumerate(self.shards)
                         for j, eid in enumerate(shard["example_ids"])}
        self._loaded: dict[int, list[dict]] = {}

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.location

    def missing(self, example_ids: Iterable[str]) -> list[str]:
        return [e for e in example_ids if e not in self.location]

    def _read(self, s: int) -> bytes:
        """Shard `s`'s bytes, checked against the index (size and sha256)."""
        entry = self.shards[s]
        path = self.dir / entry["file"]
        try:
            payload = path.read_bytes()
        except FileNotFoundError as e:
            raise CacheError(f"reference cache shard {path} is missing; rerun `sparsepo precompute`") from e
        if len(payload) != entry["bytes"] or hash_bytes(payload) != entry["sha256"]:
            raise CacheError(
                f"reference cache shard {path} is damaged or was modified (size {len(payload)} vs "
                f"{entry['bytes']} expected, or checksum differs). Delete {self.dir} and rerun "
                f"`sparsepo precompute`.")
        return payload

    def verify(self, *, rank: int = 0, world_size: int = 1, progress: bool = False) -> list[str]:
        """Check the shards this rank owns (shard s: rank s % world_size; all with the defaults)
        against the index; returns what failed (one message per damaged or missing shard)."""
        mine = range(rank, len(self.shards), world_size)
        if progress:
            from tqdm.auto import tqdm

            mine = tqdm(mine, desc=f"verifying reference cache ({world_size} rank(s))", unit="shard")
        failed = []
        for s in mine:
            try:
                self._read(s)
            except CacheError as e:
                failed.append(str(e))
        return failed

    def _shard(self, s: int) -> list[dict]:
        if s not in self._loaded:
            entry = self.shards[s]
            path = self.dir / entry["file"]
            payload = self._read(s)
            import io

            body = torch.load(io.BytesIO(payload), weights_only=True)
            if body["example_ids"] != entry["example_ids"]:
                raise CacheError(f"reference cache shard {path}: example ids differ from {INDEX}")
            self._loaded[s] = body["records"]
        return self._loaded[s]

    def get(self, example_ids: list[str]) -> list[dict]:
        missing = self.missing(example_ids)
        if missing:
            raise CacheError(f"reference cache at {self.dir} has no entry for example ids {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}; rerun `sparsepo precompute`")
        return [self._shard(s)[j] for s, j in (self.location[e] for e in example_ids)]
