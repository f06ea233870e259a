"""``torch.compile`` of a module through a function of its own, so that every build compiles.

Dynamo keeps its compiled code per Python code object, and compiles one code object at
most ``torch._dynamo.config.recompile_limit`` times (8). Compiling a module compiles its
class's ``forward``, which every instance of the class shares; frozen weights are guarded
by identity, so each new instance compiles that same code object once more. A worker
process that builds a ninth compiled ResNet (a ninth run, or a re-cut) would hit the limit,
and that model would then run eagerly without a word beyond one torch warning. Here each
module is compiled through a small function whose code object is made for it alone: its
compiled code and guards belong to that function and go when it does.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["compile_module"]


def compile_module(module: nn.Module, *, mode: str | None = None) -> Callable[..., Any]:
    """``torch.compile`` of ``module``'s call, through a code object of its own.

    Parameters
    ----------
    module
        The module to compile; it is not modified.
    mode
        ``torch.compile``'s mode, or ``None``.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    own = types.FunctionType(
        call.__code__.replace(co_name=f"compiled_{type(module).__name__}"),
        call.__globals__,
        closure=call.__closure__,
    )
    return torch.compile(own, mode=mode)
