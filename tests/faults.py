"""Doing faults to a running run: an action run once it has written some chunks."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dask.typing import Key
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_infer.errors import InputError
from dask_infer.io.outputs import done_chunks, open_output

__all__ = ["WriteCounter", "after_chunks_written", "chunks_written"]


def chunks_written(output: Path) -> int:
    """Chunks the completion manifest of ``output`` records as written (0 before it exists)."""
    try:
        target, _ = open_output(str(output))
        return len(done_chunks(target))
    except InputError:
        return 0


@contextlib.contextmanager
def after_chunks_written(
    output: Path, chunks: int, action: Callable[[], object]
) -> Iterator[threading.Event]:
    """Run ``action`` from a thread once ``output`` records ``chunks`` chunks written; the event says it ran.

    The manifest is what counts: a run drops its finished chunks' futures at once, so the
    scheduler forgets their tasks.
    """
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if chunks_written(output) >= chunks:
                action()
                done.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    yield done
    watcher.join(timeout=5)


class WriteCounter(SchedulerPlugin):
    """Counts the chunk writes a scheduler saw finish: a chunk index seen twice was written twice.

    A write cancelled while it ran (a pipeline re-placing its stages) still lands, but the
    scheduler has forgotten it by then, so it is not counted.
    """

    def __init__(self) -> None:
        self.writes: list[str] = []

    def transition(self, key: Key, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "memory" and str(key).startswith("write-"):
            self.writes.append(str(key).rsplit("-", 1)[-1])

    def rewritten(self) -> list[str]:
        """Chunk indices written more than once."""
        return sorted({i for i in self.writes if self.writes.count(i) > 1})
