"""The launch package's one error type (its own module, so every launch module can raise it)."""


class TopologyError(ValueError):
    """A launch or a topology that cannot work; the message carries the arithmetic and the fix."""
