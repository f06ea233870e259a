"""Exceptions raised for bad input: each message names the bad value and the fix."""

from __future__ import annotations

__all__ = ["DaskInferError", "InputError", "ModelError"]


class DaskInferError(ValueError):
    """Base class of every error dask-infer raises for bad input or configuration."""


class InputError(DaskInferError):
    """The input or output dataset is missing, malformed or unusable."""


class ModelError(DaskInferError):
    """The model name, weights file or model options are unusable."""
