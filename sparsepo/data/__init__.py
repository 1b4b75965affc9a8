"""Preference data: load pairs, validate them, tokenise once (cached), batch them, order them.

    from sparsepo.data import load_preference_dataset, collate_pairs, epoch_order, micro_batch_indices
    ds, report = load_preference_dataset(cfg.data, tokenizer, run_dir=cfg.logging.output_dir)

Rooms: sources.py (files, save_to_disk dirs, hub → Arrow), rows.py (one row → validated text →
ids; pure), pipeline.py (map + cache, bad rows, duplicates, report), batching.py (PairBatch and the
distributed order; pure torch — importing it does not import `datasets`).

Shapes (TRL's four). Either `prompt`/`chosen`/`rejected` strings (chosen/rejected are responses
only), or lists of {role, content} messages (TRL's conversational shape; a content may be a list of
{"type": "text", "text"} parts, joined), or only `chosen`/`rejected`, full conversations whose shared
leading messages are the prompt, or full strings whose longest common prefix is (TRL's
`extract_prompt`: a trailing space stays with the responses). `data.chat_template` replaces the
tokenizer's template (`rundata.load_run_tokenizer`).

Tokenisation convention (the reference scorer and trainer read the ids; they never re-tokenise):
  strings: prompt_ids = tokenizer(prompt)["input_ids"]            (add_special_tokens=True: bos)
           response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
  chat:    prompt_text = apply_chat_template(prompt, add_generation_prompt=True)
           response_text = apply_chat_template(prompt + response) minus the prompt_text prefix
           both tokenised with add_special_tokens=False (the template writes its own specials);
           no eos is appended: the response ends as the template closes the turn (TRL 1.16).
Prompt and response are tokenised separately. TRL 1.16 tokenises prompt + completion together and
splits where the ids diverge; the two agree whenever the response text starts at a token boundary
(a string response that begins with its space, " blue.", or any chat template's turn), and differ
for a string prompt that ends in a space ("The sky is " + "blue.": sparsepo gives the prompt a
lone space token). Put the space at the start of the response, as TRL's documentation does.

Truncation, when len(prompt) + len(response) > max_length for either response:
  prompt_first  a prompt longer than max_prompt_length is cut from the LEFT to max_prompt_length
                (a leading bos is kept, so the kept tail is max_prompt_length - 1 tokens), then
                responses are cut from the right to max_length - len(prompt);
  response_only only responses are cut from the right;
  error         DataError naming the row (whatever on_bad_row says).
A cut response loses its eos (with data.eos_at_cut its last kept token becomes eos). The number of truncated pairs is logged and in DataReport.truncated.

Bad rows: missing/null/empty/whitespace-only field, wrong type, chosen == rejected (as given, or
after tokenisation and truncation), undecodable text (lone surrogates, U+FFFD from a lossy decode,
invalid UTF-8), a field empty after tokenisation, a chat template that cannot split prompt from
response. Rows are numbered from 1: JSON Lines (.jsonl, and .json written as lines) by the file's
line number, other formats by record (row 1 = first record; a CSV header is not a row).
on_bad_row=error raises DataError(file, row, field, reason) at the first; skip leaves them out,
lists (row, field, reason) in run_dir/skipped_rows.jsonl and refuses when more than
max_skip_fraction of rows are bad. A source the reader cannot parse is refused in both modes.

Duplicates (same example id) keep their first row; later copies are left out in both modes and
listed in skipped_rows.jsonl with field "pair" (DataReport.duplicates; they do not count towards
max_skip_fraction). Identical pairs would share one reference-cache entry, and a copy adds no
information beyond reweighting.

Example id: first 16 hex digits of sha256 over the canonical JSON of (prompt, chosen, rejected) as
given (see rows.example_id); `dataset_fingerprint(ds)` = sha256 over the tokenisation settings
(tokenizer digest, lengths, truncation, pipeline version) and the ordered ids: the reference cache
keys on it.

Distributed use: call load_preference_dataset on one rank first (it fills the cache), barrier, then
on the others (cache hits); pass run_dir on that first rank only.
"""

from sparsepo.data.batching import (
    PairBatch,
    collate_pairs,
    epoch_order,
    gather_rows,
    micro_batch_indices,
    steps_per_epoch,
)
from sparsepo.data.errors import DataError, SkippedRow

_LAZY = {"load_preference_dataset", "dataset_fingerprint", "write_skip_report", "DataReport", "holdout_split"}

__all__ = ["DataError", "DataReport", "PairBatch", "SkippedRow", "collate_pairs",
           "dataset_fingerprint", "epoch_order", "gather_rows", "holdout_split", "load_preference_dataset",
           "micro_batch_indices", "steps_per_epoch", "write_skip_report"]


def __getattr__(name: str):
    # `datasets` costs ~1 s to import; batching/order users should not pay it.
    if name in _LAZY:
        from sparsepo.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'sparsepo.data' has no attribute {name!r}")
