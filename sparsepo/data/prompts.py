"""SPO's optional prompt file (`generation.prompts_path`): prompts the policy samples from, which may
lie outside the preference data. Validated like preference data: the same loaders and per-field
checks (`rows`), a bad row refused (or skipped under data.on_bad_row=skip) naming its line.

    prompts = load_prompts(cfg.generation.prompts_path, cfg.data, tokenizer)   # list of (id, token ids)

Rows: {"prompt": "text"} or {"prompt": [{role, content}, ...]} (rendered with the chat template and
add_generation_prompt=True). Token ids follow the pair convention (strings: add_special_tokens=True);
a prompt longer than data.max_prompt_length is cut from the left, keeping a leading bos.
"""

from __future__ import annotations

import logging

from sparsepo.data import rows as R
from sparsepo.data.errors import DataError
from sparsepo.data.sources import load_rows

log = logging.getLogger("sparsepo")


def _tokenise(prompt, tokenizer, max_prompt_length: int) -> list[int]:
    if isinstance(prompt, list):
        R._check_messages("prompt", prompt)
        if not tokenizer.chat_template:
            raise R.BadRow("prompt", "chat messages, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        R._check_text("prompt", prompt)
        ids = tokenizer(prompt)["input_ids"]
    if len(ids) > max_prompt_length:
        bos = tokenizer.bos_token_id
        ids = ([bos] + ids[len(ids) - max_prompt_length + 1:]) if bos is not None and ids[0] == bos \
            else ids[len(ids) - max_prompt_length:]
    return ids


def load_prompts(path: str, data_cfg, tokenizer) -> list[tuple[str, list[int]]]:
    """(prompt id, token ids) per usable row, in file order; duplicates kept once."""
    raw, src = load_rows(path, "auto", split=data_cfg.split, cache_dir=data_cfg.cache_dir)
    if "prompt" not in raw.column_names:
        raise DataError(f"{src.path}: a prompt file needs a 'prompt' column (text or chat messages); it has "
                        f"{raw.column_names} (generation.prompts_path)")
    out, seen, bad = [], set(), []
    for i, prompt in enumerate(raw["prompt"]):
        try:
            ids = _tokenise(prompt, tokenizer, data_cfg.max_prompt_length)
        except R.BadRow as e:
            if data_cfg.on_bad_row == "error":
                raise DataError(f"{src.path}: {src.where(i)}: field 'prompt': {e.reason}; fix the prompt file "
                                f"(generation.prompts_path), or set data.on_bad_row=skip") from None
            bad.append(i)
            continue
        pid = R.example_id(prompt, None, None)
        if pid not in seen:
            seen.add(pid)
            out.append((pid, ids))
    if len(bad) > data_cfg.max_skip_fraction * len(raw):
        raise DataError(f"{src.path}: {len(bad)} of {len(raw)} prompts are bad, more than "
                        f"data.max_skip_fraction={data_cfg.max_skip_fraction}; first: {src.where(bad[0])}")
    if not out:
        raise DataError(f"{src.path}: no usable prompts (generation.prompts_path)")
    log.info("%s: %d prompts for SPO's samples (%d bad skipped, %d duplicates)", src.path, len(out), len(bad),
             len(raw) - len(bad) - len(out))
    return out


def prompts_for(prompts: list[tuple[str, list[int]]], *, step: int, micro: int, rank: int, dp: int,
                grad_accum: int, per_slot: int) -> list[tuple[str, list[int]]]:
    """The prompts of one (step, micro-step, rank) slot: consecutive, cycling through the file, disjoint
    across ranks and micro-steps of a step (the same walk on any number of ranks for one global batch)."""
    start = ((step * grad_accum + micro) * dp + rank) * per_slot
    return [prompts[(start + j) % len(prompts)] for j in range(per_slot)]
