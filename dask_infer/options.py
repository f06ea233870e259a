"""The words options take, their defaults and their checks: one source for config, CLI and code.

A leaf module (it imports nothing of the package but its errors), so ``config``, the
CLI, ``partition`` and ``workflows`` all read the same vocabularies without an import
cycle; the CLI builds its choices from these tuples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dask_infer.errors import DaskInferError

__all__ = [
    "ACTIVATIONS",
    "BALANCE_MODES",
    "DEFAULT_BALANCE",
    "DEVICES",
    "LAYOUTS",
    "LOGITS_DTYPES",
    "MISSING_CHUNKS",
    "OUTPUT_KINDS",
    "PLACEMENTS",
    "check_choice",
    "check_positive_int",
    "default_batch_size",
]

LAYOUTS = ("auto", "NHWC", "NCHW")
"""Axis order of the input images; ``auto`` tells by dimension names and shape."""

DEVICES = ("auto", "cpu", "cuda")
"""Where the model runs; ``auto`` is CUDA where the worker has it."""

BALANCE_MODES = ("time", "flops", "params", "memory")
"""Costs stages can be balanced by."""

DEFAULT_BALANCE = "time"
"""Balance of ``run``, ``partition`` and ``evaluate`` when none is given."""

PLACEMENTS = ("auto", "data", "pipeline", "hybrid")
"""Where stages run over the workers."""

OUTPUT_KINDS = ("logits", "probabilities", "top_k", "features", "mask")
"""Results a run can write; ``mask`` (the best class per pixel or per tile) needs ``tile``."""

ACTIVATIONS = ("softmax", "sigmoid", "none")
"""What turns the model's output into ``probabilities`` (and ``top_k``): softmax for one class
per image, sigmoid for multi-label, none for a raw output (regression, dense maps)."""

MISSING_CHUNKS = ("refuse", "fill")
"""What a run does with storage chunks absent from the input: refuse it, or read them as the fill value."""

LOGITS_DTYPES = ("float32", "float16")
"""How a tiled run stores ``logits``: float16 halves the output, with about 3 significant digits."""

_BATCH_CUDA = 256
_BATCH_CPU = 32


def default_batch_size(gpu: bool) -> int:
    """Images per forward pass when none is given: 256 on a GPU, 32 on a CPU."""
    return _BATCH_CUDA if gpu else _BATCH_CPU


def check_choice(
    name: str, value: Any, choices: Sequence[str], *, error: type[DaskInferError] = DaskInferError
) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``error`` naming it and them."""
    if value not in choices:
        raise error(f"{name}={value!r} is not one of {', '.join(choices)}")
    return str(value)


def check_positive_int(
    name: str, value: Any, *, optional: bool = False, error: type[DaskInferError] = DaskInferError
) -> Any:
    """Return ``value`` if it is a whole number >= 1 (or ``None`` when ``optional``), else raise.

    Booleans are refused although Python counts them as integers: ``stages=True`` is a
    mistake, not one stage.
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = " or None" if optional else ""
        raise error(f"{name}={value!r} must be a whole number >= 1{also}")
    return value
