"""The log-prob kernel: a model's output -> log-probs, top-K, log-probs at given ids, entropy, log Σp².

``families`` (where each model family keeps its norm, head, layers), ``lean`` (the chunked path from
the last hidden state). Import the submodules; this file imports nothing."""
