"""One process-wide lock between torch.fx tracing and running modules.

While ``torch.fx.Tracer.trace`` runs it replaces ``torch.nn.Module.__call__`` (and
``__getattr__``) for the whole process, so a module running in another thread at that
moment calls into the tracer and fails. A worker does both at once when it loads a new
runtime (re-cut stages) while the current one computes, so tracing takes the lock
exclusively and running modules share it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

__all__ = ["running_modules", "tracing"]


class _SharedExclusive:
    """A lock many holders share or one holds alone; waiting exclusive holders go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                self._waiting += 1
                try:
                    while self._owner is not None or self._shared:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._owner, self._depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()


_LOCK = _SharedExclusive()


def tracing() -> AbstractContextManager[None]:
    """Hold while torch.fx traces: no module runs in another thread meanwhile."""
    return _LOCK.exclusive()


def running_modules() -> AbstractContextManager[None]:
    """Hold while running modules: no torch.fx trace starts meanwhile (do not nest)."""
    return _LOCK.shared()
