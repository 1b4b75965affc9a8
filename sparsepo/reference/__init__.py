"""The reference side: per-batch reference outputs, the scorer, and the on-disk reference cache."""
