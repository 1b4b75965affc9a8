"""Evaluate a trained policy against its reference on the demo world's held-out prompts.

    from sparsepo.demo import evaluate_policy
    stats = evaluate_policy("runs/dpo/final", "runs/demo/world/sft", "runs/demo/world/data/eval_prompts.jsonl")

    python -m sparsepo.demo.evaluate --policy runs/dpo/final --reference runs/demo/world/sft \
        --prompts runs/demo/world/data/eval_prompts.jsonl [--samples-per-prompt 4] [--out eval.json]

For every held-out prompt (repeated `samples_per_prompt` times) one response is sampled from the
policy and one from the reference, with the demo's text convention (`sparsepo.demo.world`):
the prompt ids are ``tokenizer(prompt).input_ids`` (bos first) and the response is decoded from the
sampled ids up to eos.

* ``win_rate``: fraction of (policy sample, reference sample) pairs of the same prompt in which the
  policy's ground-truth reward is higher; ties count 1/2 (`win_rate`).
* ``kl``: Monte-Carlo estimate of KL(policy || reference) per sequence: the mean over policy samples
  y of  sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)], eos included when sampled. Both
  log-probs are teacher-forced with the same code (so policy == reference gives exactly 0), and are
  those of the untempered models: the estimate is unbiased only for ``temperature=1``.
* ``policy_reward`` / ``reference_reward``: mean ground-truth reward; ``*_reward_normalized``: mean
  reward per word; ``*_length``: mean response length in tokens (eos excluded); ``*_words``: in words.

Both models are run on the ids of one tokenizer, so their tokenizers must agree: a policy and a
reference directory that each carry a tokenizer are compared by `sparsepo.data.rows.tokenizer_digest`
(the digest the data pipeline and the reference cache's data fingerprint key on: vocabulary, rules,
chat template, special ids; not the files' bytes, which a re-save changes) and a mismatch is refused
naming both paths (`check_same_tokenizer`).

Deterministic given `seed` (and `batch_size`): the policy samples with a generator seeded with
`seed`, the reference with `seed + 1`, so a model compared with itself gives a genuine coin flip
(win rate ~0.5) rather than identical samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sparsepo.demo.reward import reward_details
from sparsepo.demo.sampling import Sample, hf_progress_bars, response_logps, sample_responses, torch_threads
from sparsepo.demo.user_reward import check_prompt, encode_prompts, load_reward

log = logging.getLogger("sparsepo.demo")


def win_rate(policy_rewards: Sequence[float], reference_rewards: Sequence[float]) -> float:
    """Mean over paired comparisons of 1 (policy higher), 1/2 (tie) or 0 (reference higher)."""
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError(f"{len(policy_rewards)} policy rewards but {len(reference_rewards)} reference rewards")
    if not policy_rewards:
        raise ValueError("win_rate of no comparisons")
    score = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_rewards, reference_rewards))
    return score / len(policy_rewards)


def read_prompts(path: str | Path) -> list:
    """The `prompt` of each jsonl row: a string, or a list of {role, content} messages."""
    prompts = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object with a 'prompt'")
                prompts.append(check_prompt(row.get("prompt"), f"{path}:{i}"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _load_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_tokenizer(*candidates: str | Path):
    from transformers import AutoTokenizer

    errors = []
    for path in candidates:
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            errors.append(f"{path}: {exc}")
    raise OSError("no tokenizer found in " + "; ".join(errors))


def check_same_tokenizer(policy_dir: str | Path, reference_dir: str | Path,
                         tokenizer_dir: str | Path | None = None) -> None:
    """Refuse (ValueError naming the paths) when the tokenizers found in the policy, reference and
    `tokenizer_dir` directories do not all give the same ids; a directory without one is skipped."""
    from transformers import AutoTokenizer

    from sparsepo.data.rows import tokenizer_digest

    roles = {"tokenizer": tokenizer_dir, "policy": policy_dir, "reference": reference_dir}
    digests: dict[str, tuple[str, str]] = {}
    for role, path in roles.items():
        if path is None:
            continue
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            continue  # no tokenizer there (a bare model directory)
        digests[role] = (str(path), tokenizer_digest(tok))
    bare = [role for role in ("policy", "reference") if role not in digests]
    if bare and digests:
        log.warning("the %s directory %s holds no tokenizer: both models are run on the ids of the tokenizer in %s "
                    "(the rule: --reference must be the model the policy was trained from, or one with the policy's "
                    "tokenizer)", bare[0], roles[bare[0]], next(iter(digests.values()))[0])
    if len({d for _, d in digests.values()}) > 1:
        found = "; ".join(f"{role} {path} (tokenizer digest {d[:12]})" for role, (path, d) in digests.items())
        raise ValueError(f"the tokenizers differ: {found}. Both models are scored on one tokenizer's ids, so "
                         f"this comparison would be meaningless: evaluate the policy against the reference it "
                         f"was trained from (or give --reference a model with the policy's tokenizer)")


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def evaluate_policy(policy_dir: str | Path, reference_dir: str | Path, prompts_path: str | Path, *,
                    samples_per_prompt: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
                    seed: int = 0, batch_size: int = 256, progress: bool = True,
                    tokenizer_dir: str | Path | None = None, num_threads: int | None = None,
                    return_samples: bool = False, reward: str | None = None) -> dict:
    """Win rate, KL and reward/length statistics of a policy vs its reference (module docstring).

    reward: what scores the samples (`user_reward.load_reward`): None = the demo's lexicon, a reward-model
    directory or `module:callable`; the result names it under "reward".

    tokenizer_dir: defaults to the policy directory, then the reference directory.
    return_samples: also return the per-sample records under "samples".
    """
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be >= 1")
    t0 = time.perf_counter()
    prompts = read_prompts(prompts_path)
    with torch_threads(num_threads), hf_progress_bars(progress):
        tokenizer = _load_tokenizer(*([tokenizer_dir] if tokenizer_dir else [policy_dir, reference_dir]))
        check_same_tokenizer(policy_dir, reference_dir, tokenizer_dir)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if pad is None:
            pad = eos
        policy = _load_model(policy_dir)
        same = Path(policy_dir).resolve() == Path(reference_dir).resolve()
        reference = policy if same else _load_model(reference_dir)

        expanded = [p for p in prompts for _ in range(samples_per_prompt)]
        prompt_ids = encode_prompts(tokenizer, expanded)
        common = dict(max_new_tokens=max_new_tokens, eos_id=eos, temperature=temperature, batch_size=batch_size,
                      progress=progress)
        pol: list[Sample] = sample_responses(policy, prompt_ids, generator=torch.Generator().manual_seed(seed),
                                             desc="policy samples", **common)
        ref: list[Sample] = sample_responses(reference, prompt_ids,
                                             generator=torch.Generator().manual_seed(seed + 1),
                                             desc="reference samples", **common)
        scored = [s.scored_ids(eos) for s in pol]
        logp_pol = response_logps(policy, prompt_ids, scored, pad_id=pad, batch_size=batch_size)
        logp_ref = logp_pol if same else response_logps(reference, prompt_ids, scored, pad_id=pad,
                                                        batch_size=batch_size)

    pol_text = tokenizer.batch_decode([s.ids for s in pol], skip_special_tokens=True)
    ref_text = tokenizer.batch_decode([s.ids for s in ref], skip_special_tokens=True)
    pol_det = [reward_details(t) for t in pol_text]
    ref_det = [reward_details(t) for t in ref_text]
    score, reward_name = load_reward(reward)
    pol_r, ref_r = score(expanded, pol_text), score(expanded, ref_text)
    kls = [a - b for a, b in zip(logp_pol, logp_ref)]
    n = len(expanded)
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(pol_r, ref_r)]
    kl, kl_se = _mean_se(kls)
    out = {
        "n": n,
        "n_prompts": len(prompts),
        "samples_per_prompt": samples_per_prompt,
        "win_rate": win_rate(pol_r, ref_r),
        "win_rate_se": _mean_se(wins)[1],
        "kl": kl,
        "kl_se": kl_se,
        "policy_reward": sum(pol_r) / n,
        "reference_reward": sum(ref_r) / n,
        "reward": reward_name,
        "policy_reward_normalized": sum(r / max(1, d.n_words) for r, d in zip(pol_r, pol_det)) / n,
        "reference_reward_normalized": sum(r / max(1, d.n_words) for r, d in zip(ref_r, ref_det)) / n,
        "policy_length": sum(len(s.ids) for s in pol) / n,
        "reference_length": sum(len(s.ids) for s in ref) / n,
        "policy_words": sum(d.n_words for d in pol_det) / n,
        "reference_words": sum(d.n_words for d in ref_det) / n,
        "policy_ended_fraction": sum(s.ended for s in pol) / n,
        "reference_ended_fraction": sum(s.ended for s in ref) / n,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    if return_samples:
        out["samples"] = [
            {"prompt": p, "policy": pt, "reference": rt, "policy_reward": pr, "reference_reward": rr, "kl": k}
            for p, pt, rt, pr, rr, k in zip(expanded, pol_text, ref_text, pol_r, ref_r, kls)
        ]
    log.info("[eval] win rate %.3f, KL %.3f, reward %.3f vs %.3f, length %.1f vs %.1f tokens (n=%d, %.1fs)",
             out["win_rate"], kl, out["policy_reward"], out["reference_reward"], out["policy_length"],
             out["reference_length"], n, out["elapsed_s"])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sparsepo.demo.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the result (with samples) to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    res = evaluate_policy(args.policy, args.reference, args.prompts, samples_per_prompt=args.samples_per_prompt,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                          batch_size=args.batch_size, num_threads=args.threads, return_samples=bool(args.out))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
