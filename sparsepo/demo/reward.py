"""The demo's ground-truth reward: a sentiment lexicon score on response text.

Modelled on the controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023, §6.1),
where a sentiment classifier plays the "true" reward. Here the classifier is replaced by a
transparent, deterministic, pure-Python lexicon so that the reward is cheap, exactly
reproducible and easy to reason about:

    ground_truth_reward(text) = sum over words w of  sign(w) * weight(w)

* Words are the lower-cased runs of ``[a-z']`` in the text (punctuation and digits are ignored).
* ``POSITIVE`` words add their weight, ``NEGATIVE`` words subtract theirs (weights 0.5 / 1 / 2:
  "okay" < "good" < "wonderful").
* Negation: a word in ``NEGATORS`` ("not", "never", ...) flips the sign of the *immediately
  following* word if that word is in a lexicon ("not bad" = +1, "not good" = -1); it does
  nothing otherwise.

Length exploitation (documented on purpose). The raw score is a **sum**, not an average, so it grows
with the number of sentiment words: "The food was good." scores 1, "The food was good. The staff was
good. The view was good." scores 3. A policy optimised against this reward (or against preferences
labelled by it) can therefore gain reward simply by writing longer responses packed with positive
words, the classic length exploit that SimPO-style length normalisation targets.
``normalized_reward`` (score per word) and ``reward_details`` are provided so an analysis can tell
"more positive" apart from "just longer".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "POSITIVE",
    "NEGATIVE",
    "NEGATORS",
    "LEXICON",
    "RewardDetails",
    "ground_truth_reward",
    "normalized_reward",
    "reward_details",
    "words",
]

POSITIVE: dict[str, float] = {
    # strong (+2)
    **dict.fromkeys(
        ["amazing", "wonderful", "excellent", "fantastic", "superb", "perfect", "brilliant",
         "delightful", "outstanding", "loved", "love", "best"], 2.0),
    # plain (+1)
    **dict.fromkeys(
        ["good", "great", "nice", "pleasant", "friendly", "lovely", "tasty", "fresh", "clean", "cozy",
         "fun", "happy", "enjoyed", "liked", "charming", "helpful", "beautiful", "calm"], 1.0),
    # mild (+0.5)
    **dict.fromkeys(["fine", "decent", "okay"], 0.5),
}
"""Positive words and their weights."""

NEGATIVE: dict[str, float] = {
    # strong (-2)
    **dict.fromkeys(
        ["awful", "terrible", "horrible", "disgusting", "dreadful", "worst", "hated", "hate",
         "miserable", "disastrous"], 2.0),
    # plain (-1)
    **dict.fromkeys(
        ["bad", "poor", "rude", "dirty", "boring", "bland", "slow", "noisy", "sad", "disliked",
         "stale", "broken", "unpleasant", "disappointing", "overpriced", "ugly", "gloomy", "cramped"], 1.0),
    # mild (-0.5)
    **dict.fromkeys(["mediocre", "dull", "tired"], 0.5),
}
"""Negative words and their weights (the magnitude; they count with a minus sign)."""

NEGATORS: frozenset[str] = frozenset({"not", "never", "hardly", "no"})
"""Words that flip the sign of the immediately following lexicon word."""

LEXICON: dict[str, float] = {**POSITIVE, **{w: -v for w, v in NEGATIVE.items()}}
"""Signed weight of every sentiment word."""

assert not set(POSITIVE) & set(NEGATIVE), "a word cannot be both positive and negative"

_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """The words the reward sees: lower-cased runs of letters and apostrophes."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class RewardDetails:
    reward: float  # the ground-truth reward (signed sum)
    n_words: int  # words in the text
    n_positive: int  # lexicon words that counted positively (after negation)
    n_negative: int  # lexicon words that counted negatively (after negation)

    @property
    def normalized(self) -> float:
        """Reward per word (0 for an empty text)."""
        return self.reward / self.n_words if self.n_words else 0.0


def reward_details(text: str) -> RewardDetails:
    """The reward together with the counts it came from."""
    ws = words(text)
    total = 0.0
    n_pos = n_neg = 0
    for i, w in enumerate(ws):
        value = LEXICON.get(w)
        if value is None:
            continue
        if i > 0 and ws[i - 1] in NEGATORS:
            value = -value
        total += value
        if value > 0:
            n_pos += 1
        else:
            n_neg += 1
    return RewardDetails(reward=total, n_words=len(ws), n_positive=n_pos, n_negative=n_neg)


def ground_truth_reward(text: str) -> float:
    """Signed lexicon sum of `text` (see the module docstring). Deterministic, pure Python.

    >>> ground_truth_reward("The food was good and the staff was not rude.")
    2.0
    >>> ground_truth_reward("Awful. Just awful.")
    -4.0
    """
    return reward_details(text).reward


def normalized_reward(text: str) -> float:
    """Length-normalised variant for analysis: ground-truth reward per word (0 for empty text).

    Unlike `ground_truth_reward` it does not grow by repeating sentiment words, so comparing the two
    on a policy's samples separates "more positive" from "longer".
    """
    return reward_details(text).normalized
