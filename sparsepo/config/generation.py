"""The `generation` config section: how the policy draws SPO's samples (torch-free, so that
`sparsepo.config` stays light). The sampling itself is in `sparsepo.generation`."""

from __future__ import annotations

from dataclasses import dataclass

PARAM_PATHS = ("gathered", "synced")


@dataclass(kw_only=True)
class GenerationConfig:
    """How the policy draws the samples SPO's KL is estimated on (used by methods whose table row has
    needs_policy_samples)."""

    every_steps: int = 1
    """Draw a fresh round of samples every N optimiser steps; the steps between reuse the last round's
    samples and reference scores (the policy side is re-scored with gradient every step)."""
    samples_per_prompt: int = 1
    """Samples drawn from each prompt of the step's micro-batch."""
    max_new_tokens: int = 32
    """A sample ends at eos or after this many tokens."""
    temperature: float = 1.0
    """Sampling temperature. The KL estimators assume y ~ πθ, i.e. 1.0; other values bias them."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 (the default, unbiased for the KL) samples the full distribution."""
    staleness: int = 0
    """s: samples drawn at step t regularise step t + s (the first s steps reuse step 0's round), so a
    live reference group can score them while the policy trains; 0 (synchronous) equals inline
    exactly. Live mode needs s < reference.window. Logged as train/staleness."""
    prompts_path: str | None = None
    """Prompts to sample from instead of the step's own preference prompts: a .jsonl/.json/.parquet/.csv
    file with a `prompt` column (text or chat messages), validated like the preference data; each
    micro-batch takes train.micro_batch_size consecutive prompts, cycling through the file."""
    params: str = "gathered"
    """ZeRO-3: "gathered" gathers the whole policy once per round and decodes locally (fast; needs the
    full model in memory on every rank); "synced" keeps the shards and gathers layer by layer at every
    decoding step (transformers' synced_gpus: every rank steps until all are done)."""


def check_generation(g: GenerationConfig) -> str | None:
    """What is wrong with `g`, in words that name the key, or None."""
    if g.every_steps < 1 or g.samples_per_prompt < 1 or g.max_new_tokens < 1:
        return "generation.every_steps, samples_per_prompt and max_new_tokens must be >= 1"
    if g.staleness < 0:
        return f"generation.staleness={g.staleness} must be >= 0"
    if not g.temperature > 0:
        return f"generation.temperature={g.temperature} must be > 0"
    if not 0 < g.top_p <= 1:
        return f"generation.top_p={g.top_p} must be in (0, 1]"
    if g.params not in PARAM_PATHS:
        return f"generation.params={g.params!r}: choose one of {', '.join(PARAM_PATHS)}"
    return None
