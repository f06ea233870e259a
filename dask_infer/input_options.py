"""The words and parsers of the input and preprocessing options: dims, bands, scale, mean, std.

A leaf module like :mod:`dask_infer.options` (it imports nothing of the package but its
errors), so ``RunConfig`` can check these options without importing torch or Zarr. Each
parser takes what Python, YAML and the command line give (a sequence, a mapping, or text
such as ``"3,2,1"`` and ``"image=time,channel=band"``) and returns one canonical value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dask_infer.errors import DaskInferError

__all__ = [
    "DIM_ROLES",
    "INTERPOLATIONS",
    "describe_callable",
    "parse_bands",
    "parse_dims",
    "parse_floats",
    "parse_scale",
]

DIM_ROLES = ("image", "y", "x", "channel")
"""What each dim of an image array is; ``dims`` maps these roles to the array's own dim names."""

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
"""How images are resized to the model's input (antialiased, except ``nearest``)."""


def _items(name: str, value: Any, example: str) -> list[Any]:
    """``value`` as a list: text is split at commas, a sequence is taken as it is."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if not value.strip() or any(not p for p in parts):
            raise DaskInferError(f"{name}={value!r} is not a comma-separated list; give e.g. {example}")
        return parts
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray) and len(value):
        return list(value)
    raise DaskInferError(f"{name}={value!r} must be a list or comma-separated text, e.g. {example}")


def parse_floats(name: str, value: Any, *, positive: bool = False) -> tuple[float, ...] | None:
    """``mean``/``std``: one finite number per model input channel (``None`` stays ``None``)."""
    if value is None:
        return None
    example = "'0.485,0.456,0.406'"
    out = []
    for item in _items(name, value, example):
        try:
            number = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (positive and number <= 0):
            need = "positive " if positive else ""
            raise DaskInferError(
                f"{name}={value!r}: {item!r} is not a finite {need}number; "
                f"give one per channel, e.g. {example}"
            )
        out.append(number)
    return tuple(out)


def parse_bands(value: Any) -> tuple[int, ...] | None:
    """``bands``: 1-based band numbers, in the order the model takes them (``None`` stays ``None``).

    Whether each number lies within the input's bands is checked against the input.
    """
    if value is None:
        return None
    out = []
    for item in _items("bands", value, "'3,2,1' (1-based)"):
        try:
            number = int(item) if not isinstance(item, bool | float) else 0
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            raise DaskInferError(
                f"bands={value!r}: {item!r} is not a band number; bands are numbered from 1, e.g. '3,2,1'"
            )
        out.append(number)
    return tuple(out)


def parse_scale(value: Any) -> float | None:
    """``scale``: integer pixels are divided by it to lie in [0, 1] (``None`` stays ``None``)."""
    if value is None:
        return None
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    if not math.isfinite(number) or number <= 0:
        raise DaskInferError(
            f"scale={value!r} must be a positive number that pixels are divided by, e.g. 10000 for "
            "reflectance stored as uint16"
        )
    return float(number)


def parse_dims(value: Any) -> dict[str, str] | None:
    """``dims``: role -> the input array's dim name, from a mapping or ``"image=time,channel=band"``.

    Roles are ``image``, ``y``, ``x`` and ``channel``; whether the named dims exist is
    checked against the input.
    """
    if value is None:
        return None
    example = "'image=time,channel=band'"
    if isinstance(value, str):
        pairs = []
        for part in _items("dims", value, example):
            role, sep, dim = (s.strip() for s in part.partition("="))
            if not sep or not role or not dim:
                raise DaskInferError(f"dims={value!r}: {part!r} is not role=dim; give e.g. {example}")
            pairs.append((role, dim))
    elif isinstance(value, Mapping) and value:
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        raise DaskInferError(f"dims={value!r} must map roles to the input's dim names, e.g. {example}")
    out: dict[str, str] = {}
    for role, dim in pairs:
        if role not in DIM_ROLES:
            raise DaskInferError(f"dims={value!r}: {role!r} is not a role; roles are {', '.join(DIM_ROLES)}")
        if not isinstance(dim, str) or not dim:
            raise DaskInferError(f"dims={value!r}: the dim for {role!r} must be a dim name (text)")
        if role in out:
            raise DaskInferError(f"dims={value!r} names role {role!r} twice")
        out[role] = dim
    if len(set(out.values())) < len(out):
        raise DaskInferError(f"dims={value!r} gives one dim two roles; each dim has one role")
    return out


def describe_callable(func: Callable[..., Any]) -> str:
    """A stable description of ``func`` for messages and output attrs (no memory addresses)."""
    text = repr(func)
    if " at 0x" in text or text.startswith("<"):
        module = getattr(func, "__module__", None) or type(func).__module__
        name = getattr(func, "__qualname__", None) or type(func).__qualname__
        return f"{module}.{name}"
    return " ".join(text.split())
