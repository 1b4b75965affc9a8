"""The demo's synthetic text world: prompts and templated short reviews / stories.

A prompt names a thing to write about and ends with a colon::

    "Review of the old cafe:"     "Story about the quiet harbour:"     "Notes on the new laptop:"

A response is 1-4 short sentences built from templates. Each response draws a latent mood
``p_pos ~ Beta(0.8, 0.8)``; every sentiment slot is filled with a positive lexicon word with
probability ``p_pos`` and a negative one otherwise (negated templates such as "The staff was not X."
pick X of the opposite sign), and a quarter of the sentences are neutral filler. So the corpus, and
an LM trained on it, produces responses of varied sentiment and length whose ground-truth reward
(`sparsepo.demo.reward`) ranges roughly over [-8, 8], with mean about zero.

Joining convention (used for SFT, sampling, the preference pairs and evaluation): a response is
stored WITHOUT a leading space, and the model sees ``bos + tok(prompt) + tok(response) + eos``, which
is exactly the tokenisation of the text ``prompt + " " + response`` (the demo tokenizer prepends a
word-boundary marker to every piece, see `sparsepo.demo.world`).
"""

from __future__ import annotations

import random

from sparsepo.demo.reward import LEXICON, NEGATIVE, NEGATORS, POSITIVE

KINDS = ("Review of", "Story about", "Notes on", "Thoughts on", "Comments on", "A note about")
QUALIFIERS = ("old", "new", "little", "big", "local", "quiet", "corner", "family", "modern", "small",
              "large", "famous")
SUBJECTS = (
    "cafe", "hotel", "museum", "park", "bakery", "library", "train", "bus", "market", "beach", "garden",
    "restaurant", "cinema", "theatre", "school", "bookshop", "gym", "farm", "castle", "bridge", "harbour",
    "zoo", "festival", "concert", "play", "film", "book", "album", "game", "phone", "laptop", "camera",
    "bike", "car", "chair", "lamp", "jacket", "tent", "boat", "village", "town", "river", "lake", "forest",
    "mountain", "island", "office", "kitchen", "shop", "pub", "inn", "station", "airport", "ferry", "class",
    "trip", "hostel", "gallery", "bar", "pool",
)
ASPECTS = ("staff", "service", "food", "coffee", "room", "view", "music", "price", "place", "owner", "seats",
           "light", "menu", "design", "sound", "story", "ending", "people", "weather", "location", "walk",
           "wait", "smell", "decor", "screen", "battery")
DAYS = ("Monday", "Tuesday", "Friday", "Sunday", "a rainy day", "the weekend", "a holiday")
NUMBERS = ("two", "three", "four", "five", "ten")
WHO = ("My friend", "My sister", "My brother", "The guide", "A man", "Everyone")

# Sentiment vocabulary the templates draw from (all of it is in the reward lexicon).
POS_ADJ = ("amazing", "wonderful", "excellent", "fantastic", "superb", "perfect", "brilliant", "delightful",
           "good", "great", "nice", "pleasant", "friendly", "lovely", "tasty", "fresh", "clean", "cozy", "fun",
           "charming", "helpful", "beautiful", "calm", "fine", "decent", "okay")
NEG_ADJ = ("awful", "terrible", "horrible", "disgusting", "dreadful", "miserable", "bad", "poor", "rude",
           "dirty", "boring", "bland", "slow", "noisy", "sad", "stale", "broken", "unpleasant", "disappointing",
           "overpriced", "ugly", "gloomy", "cramped", "mediocre", "dull", "tired")
POS_VERB = ("loved", "liked", "enjoyed")
NEG_VERB = ("hated", "disliked")

# Templates: {a}/{b} aspects, {s}/{t} sentiment adjectives, {v} a sentiment verb, {x} a negated
# adjective (its sign is the opposite of the slot's), {w} a person, {d} a day, {n} a number.
SENTIMENT_TEMPLATES = (
    "The {a} was {s}.",
    "The {a} was {s} and the {b} was {t}.",
    "I {v} the {a}.",
    "We {v} it.",
    "Overall it was {s}.",
    "The {a} was not {x}.",
    "It felt {s}.",
    "{w} said the {a} was {s}.",
    "The {a} was {s}, but the {b} was {t}.",
    "It was a {s} day.",
)
NEUTRAL_TEMPLATES = (
    "We went there on {d}.",
    "We stayed for {n} hours.",
    "There were {n} people.",
    "The {a} was on the left.",
    "I went with {n} friends.",
    "{w} was there too.",
    "We came back on {d}.",
)
SENTENCE_COUNTS = (1, 2, 3, 4)
SENTENCE_WEIGHTS = (0.3, 0.35, 0.25, 0.1)
NEUTRAL_FRACTION = 0.25


def _check_vocab() -> None:
    assert set(POS_ADJ) <= set(POSITIVE) and set(POS_VERB) <= set(POSITIVE)
    assert set(NEG_ADJ) <= set(NEGATIVE) and set(NEG_VERB) <= set(NEGATIVE)
    neutral = set(KINDS[0].lower().split())
    for group in (KINDS, QUALIFIERS, SUBJECTS, ASPECTS, DAYS, NUMBERS, WHO, NEUTRAL_TEMPLATES):
        for item in group:
            neutral.update(item.lower().replace("{", " ").replace("}", " ").replace(".", " ").split())
    bad = sorted(w for w in neutral if w in LEXICON or w in NEGATORS)
    assert not bad, f"neutral corpus words in the reward lexicon: {bad}"


_check_vocab()


def all_prompts() -> list[str]:
    """Every prompt of the world, in a fixed order (6 kinds x 12 qualifiers x 60 subjects = 4320)."""
    return [f"{k} the {q} {s}:" for k in KINDS for q in QUALIFIERS for s in SUBJECTS]


def _sentiment_sentence(rng: random.Random, p_pos: float) -> str:
    template = rng.choice(SENTIMENT_TEMPLATES)
    a, b = rng.sample(ASPECTS, 2)

    def adj(positive: bool) -> str:
        return rng.choice(POS_ADJ if positive else NEG_ADJ)

    return template.format(
        a=a, b=b,
        s=adj(rng.random() < p_pos), t=adj(rng.random() < p_pos),
        v=rng.choice(POS_VERB if rng.random() < p_pos else NEG_VERB),
        x=adj(not (rng.random() < p_pos)),
        w=rng.choice(WHO),
    )


def _neutral_sentence(rng: random.Random) -> str:
    return rng.choice(NEUTRAL_TEMPLATES).format(a=rng.choice(ASPECTS), d=rng.choice(DAYS),
                                                n=rng.choice(NUMBERS), w=rng.choice(WHO))


def sample_response(rng: random.Random) -> str:
    """One corpus response (no leading space): 1-4 sentences with a latent mood."""
    p_pos = rng.betavariate(0.8, 0.8)
    n = rng.choices(SENTENCE_COUNTS, weights=SENTENCE_WEIGHTS)[0]
    sentences = [_neutral_sentence(rng) if rng.random() < NEUTRAL_FRACTION else _sentiment_sentence(rng, p_pos)
                 for _ in range(n)]
    return " ".join(sentences)


def build_corpus(prompts: list[str], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` (prompt, response) examples, prompts drawn uniformly from `prompts`."""
    return [(rng.choice(prompts), sample_response(rng)) for _ in range(n)]
