"""The local inputs a run reads before it can start: model, tokenizer and reference directories.

sparsepo never downloads: model.path, model.tokenizer and reference.path are local Hugging Face
directories. `check_local_inputs` refuses a missing directory or one without tokenizer files before
any loader runs (transformers would otherwise take the path for a hub id and fail with a message
about repo ids). Config loading refuses nothing on the disk's account, so `sparsepo config show` and tests can build
configs for paths that do not exist yet; it only makes existing local paths absolute
(`absolute_local_paths`), so the resolved config.yaml and every checkpoint's sparsepo.json name the
same directories from any working directory (export, resume from elsewhere).
"""

from __future__ import annotations

import os
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


def check_local_inputs(cfg: RunConfig) -> None:
    """Refuse, naming the key and the path, a model/tokenizer/reference directory that is not there."""
    check_model_dir("model.path", cfg.model.path)
    if cfg.model.tokenizer:
        check_tokenizer_dir("model.tokenizer", cfg.model.tokenizer)
    else:
        check_tokenizer_dir("model.path", cfg.model.path)
    if cfg.reference.path:
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
