"""Compiling a CPU stage with inductor freezing, and without it where a build refuses it.

Freezing makes inductor treat the stage's weights as constants: it folds them into the
graph and prepacks them once in the layout oneDNN's convolution and matmul kernels
want (bf16, fp16 and int8 included), instead of reordering them on every call. It only
applies to inference (grad disabled), which is how workers and ``evaluate`` call stages.
Some builds cannot freeze some graphs (e.g. int8 graphs without a fake kernel for
``onednn.qconv_prepack``); there the stage is compiled without freezing, with one
warning line saying why.

What it gains depends on the CPU and the precision: int8 runs several times faster frozen
(its weights are otherwise packed on every call); float stages on CPUs with AMX roughly
double; on an AVX-512 CPU without AMX (AMD EPYC) bf16 ran about as fast frozen as not.
Compiled CPU stages are frozen by default. ``DASK_INFER_INDUCTOR_FREEZING=0`` in the
environment of the processes that compile (the workers: set it before they start) turns
it off; ``1`` or unset leaves it on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn

from dask_infer.errors import reason
from dask_infer.partition.compress.frames import compile_module
from dask_infer.partition.compress.recipe import CompressionError, CompressionRecipe

__all__ = ["FREEZING_ENV", "FrozenCompile", "compile_frozen", "freezes"]

FREEZING_ENV = "DASK_INFER_INDUCTOR_FREEZING"

logger = logging.getLogger(__name__)


class FrozenCompile:
    """``torch.compile(module)`` whose compilations run with inductor freezing (through
    :func:`~dask_infer.partition.compress.frames.compile_module`).

    Calls until the first success compile with freezing; if that first call raises, the
    stage is compiled again without freezing (one warning) and stays so. After a first
    success, errors propagate unchanged.

    Parameters
    ----------
    module
        The module to compile (eager, in eval mode); it is not modified.
    mode
        ``torch.compile``'s mode, or ``None``.
    """

    def __init__(self, module: nn.Module, *, mode: str | None = None) -> None:
        self.module = module
        self.mode = mode
        self._compiled: Any = compile_module(module, mode=mode)
        self._state = "untried"
        self.fallback_reason: str | None = None
        """Why freezing was given up, or ``None`` while it is in use (or untried)."""

    @property
    def frozen(self) -> bool | None:
        """Whether the stage runs frozen; ``None`` before its first call."""
        return None if self._state == "untried" else self._state == "frozen"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._state == "plain":
            return self._compiled(*args, **kwargs)
        try:
            with inductor_config.patch(freezing=True):
                out = self._compiled(*args, **kwargs)
        except Exception as exc:
            if self._state == "frozen":
                raise
            self.fallback_reason = _cause(exc)
            logger.warning(
                "compiling %s without inductor freezing, which this torch %s refuses for it: %s",
                type(self.module).__name__,
                torch.__version__,
                self.fallback_reason,
            )
            self._compiled = compile_module(self.module, mode=self.mode)
            self._state = "plain"
            return self._compiled(*args, **kwargs)
        self._state = "frozen"
        return out


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception ``exc`` wraps (inductor wraps the real one)."""
    inner = exc.__cause__ or getattr(exc, "inner_exception", None)
    while isinstance(inner, BaseException):
        exc = inner
        inner = exc.__cause__ or getattr(exc, "inner_exception", None)
    return f"{type(exc).__name__}: {reason(exc)}"


def compile_frozen(module: nn.Module, *, mode: str | None = None) -> FrozenCompile:
    """Compile ``module`` for the CPU with inductor freezing (see :class:`FrozenCompile`)."""
    return FrozenCompile(module, mode=mode)


def freezes(recipe: CompressionRecipe) -> bool:
    """Whether a compiled CPU stage of ``recipe`` is compiled with freezing: yes, unless
    :data:`FREEZING_ENV` is ``0``.

    Raises
    ------
    CompressionError
        When :data:`FREEZING_ENV` holds anything but ``1``, ``0`` or nothing.
    """
    forced = os.environ.get(FREEZING_ENV, "").strip()
    if forced not in ("", "0", "1"):
        raise CompressionError(
            f"{FREEZING_ENV}={forced!r} ({recipe}) is not 1 or 0; set 0 to compile CPU stages "
            "without inductor freezing, 1 or nothing to freeze them"
        )
    return forced != "0"
