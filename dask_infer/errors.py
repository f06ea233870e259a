"""Exceptions raised for bad input: each message names the bad value and the fix."""

from __future__ import annotations

__all__ = ["DaskInferError", "InputError", "ModelError", "reason"]


class DaskInferError(ValueError):
    """Base class of every error dask-infer raises for bad input or configuration."""


class InputError(DaskInferError):
    """The input or output dataset is missing, malformed or unusable."""


class ModelError(DaskInferError):
    """The model name, weights file or model options are unusable."""


def reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when the message is empty.

    For messages that wrap a library's error: its first line says what went wrong; the
    rest (tracebacks, suggestions) stays on the chained exception.
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
