"""One preference row → validated text → token ids: the per-row half of the pipeline.

Everything here is a pure function of the row, the tokenizer and `Settings`, so `datasets.map` can
cache its output under a fingerprint of exactly those (pipeline.py builds it from `settings_key`).
A bad row raises `BadRow(field, reason)`; `tokenise_batch` turns it into a record, never a drop.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass


PIPELINE_VERSION = 5
"""Bump when the output of `tokenise_batch` changes for the same input: it busts every cache.
2: chat roles are validated (a cached dataset may hold rows that are now refused).
3: the lengths before truncation are kept (prompt_tokens, chosen_tokens, rejected_tokens).
4: string pairs without a prompt (TRL's implicit prompt) and content-part messages are accepted.
5: conversational responses are the chat template's rendering as is, no eos appended (TRL 1.16): a
   ChatML turn ends "<|im_end|>\n", and the eos appended after the newline was one token too many."""

ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Chat roles a message may have (the OpenAI / Hugging Face chat-template vocabulary)."""
RESPONSE_ROLES = ("assistant", "tool", "function", "ipython")
"""Roles allowed in a response (chosen/rejected after the prompt); it must end with an assistant turn."""

TRUNCATION_MODES = ("prompt_first", "response_only", "error")
_BAD_CHARS = re.compile("[\ud800-\udfff\ufffd]")
COLUMNS = ("example_id", "prompt_ids", "chosen_ids", "rejected_ids", "truncated", "bad_field",
           "bad_reason", "overlong", "prompt_tokens", "chosen_tokens", "rejected_tokens")


class BadRow(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field, self.reason = field, reason


class Overlong(Exception):
    """A pair longer than max_length under truncation=error."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    max_length: int
    max_prompt_length: int
    truncation: str
    eos_at_cut: bool = False


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides the token ids: the backend's full JSON (vocab, normaliser, merges,
    post-processor), the chat template, the special ids, and a probe encoding."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({
        "class": type(tokenizer).__name__,
        "chat_template": tokenizer.chat_template,
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id],
        "probe": tokenizer("Probe: Hello, world 123.")["input_ids"],
    }, sort_keys=True, default=str).encode())
    return h.hexdigest()


def settings_key(tokenizer, settings: Settings) -> dict:
    """Every input of the tokenisation besides the rows: the cache and `dataset_fingerprint` key on it."""
    key = asdict(settings)
    if not key["eos_at_cut"]:  # keyed only when set, so datasets tokenised before the option keep their key
        del key["eos_at_cut"]
    return {"version": PIPELINE_VERSION, "tokenizer": tokenizer_digest(tokenizer), **key}


def undecodable(text: str) -> str | None:
    """Why `text` looks undecodable — a lone surrogate, or U+FFFD left by a lossy decode upstream."""
    m = _BAD_CHARS.search(text)
    if m is None:
        return None
    c = ord(m.group())
    kind = ("U+FFFD replacement character (the text was mis-decoded upstream)" if c == 0xFFFD
            else f"lone surrogate U+{c:04X}")
    return f"undecodable text: {kind} at character {m.start()}"


def _canon(value):
    """Messages without null-valued keys (Arrow pads every message struct to the union of keys)."""
    if isinstance(value, list):
        return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                for m in value]
    return value


def example_id(prompt, chosen, rejected) -> str:
    """Stable id of a pair: sha256 of the canonical JSON of its original form, first 16 hex digits.

    Canonical JSON: {"chosen", "prompt", "rejected"} with sorted keys, `ensure_ascii=False`,
    separators (",", ":"), UTF-8; chat messages lose null-valued keys; an implicit prompt is null.
    Same content → same id, whatever the file, format or row order.
    """
    canon = json.dumps({"prompt": _canon(prompt), "chosen": _canon(chosen),
                        "rejected": _canon(rejected)},
                       sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def _check_text(field: str, value) -> None:
    if value is None:
        raise BadRow(field, "missing or null")
    if not isinstance(value, str):
        raise BadRow(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow(field, "empty string" if not value else "only whitespace")
    bad = undecodable(value)
    if bad:
        raise BadRow(field, bad)


def text_parts(field: str, value):
    """Messages whose `content` is a list of parts (`[{"type": "text", "text": ...}]`, TRL's and
    OpenAI's shape) with their text parts joined into one string; other messages unchanged. A part
    that is not text (an image) is refused: the models here read text only."""
    if not isinstance(value, list):
        return value
    out = []
    for i, m in enumerate(value):
        parts = m.get("content") if isinstance(m, dict) else None
        if isinstance(parts, list):
            texts = []
            for j, part in enumerate(parts):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise BadRow(field, f"message {i}: content part {j} is {kind or type(part).__name__!r}, "
                                        f"not {{'type': 'text', 'text': ...}}; only text parts are supported")
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        out.append(m)
    return out


def implicit_string_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's `extract_prompt` for string pairs without a prompt: the longest common prefix is the
    prompt, less a space it ends with (that space stays with both responses)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k > 0 and chosen[k - 1] == " ":
        k -= 1
    if k == 0:
        raise BadRow("prompt", "no prompt column, and chosen and rejected share no leading text to take as "
                               "the prompt (TRL's implicit prompt); add a 'prompt' column")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[k:].strip():
            raise BadRow(name, "nothing after the prompt it shares with the other response")
    return chosen[:k], chosen[k:], rejected[k:]


def _check_messages(field: str, value) -> None:
    if value is None:
        raise BadRow(field, "missing or null")
    if not isinstance(value, list):
        raise BadRow(field, f"expected a list of chat messages, got {type(value).__name__}")
    if not value:
        raise BadRow(field, "empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(field, f"message {i}: expected a {{role, content}} object, got "
                                f"{type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise BadRow(field, f"message {i}: 'role' missing or not a string")
        if m["role"] not in ROLES:
            close = difflib.get_close_matches(m["role"].lower(), ROLES, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise BadRow(field, f"message {i}: unknown role {m['role']!r}{hint}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise BadRow(field, f"message {i}: 'content' must be a string, got "
                                f"{type(m.get('content')).__name__}")
        bad = undecodable(m["content"])
        if bad:
            raise BadRow(field, f"message {i}: {bad}")
    if not any(m["content"].strip() for m in value):
        raise BadRow(field, "every message's content is empty")


def _check_response(field: str, messages: list, start: int) -> None:
    """The response part of a conversation (messages[start:] of `field`) is the model's turn: only
    assistant (and tool) messages, ending with an assistant message."""
    for j, m in enumerate(messages):
        if m["role"] not in RESPONSE_ROLES:
            raise BadRow(field, f"message {start + j}: a {m['role']!r} message in the response; a response "
                                f"holds only {'/'.join(RESPONSE_ROLES)} messages (put it in the prompt)")
    if messages[-1]["role"] != "assistant":
        raise BadRow(field, f"message {start + len(messages) - 1}: the response ends with a "
                            f"{messages[-1]['role']!r} message, not an assistant one")


CHAT_EXTRAS = ("tools", "chat_template_kwargs")
"""Optional per-row columns handed to the chat template, as TRL 1.16 does: `tools` (a list of JSON
schemas) and `chat_template_kwargs` (a dict of template variables, e.g. Qwen3's enable_thinking)."""


def _render_chat(tokenizer, prompt: list, responses: tuple[list, list], extras: dict | None = None
                 ) -> tuple[str, str, str]:
    if not tokenizer.chat_template:
        raise BadRow("prompt", "chat messages, but the tokenizer has no chat template")
    extras = extras or {}
    kwargs = extras.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRow("chat_template_kwargs", f"must be a mapping of template variables, got {type(kwargs).__name__}")
    kwargs = {**kwargs, **({"tools": extras["tools"]} if extras.get("tools") is not None else {})}
    try:
        p = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        fulls = [tokenizer.apply_chat_template(prompt + r, tokenize=False, **kwargs) for r in responses]
    except Exception as e:  # jinja's raise_exception, e.g. "roles must alternate"
        raise BadRow("prompt", f"chat template failed: {type(e).__name__}: {e}") from e
    for name, full in zip(("chosen", "rejected"), fulls):
        if not full.startswith(p):
            raise BadRow(name, "the chat template's rendering of prompt + response does not start "
                               "with its rendering of the prompt (add_generation_prompt=True)")
    return p, fulls[0][len(p):], fulls[1][len(p):]


def prepare(prompt, chosen, rejected, *, has_prompt: bool, tokenizer, extras: dict | None = None
            ) -> tuple[str, bool, str, str, str]:
    """Validate one row: (example_id, templated, prompt_text, chosen_text, rejected_text). ``extras``:
    the row's ``CHAT_EXTRAS`` that are set (chat rows only; they are part of the row's id)."""
    if not has_prompt and isinstance(chosen, str):  # TRL's implicit prompt, string pairs
        _check_text("chosen", chosen)
        _check_text("rejected", rejected)
        if chosen == rejected:
            raise BadRow("rejected", "identical to chosen")
        return example_id(None, chosen, rejected), False, *implicit_string_prompt(chosen, rejected)
    prompt, chosen, rejected = (text_parts(f, v) for f, v in (("prompt", prompt), ("chosen", chosen),
                                                               ("rejected", rejected)))
    if not has_prompt or isinstance(prompt, list):
        if has_prompt:
            _check_messages("prompt", prompt)
        _check_messages("chosen", chosen)
        _check_messages("rejected", rejected)
        if _canon(chosen) == _canon(rejected):
            raise BadRow("rejected", "identical to chosen")
        if has_prompt:
            p, c, r = _canon(prompt), _canon(chosen), _canon(rejected)
        else:  # implicit prompt: the messages both conversations share
            c, r = _canon(chosen), _canon(rejected)
            k = 0
            while k < min(len(c), len(r)) and c[k] == r[k]:
                k += 1
            if k == 0:
                raise BadRow("prompt", "no prompt column, and chosen and rejected share no "
                                       "leading messages to take as the prompt")
            p, c, r = c[:k], c[k:], r[k:]
            for name, rest in (("chosen", c), ("rejected", r)):
                if not rest:
                    raise BadRow(name, "no messages after the prompt it shares with the other")
        start = len(p) if not has_prompt else 0
        _check_response("chosen", c, start)
        _check_response("rejected", r, start)
        extras = {k: v for k, v in (extras or {}).items() if v is not None}
        keyed = prompt if has_prompt else None
        return (example_id({"prompt": keyed, **extras} if extras else keyed, chosen, rejected), True,
                *_render_chat(tokenizer, p, (c, r), extras))
    _check_text("prompt", prompt)
    _check_text("chosen", chosen)
    _check_text("rejected", rejected)
    if chosen == rejected:
        raise BadRow("rejected", "identical to chosen")
    return example_id(prompt, chosen, rejected), False, prompt, chosen, rejected


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], *, max_length: int,
                  max_prompt_length: int, mode: str, bos_id: int | None = None):
    """Fit prompt + each response into max_length: (prompt, chosen, rejected, truncated).

    prompt_first: a prompt longer than max_prompt_length is cut from the LEFT to that length
    (keeping a leading bos_id, so the model still sees its start token), then responses are cut
    from the right to fit. response_only: only responses are cut. error: raises `Overlong`.
    A cut response loses its eos (`_finish` puts one back with eos_at_cut). No room left for a response raises BadRow.
    """
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, False
    if mode == "error":
        raise Overlong(f"prompt {len(prompt)} + chosen {len(chosen)} / rejected {len(rejected)} "
                       f"tokens exceed data.max_length={max_length}")
    if mode == "prompt_first" and len(prompt) > max_prompt_length:
        head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
        keep = max_prompt_length - len(head)
        prompt = head + (prompt[len(prompt) - keep:] if keep > 0 else [])
    room = max_length - len(prompt)
    if room < 1:
        raise BadRow("prompt", f"{len(prompt)} tokens leave no room for a response within "
                               f"data.max_length={max_length} (truncation={mode})")
    return prompt, chosen[:room], rejected[:room], True


def _finish(prompt, chosen, rejected, tokenizer, settings: Settings, *, chat: bool = False):
    """Append eos to string responses (conversational ones end as the chat template closes the turn, as
    in TRL), truncate, check the pair still differs."""
    for name, ids in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise BadRow(name, "empty after tokenisation")
    eos = tokenizer.eos_token_id
    if not chat:
        chosen = chosen if chosen[-1] == eos else chosen + [eos]
        rejected = rejected if rejected[-1] == eos else rejected + [eos]
    out = truncate_pair(prompt, chosen, rejected, max_length=settings.max_length,
                        max_prompt_length=settings.max_prompt_length, mode=settings.truncation,
                        bos_id=tokenizer.bos_token_id)
    if settings.eos_at_cut and out[3]:  # SePO's authors: a cut response ends in eos all the same
        out = (out[0], *(cut[:-1] + [eos] if len(cut) < len(whole) else cut
                         for cut, whole in ((out[1], chosen), (out[2], rejected))), out[3])
    if out[1] == out[2]:
        raise BadRow("rejected", "identical to chosen after tokenisation and truncation")
    return out


def tokenise_batch(batch: dict[str, list], *, tokenizer, settings: Settings) -> dict[str, list]:
    """`datasets.map(batched=True)` body: raw columns in, `COLUMNS` out (one row per input row)."""
    n = len(batch["chosen"])
    has_prompt = "prompt" in batch
    prompts = batch["prompt"] if has_prompt else [None] * n
    extras = [{k: batch[k][i] for k in CHAT_EXTRAS if k in batch} for i in range(n)]
    prepared: list = []
    for p, c, r, x in zip(prompts, batch["chosen"], batch["rejected"], extras):
        try:
            prepared.append(prepare(p, c, r, has_prompt=has_prompt, tokenizer=tokenizer, extras=x))
        except BadRow as b:
            prepared.append(b)
    ok = [i for i, x in enumerate(prepared) if not isinstance(x, BadRow)]
    prompt_ids: dict[int, list[int]] = {}
    for specials in (True, False):  # a chat template already wrote the specials into the text
        idx = [i for i in ok if prepared[i][1] is not specials]
        if idx:
            enc = tokenizer([prepared[i][2] for i in idx], add_special_tokens=specials)["input_ids"]
            prompt_ids.update(zip(idx, enc))
    resp = tokenizer([prepared[i][3] for i in ok] + [prepared[i][4] for i in ok],
                     add_special_tokens=False)["input_ids"] if ok else []
    chosen_ids, rejected_ids = dict(zip(ok, resp[:len(ok)])), dict(zip(ok, resp[len(ok):]))

    out: dict[str, list] = {k: [] for k in COLUMNS}
    for i, x in enumerate(prepared):
        row = {"example_id": "", "prompt_ids": [], "chosen_ids": [], "rejected_ids": [],
               "truncated": False, "bad_field": "", "bad_reason": "", "overlong": "",
               "prompt_tokens": 0, "chosen_tokens": 0, "rejected_tokens": 0}
        try:
            if isinstance(x, BadRow):
                raise x
            eos = tokenizer.eos_token_id  # lengths before truncation, responses without their eos
            row.update(prompt_tokens=len(prompt_ids[i]),
                       **{f"{side}_tokens": len(ids) - bool(ids and ids[-1] == eos)
                          for side, ids in (("chosen", chosen_ids[i]), ("rejected", rejected_ids[i]))})
            p, c, r, cut = _finish(prompt_ids[i], chosen_ids[i], rejected_ids[i], tokenizer, settings, chat=x[1])
            row.update(example_id=x[0], prompt_ids=p, chosen_ids=c, rejected_ids=r, truncated=cut)
        except BadRow as b:
            row.update(bad_field=b.field, bad_reason=b.reason)
        except Overlong as o:
            row.update(example_id=x[0], overlong=str(o))
        for k in COLUMNS:
            out[k].append(row[k])
    return out
