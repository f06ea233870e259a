"""Telling the user when a worker is paused for memory, while the run waits for it.

Dask pauses a worker whose process memory passes ``distributed.worker.memory.pause``
(80% of its ``memory_limit`` by default): it runs no new tasks until memory drops. A
run that only waits would look hung, so a worker paused for more than one look is
reported in one line, once per pause, with its memory and what to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import dask
from dask.utils import format_bytes
from distributed import Client

from dask_infer.workflows.cluster import scheduler_workers

__all__ = ["PauseReporter", "describe_pause"]


def describe_pause(address: str, record: Mapping[str, Any]) -> str:
    """One line on a paused worker: its memory, its limit, and what to do."""
    limit = int(record.get("memory_limit") or 0)
    used = int((record.get("metrics") or {}).get("memory") or 0)
    share = f" ({used / limit:.0%})" if limit else ""
    threshold = dask.config.get("distributed.worker.memory.pause")
    return (
        f"worker {address} is paused: its process uses {format_bytes(used)} of its "
        f"{format_bytes(limit)} memory_limit{share}, over dask's pause threshold ({threshold:.0%}); "
        "the run waits for it to free memory. If it stays paused, use a smaller --chunk-size or "
        "--batch-size, or workers with more memory"
    )


class PauseReporter:
    """Looks at the workers' status every ``every`` seconds and reports each pause once.

    A worker is reported when it is seen paused twice in a row (a pause of a fraction
    of a second is dask doing its job, not news), and again only after it ran.

    Parameters
    ----------
    client
        The run's client.
    say
        Where the line goes.
    every
        Seconds between looks.
    """

    def __init__(self, client: Client, say: Callable[[str], None], every: float = 2.0) -> None:
        self.client, self.say, self.every = client, say, every
        self._last = 0.0
        self._seen: set[str] = set()
        self._told: set[str] = set()
        self.reported: list[str] = []

    def check(self) -> None:
        """Look, if ``every`` seconds have passed since the last look."""
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        workers = scheduler_workers(self.client)
        paused = {a for a, r in workers.items() if r.get("status") == "paused"}
        for address in sorted(paused & self._seen - self._told):
            self.say(describe_pause(address, workers[address]))
            self.reported.append(address)
        self._told &= paused
        self._told |= paused & self._seen
        self._seen = paused
