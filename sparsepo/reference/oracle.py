"""SePO's oracle pair: a DPO-trained oracle and its own reference, scoring token rewards.

    manifest = oracle_manifest(cfg)        # <reference.oracle>/oracle.json, checked against the policy
    pair = OraclePair.load(manifest, device="cpu")
    ro = pair.score_batch(batch, ("oracle_scores",))

    r_t = log π_oracle(y_t | x, y<t) − log π_oracle_ref(y_t | x, y<t)     (Yang et al. 2024, Theorem 1)

Each side's token log-probs come from `sparsepo.reference.scoring.score`, the one scoring function
every reference path uses, so cache (precompute) and inline modes give the same numbers. The
directory is written by `sparsepo sepo train-oracle` (`sparsepo.oracle_train`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsepo.config.paths import run_tokenizer
from sparsepo.config.sections import ConfigError
from sparsepo.logprobs.head import Head
from sparsepo.reference.outputs import ReferenceOutputs
from sparsepo.reference.scoring import score

log = logging.getLogger("sparsepo")
MANIFEST = "oracle.json"
ORACLE_FIELDS = ("oracle_scores",)
"""What the oracle pair serves."""


class OracleError(ConfigError):
    """An oracle directory that is missing, damaged, or does not fit the policy (a config error: exit 2)."""


@dataclass(frozen=True)
class OracleManifest:
    directory: str
    """The `reference.oracle` directory holding oracle.json."""
    oracle: str
    """The DPO-trained oracle's model directory."""
    reference: str
    """The oracle's own reference: the model its DPO training started from."""
    fraction: float | None = None
    heldout_accuracy: float | None = None


def _model_path(directory: Path, value: str) -> str:
    if Path(value).is_absolute():
        return value
    beside = directory / value
    return str(beside if beside.exists() or not Path(value).exists() else Path(value).resolve())


def read_manifest(directory: str | Path) -> OracleManifest:
    """Read <directory>/oracle.json; relative model paths are taken relative to the directory (or,
    for a manifest written by an older sparsepo with a path relative to its working directory, from
    the current directory when only that exists)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise OracleError(f"reference.oracle={directory}: no {MANIFEST} there. Train an oracle with "
                          f"`sparsepo sepo train-oracle --config X --out {directory}`")
    try:
        raw = json.loads(path.read_text())
        models = {key: _model_path(directory, raw[key]) for key in ("oracle", "reference")}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OracleError(f"{path}: not an oracle manifest ({type(e).__name__}: {e}); it must name "
                          f"\"oracle\" and \"reference\" model directories") from e
    for key, model in models.items():
        if not Path(model).is_dir():
            raise OracleError(f"{path}: \"{key}\" names {raw[key]!r}, which is no model directory ({model} "
                              f"does not exist); sparsepo never downloads an oracle: point it at a local directory")
    if os.path.realpath(models["oracle"]) == os.path.realpath(models["reference"]):
        raise OracleError(f"{path}: \"oracle\" and \"reference\" are the same model ({models['oracle']}): every "
                          f"token reward r_t would be 0 and SePO's key tokens mere tie order. Name the DPO-trained "
                          f"oracle and the model its training started from (`sparsepo sepo train-oracle`)")
    return OracleManifest(directory=str(directory), fraction=raw.get("fraction"),
                          heldout_accuracy=raw.get("heldout_accuracy"), **models)


def check_compatible(policy_model: str, policy_tokenizer: str, manifest: OracleManifest) -> None:
    """Refuse an oracle (or oracle reference) whose tokenizer or vocabulary differs from the
    policy's: its token scores would describe other tokens. Names both paths (`models.check_same_tokens`,
    the check every scorer's models go through)."""
    from sparsepo.models import check_same_tokens

    for role, path in (("oracle", manifest.oracle), ("oracle reference", manifest.reference)):
        check_same_tokens(role, path, policy_tokenizer, policy_model, error=OracleError)


def oracle_manifest(cfg) -> OracleManifest:
    """The run's oracle (`reference.oracle`), read and checked against the policy: the one check
    cache, precompute and inline modes all call, before anything is scored."""
    if not cfg.reference.oracle:
        raise OracleError("method 'sepo' needs reference.oracle (a directory from `sparsepo sepo train-oracle`)")
    manifest = read_manifest(cfg.reference.oracle)
    check_compatible(cfg.model.path, run_tokenizer(cfg), manifest)
    prints = oracle_fingerprints(manifest)
    if prints["oracle"] == prints["oracle_reference"]:
        raise OracleError(f"{Path(manifest.directory) / MANIFEST}: the oracle at {manifest.oracle} and its reference "
                          f"at {manifest.reference} hold the same weights (fingerprint {prints['oracle']}): every "
                          f"token reward r_t would be 0. Use the DPO-trained oracle (`sparsepo sepo train-oracle`)")
    return manifest


def oracle_fingerprints(manifest: OracleManifest) -> dict:
    """Both oracle models' weight fingerprints: part of the reference cache key."""
    from sparsepo.reference.cache import MODEL_FILES, hash_files

    return {"oracle": hash_files(manifest.oracle, MODEL_FILES),
            "oracle_reference": hash_files(manifest.reference, MODEL_FILES)}


_FLAT = {"batches": 0}


def _warn_if_flat(scores: torch.Tensor, batch) -> None:
    """Warn (the 1st, 2nd, 4th, 8th... time) on a batch whose response tokens all score alike: its
    "key tokens" are tie order, not the oracle's choice."""
    values = scores[batch.response_mask.bool()]
    if values.numel() < 2 or bool(values.max() > values.min()):
        return
    _FLAT["batches"] += 1
    n = _FLAT["batches"]
    if n & (n - 1) == 0:
        log.warning("SePO oracle: every response token of batch %s... scores r_t = %.4g (%d such batch(es) so "
                    "far): the selected tokens are tie order. Is the oracle trained (oracle.json)?",
                    list(batch.example_ids)[:2], float(values[0]), n)


class OraclePair:
    """Two frozen models, each behind its `Head`; `score_batch` serves oracle_scores (and nothing else)."""

    def __init__(self, oracle: Head, reference: Head):
        self.oracle, self.reference = oracle, reference

    @classmethod
    def load(cls, manifest: OracleManifest, *, device="cpu", precision: str = "fp32", chunk: int = 0) -> "OraclePair":
        """Both models, each with its head (`chunk` > 0: the lean log-prob path, `sparsepo.logprobs.head`)."""
        from sparsepo.models import load_frozen_model

        return cls(*(Head.for_model(load_frozen_model(path, device=device, precision=precision), chunk)
                     for path in (manifest.oracle, manifest.reference)))

    @torch.no_grad()
    def token_scores(self, batch) -> torch.Tensor:
        """r_t for every row of a collated batch: (2B,T), zero outside the response mask."""
        logps = []
        for head in (self.oracle, self.reference):
            logits = head.forward(batch.input_ids, batch.attention_mask)
            logps.append(score(logits, batch.input_ids, batch.response_mask, ("token_logps",), topk=None)["token_logps"])
        scores = logps[0] - logps[1]
        _warn_if_flat(scores, batch)
        return scores

    def score_batch(self, batch, outputs: tuple[str, ...]) -> ReferenceOutputs:
        """The `sparsepo.reference.scorer.score_batch` contract for the oracle pair."""
        unsupported = [o for o in outputs if o not in ORACLE_FIELDS]
        if unsupported:
            raise RuntimeError(f"the SePO oracle pair serves only {list(ORACLE_FIELDS)}, not {unsupported}")
        return ReferenceOutputs(example_ids=list(batch.example_ids), oracle_scores=self.token_scores(batch))
