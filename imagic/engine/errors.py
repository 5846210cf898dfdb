"""The engine's errors that callers map to a message (kept apart from the modules that import torch)."""


class ModelError(ValueError):
    """A model that cannot be loaded, with the reason a person can act on."""
