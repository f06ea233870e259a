"""The tile feed keeps a bounded number of tasks in flight and waits through slow ones."""

from __future__ import annotations

import time

from distributed import Client

from dask_infer.tiles.store import TileTask
from dask_infer.workflows.tiled import _feed


def test_feed_waits_through_tasks_slower_than_its_check_interval(client: Client) -> None:
    flying: list[int] = []
    done: list[int] = []
    checks: list[float] = []

    def submit(tasks: list[TileTask]) -> list:
        flying.append(len(tasks))
        return [client.submit(time.sleep, 1.5, pure=False) for _ in tasks]

    todo = [TileTask(0, r, 0) for r in range(3)]
    _feed(submit, todo, 2, done.append, lambda: checks.append(time.perf_counter()))
    assert sum(done) == 3 and flying[0] == 2 and sum(flying) == 3
    assert len(checks) >= 2
