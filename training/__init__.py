"""ltzoo training package."""

from . import methods as methods  # registers every training method (see training.registry)
