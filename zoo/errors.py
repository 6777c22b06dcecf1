"""Exceptions that mean "the user's setup cannot do this", not "the code is wrong"."""

from __future__ import annotations


class UnavailableError(RuntimeError):
    """Something a command needs is missing here: a runtime (TensorRT), a device, a service.

    ``ltzoo`` reports it as one line (what is missing and how to get it), not a traceback.
    """


class ModelNotAvailableError(RuntimeError):
    """A model is neither in the local cache nor reachable on the Hub."""


class IntegrityError(ValueError):
    """A weights or config file does not match the checksum it was published with."""


__all__ = ["IntegrityError", "ModelNotAvailableError", "UnavailableError"]
