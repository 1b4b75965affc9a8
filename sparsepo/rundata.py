"""What every entry point of a run needs first (training, precompute, the reference server):
the locked run directory, the tokenizer, the tokenised pairs and their fingerprint, and the SAE.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sparsepo import data as pdata
from sparsepo.config import RunConfig
from sparsepo.config.paths import reference_path, run_tokenizer
from sparsepo.data.filters import pair_filter_for
from sparsepo.engine.dist import DistContext
from sparsepo.models import load_tokenizer
from sparsepo.padding import batch_length
from sparsepo.rundir import prepare_run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """What every role's entry point needs first: the run directory, tokenizer and tokenised pairs."""

    run_dir: Path
    tokenizer: Any
    dataset: Any
    report: Any
    fingerprint: str
    length: int | None = None
    """Every batch's fixed padded length (`sparsepo.padding.batch_length`), or None: the longest row."""
    eval_dataset: Any = None
    """Held-out pairs (eval.path, eval.split of data.path, or eval.fraction of the training pairs), or None."""
    eval_fingerprint: str | None = None

    def collate(self, rows: list[dict]):
        """Dataset rows (dicts) -> one PairBatch."""
        return pdata.collate_pairs(rows, self.tokenizer.pad_token_id, length=self.length)

    def batch(self, indices) -> Any:
        """The PairBatch of these dataset rows, in this order."""
        return self.collate(pdata.gather_rows(self.dataset, list(indices)))

    def eval_batch(self, indices) -> Any:
        """The PairBatch of these held-out rows."""
        return self.collate(pdata.gather_rows(self.eval_dataset, list(indices)))


def load_run_tokenizer(cfg: RunConfig):
    """The tokenizer every role of a run tokenises the pairs with (`config.paths.run_tokenizer`, the one
    rule), with data.chat_template in place of its own template when set."""
    tokenizer = load_tokenizer(run_tokenizer(cfg))
    if cfg.data.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.data.chat_template)
    return tokenizer


def read_chat_template(value: str) -> str:
    """data.chat_template: the text of the file it names, or the template itself."""
    from sparsepo.config import ConfigError

    path = Path(value).expanduser()
    if "{" not in value and "\n" not in value:
        if not path.is_file():
            raise ConfigError(f"data.chat_template {value}: no such file (give a Jinja template file, or the "
                              f"template text itself)")
        return path.read_text()
    return value


def load_run_data(cfg: RunConfig, ctx: DistContext) -> RunData:
    run_dir = prepare_run_dir(cfg, is_main=ctx.is_main)
    seed_everything(cfg.train.seed)
    tokenizer = load_run_tokenizer(cfg)
    if not ctx.is_main:  # rank 0 tokenises and fills the datasets cache; the others then hit it
        dist.barrier()
    dataset, report = pdata.load_preference_dataset(cfg.data, tokenizer, run_dir=run_dir if ctx.is_main else None,
                                                    pair_filter=pair_filter_for(cfg))
    dataset, held = with_eval_pairs(cfg, tokenizer, dataset)
    if ctx.is_main:
        dist.barrier()
    return RunData(run_dir, tokenizer, dataset, report, with_prompts(cfg, pdata.dataset_fingerprint(dataset)),
                   length=batch_length(cfg, announce=ctx.is_main), eval_dataset=held,
                   eval_fingerprint=None if held is None else pdata.dataset_fingerprint(held))


def with_eval_pairs(cfg: RunConfig, tokenizer, dataset):
    """(training pairs, held-out pairs or None): eval.path / eval.split read like data.path, or
    eval.fraction held out of `dataset` with train.seed. Every role calls it alike (the live reference
    group too), so the training fingerprint (the cache key) is the split's on both sides."""
    if cfg.eval.fraction:
        return pdata.holdout_split(dataset, cfg.eval.fraction, cfg.train.seed)
    return dataset, (load_eval_pairs(cfg, tokenizer) if cfg.eval.path or cfg.eval.split else None)


def load_eval_pairs(cfg: RunConfig, tokenizer):
    """eval.path, or the split eval.split of data.path, read and tokenised like data.path (its skipped rows are
    logged, not reported to a file)."""
    from dataclasses import replace

    from sparsepo.data.sources import resolve_format

    if cfg.eval.split and resolve_format(cfg.data.path, cfg.data.format) not in ("disk", "hub"):
        raise pdata.DataError(f"eval.split={cfg.eval.split!r}: data.path {cfg.data.path} is one file, which has no "
                              f"splits; give the held-out file as eval.path, or hold out eval.fraction of it")
    source = {"path": cfg.eval.path} if cfg.eval.path else {"split": cfg.eval.split}
    held, _ = pdata.load_preference_dataset(replace(cfg.data, **source), tokenizer,
                                            pair_filter=pair_filter_for(cfg))
    return held


def with_prompts(cfg: RunConfig, fingerprint: str) -> str:
    """The run's data fingerprint: the pairs', joined (for a method that samples from it: SPO) by the
    content of generation.prompts_path, so a prompt file rewritten in place between a checkpoint and its
    resume is refused like changed pairs. A hub name (no local file) joins by name."""
    from sparsepo.losses import get_method

    path = cfg.generation.prompts_path
    if not path or not get_method(cfg.method.name).needs_policy_samples:
        return fingerprint
    from sparsepo.hashing import sha256_file

    local = Path(path)
    files = sorted(f for f in local.rglob("*") if f.is_file()) if local.is_dir() else [local] if local.is_file() else []
    h = hashlib.sha256(f"{fingerprint}\0prompts\0".encode())
    for f in files:
        h.update(f"{f.relative_to(local) if local.is_dir() else f.name}\0{sha256_file(f)}\0".encode())
    if not files:
        h.update(path.encode())
    return h.hexdigest()[:len(fingerprint)]


def load_features(cfg: RunConfig, spec):
    """The frozen SAE (FPO), checked against the reference model it must have been trained on."""
    if not spec.needs_sae_features:
        return None
    from sparsepo.sae.runtime import load_for_run

    return load_for_run(cfg, model_fingerprint=model_fingerprint(cfg))


def model_fingerprint(cfg: RunConfig) -> str:
    """The reference weights' fingerprint (the cache key's "model" part; an SAE's sidecar records
    the one it was trained on). Read on one rank and shared: the files may be large."""
    from sparsepo.engine.collectives import on_one_rank
    from sparsepo.reference.cache import MODEL_FILES, hash_files

    return on_one_rank(lambda: hash_files(reference_path(cfg), MODEL_FILES))


def load_run_prompts(cfg: RunConfig, ctx: DistContext, tokenizer):
    """SPO's prompt file (generation.prompts_path) as (id, token ids), or None: rank 0 reads it first
    (filling the datasets cache), then the others."""
    if not cfg.generation.prompts_path:
        return None
    from sparsepo.data.prompts import load_prompts

    if not ctx.is_main:
        dist.barrier()
    try:
        prompts = load_prompts(cfg.generation.prompts_path, cfg.data, tokenizer)
    except pdata.DataError as e:  # the loaders name data.path, the key of the pairs: name the prompts' key
        raise pdata.DataError(str(e).replace("data.path", "generation.prompts_path")) from None
    if ctx.is_main and ctx.world_size > 1:
        dist.barrier()
    return prompts
