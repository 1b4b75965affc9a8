"""The local inputs a run reads before it can start: model, tokenizer and reference directories.

sparsepo never downloads: model.path, model.tokenizer and reference.path are local Hugging Face
directories, or Hub ids (`org/name`) of models already in the local Hugging Face cache, which
`check_local_inputs` replaces with their snapshot directory (offline: `snapshot_download(...,
local_files_only=True)`). It refuses a missing directory or one without tokenizer files before
any loader runs (transformers would otherwise take the path for a hub id and fail with a message
about repo ids); a value that cannot be a Hub id (`runs/demo/run/final`, `./x`, `/x`) is reported
as a missing local directory. Config loading refuses nothing on the disk's account, so `sparsepo config show` and tests can build
configs for paths that do not exist yet; it only makes existing local paths absolute
(`absolute_local_paths`), so the resolved config.yaml and every checkpoint's sparsepo.json name the
same directories from any working directory (export, resume from elsewhere).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sparsepo.config.sections import ConfigError, RunConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
"""A directory holding any one of these can give a tokenizer (fast, sentencepiece, BPE or WordPiece)."""


def check_model_dir(key: str, path: str | Path) -> Path:
    """`path` (the value of config key `key`) is an existing directory, or a ConfigError naming both."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key} {path}: no such directory (sparsepo never downloads; point it at a local "
                          f"Hugging Face model directory)")
    if not p.is_dir():
        raise ConfigError(f"{key} {path}: a file, not a directory; point it at a local Hugging Face model "
                          f"directory (the one holding config.json)")
    return p


def check_tokenizer_dir(key: str, path: str | Path) -> Path:
    p = check_model_dir(key, path)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key} {path}: no tokenizer files in this directory (looked for "
                          f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there "
                          f"(tokenizer.save_pretrained), or set model.tokenizer to the directory that has it")
    return p


def run_tokenizer(cfg: RunConfig) -> str:
    """The run's tokenizer directory, the one rule: the policy's (model.tokenizer, else model.path).
    Both roles tokenise the data with it, and every model that scores the run's tokens (the reference,
    SePO's oracle pair, the model an SAE reads) must share it (`models.check_same_tokens`)."""
    return cfg.model.tokenizer or cfg.model.path


def reference_path(cfg: RunConfig) -> str:
    """The frozen reference's directory: reference.path, else the policy's starting model."""
    return cfg.reference.path or cfg.model.path


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def could_be_hub_id(value: str) -> bool:
    """`name` or `org/name` as the Hub spells ids; not a path that starts with ., /, ~ or has 3+ parts."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not value.endswith((".", "-"))


def cached_hub_model(key: str, value: str) -> Path:
    """The local snapshot of Hub model `value` (the cache's copy of its default branch), without a
    network; a ConfigError naming the key, the id and the cache when it is not there."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ConfigError(f"{key} {value}: no such local directory") from None
    try:
        return Path(snapshot_download(value, local_files_only=True))
    except Exception:  # noqa: BLE001 - absent, partial or unparsable: the same answer
        raise ConfigError(f"{key} {value}: no such local directory, and no Hub model {value!r} in the local "
                          f"Hugging Face cache ({constants.HF_HUB_CACHE}); sparsepo never downloads: fetch it "
                          f"where a network exists (`hf download {value}`, the same HF_HOME), or point {key} at "
                          f"a local model directory") from None


def resolve_model_dir(key: str, value: str) -> str:
    """A local directory as given, or a cached Hub id's snapshot directory."""
    if not Path(value).expanduser().exists() and could_be_hub_id(value):
        return str(cached_hub_model(key, value))
    return value


def check_local_inputs(cfg: RunConfig) -> None:
    """Refuse, naming the key and the path, a model/tokenizer/reference directory that is not there;
    a Hub id found in the local cache is replaced, in `cfg`, by its snapshot directory."""
    cfg.model.path = resolve_model_dir("model.path", cfg.model.path)
    check_model_dir("model.path", cfg.model.path)
    if cfg.model.tokenizer:
        cfg.model.tokenizer = resolve_model_dir("model.tokenizer", cfg.model.tokenizer)
        check_tokenizer_dir("model.tokenizer", cfg.model.tokenizer)
    else:
        check_tokenizer_dir("model.path", cfg.model.path)
    if cfg.reference.path:
        cfg.reference.path = resolve_model_dir("reference.path", cfg.reference.path)
        check_model_dir("reference.path", cfg.reference.path)


LOCAL_PATH_KEYS = (("model", "path"), ("model", "tokenizer"), ("reference", "path"), ("reference", "oracle"),
                   ("sae", "path"), ("data", "path"), ("eval", "path"))
"""Keys naming local inputs; made absolute at load time when they exist (a hub-style sae.path or
data.path that does not exist locally is left as written)."""


def absolute_local_paths(cfg: RunConfig) -> None:
    """Rewrite, in place, each LOCAL_PATH_KEYS value that names an existing file or directory as an
    absolute path (os.path.abspath: `..` collapsed, symlinks kept, so the name stays the user's)."""
    for section, key in LOCAL_PATH_KEYS:
        body = getattr(cfg, section)
        value = getattr(body, key)
        if value and Path(value).expanduser().exists():
            setattr(body, key, os.path.abspath(os.path.expanduser(value)))
