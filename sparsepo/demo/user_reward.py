"""What `sparsepo eval` scores samples with, and the prompts it samples from.

    score, name = load_reward(None)                     # the demo's sentiment lexicon (named as such)
    score, name = load_reward("runs/my_rm")             # a sequence-classification reward model directory
    score, name = load_reward("my_pkg.rewards:length")  # a Python callable reward(prompt, response) -> float
    rewards = score(prompts, responses)

A prompt is a string or a list of {role, content} messages (TRL's conversational shape); a reward
model reads prompt + response through its tokenizer's chat template when the prompt is messages.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

LEXICON = ("the demo's sentiment lexicon (sparsepo.demo.reward.ground_truth_reward: signed sum of sentiment words; "
           "meaningful on the demo world only; --reward DIR|module:callable for your own)")

Prompt = "str | list[dict]"


def check_prompt(value, where: str):
    """A non-empty string, or a non-empty list of {role, content} messages; else ValueError naming `where`."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return value
    raise ValueError(f"{where}: expected 'prompt' as a non-empty string or a list of {{role, content}} messages, "
                     f"got {value!r:.80}")


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt: strings as the demo writes them (bos first), messages through the chat
    template with the generation prompt (its own specials, none added), as the data pipeline does."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tokenizer(p)["input_ids"])
            continue
        if not tokenizer.chat_template:
            raise ValueError("conversational prompts need a chat template, and the tokenizer has none; give "
                             "--tokenizer a tokenizer with one, or the prompts as strings")
        text = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def load_reward(spec: str | None) -> tuple[Callable[[list, list[str]], list[float]], str]:
    """(score(prompts, responses) -> rewards, its description): None = the demo lexicon, an existing
    directory = a reward model, `module:callable` = a function reward(prompt, response) -> float."""
    if spec is None or spec == "lexicon":
        from sparsepo.demo.reward import ground_truth_reward

        return (lambda prompts, responses: [ground_truth_reward(r) for r in responses]), LEXICON
    if Path(spec).expanduser().is_dir():
        return reward_model(Path(spec).expanduser()), f"the reward model in {spec}"
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--reward {spec}: neither a reward-model directory nor module:callable")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--reward {spec}: cannot import {name!r} from {module!r}: {e}") from e
    return (lambda prompts, responses: [float(fn(p, r)) for p, r in zip(prompts, responses)]), f"{spec}"


def reward_model(path: Path, batch_size: int = 16):
    """A sequence-classification model with one output: its logit is the reward of prompt + response."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"--reward {path}: a reward model has one output (num_labels=1), this one has "
                         f"{model.config.num_labels}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id

    def text(prompt, response: str) -> str:
        if isinstance(prompt, list) and tok.chat_template:
            return tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        flat = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return flat + response

    @torch.no_grad()
    def score(prompts, responses):
        out = []
        texts = [text(p, r) for p, r in zip(prompts, responses)]
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True)
            out += model(**enc).logits[:, 0].float().tolist()
        return out

    return score
