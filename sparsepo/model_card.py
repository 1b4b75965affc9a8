"""The model card `sparsepo export` writes beside the weights (OUT/README.md, the Hub's format: YAML
front matter, then text): the base model, the method and its parameters, the data and its
fingerprint, the steps, and the run's final training and eval metrics when the run finished
(its summary.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from sparsepo.atomic import atomic_write

SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
         "logps/rejected")


def model_card(meta: dict, source: str, summary: dict | None) -> str:
    """The card's text from a checkpoint's sparsepo.json (`meta`), the base model and the run summary."""
    config = meta["config"]
    method = dict(config.get("method", {}))
    name = method.pop("name", "?")
    names = name if isinstance(name, list) else [name]
    front = {"library_name": "transformers", "base_model": source, "tags": ["sparsepo", *map(str, names)]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(config.get('logging', {}).get('output_dir', 'model')).name}", "",
             f"Trained from `{source}` with **{' + '.join(map(str, names))}** by sparsepo "
             f"({meta['step']} optimiser steps, {meta['samples']} pairs seen).", "",
             "## Method and parameters", "", "| parameter | value |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in method.items()), "",
             "## Data", "", f"- pairs: `{config.get('data', {}).get('path')}`",
             f"- data fingerprint (tokenised pairs, settings): `{meta.get('data')}`",
             f"- held-out evaluation: {eval_source(config.get('eval', {}))}", ""]
    lines += ["## Metrics", ""]
    if summary is None:
        lines += ["The run had not finished when this checkpoint was exported: no final metrics.", ""]
    else:
        rows = [(k, summary.get("final", {}).get(k), summary.get("eval", {}).get(k)) for k in SHOWN]
        lines += ["| metric | last training log step | final evaluation |", "|---|---|---|",
                  *(f"| {k} | {fmt(t)} | {fmt(e)} |" for k, t, e in rows if t is not None or e is not None), ""]
    lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def eval_source(section: dict) -> str:
    if section.get("path"):
        return f"`{section['path']}`"
    if section.get("fraction"):
        return f"{section['fraction']:.0%} of the pairs, held out"
    return "none"


def fmt(value) -> str:
    return "" if value is None else f"{value:.4g}"


def write_model_card(out: Path, tag_dir: Path, meta: dict, source: str) -> Path:
    """OUT/README.md; the run's summary.json (two levels above the checkpoint) supplies the metrics."""
    summary_path = Path(tag_dir).resolve().parent.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return atomic_write(Path(out) / "README.md", model_card(meta, source, summary))


def push_to_hub(out: Path, repo: str) -> int:
    """Upload an exported directory (weights, tokenizer, model card) to the Hub model repo `repo`."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo, exist_ok=True)
        url = upload_folder(repo_id=repo, folder_path=str(out), commit_message="sparsepo export")
    except Exception as e:  # noqa: BLE001 - offline, no token, no permission: one line, the model stays local
        print(f"sparsepo export: pushing {out} to the Hub repo {repo} failed ({type(e).__name__}: {str(e)[:300]}); "
              f"the model is exported in {out}: push it where a network and a token exist "
              f"(`hf auth login`, then `hf upload {repo} {out}`)", file=sys.stderr)
        return 1
    print(f"pushed to {url}")
    return 0
