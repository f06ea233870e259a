"""Feeding chunks: the window a pipeline keeps in flight, and cancelling the rest on a failure."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from distributed import Client, Event, Future

from dask_infer.workflows.feed import feed, min_chunks, track, wave, window
from dask_infer.workflows.placement import Placement


def _placement(mode: str, stages: int, replicas: int = 1) -> Placement:
    groups = tuple(tuple((f"tcp://r{r}s{k}",) for k in range(stages)) for r in range(replicas))
    if mode == "data":
        groups = (tuple(("tcp://a", "tcp://b") for _ in range(stages)),)
    return Placement(mode, groups, "test")


@pytest.mark.parametrize(
    ("mode", "stages", "replicas", "expected_wave"),
    [("pipeline", 2, 1, 4), ("pipeline", 3, 1, 4), ("pipeline", 5, 1, 6), ("hybrid", 2, 3, 12)],
)
def test_window_follows_stages_and_replicas(
    mode: str, stages: int, replicas: int, expected_wave: int
) -> None:
    p = _placement(mode, stages, replicas)
    assert wave(p) == expected_wave
    assert window(p) == 2 * expected_wave
    assert min_chunks(p) == 4 * expected_wave


def test_data_parallel_needs_no_minimum() -> None:
    assert min_chunks(_placement("data", 1)) == 0


def _slow(i: int) -> int:
    time.sleep(0.02)
    return i


def test_a_pipeline_is_fed_through_its_window(client: Client) -> None:
    """However many chunks, no more than the window is ever submitted and not yet written."""
    placement = _placement("pipeline", 2)
    lock = threading.Lock()
    submitted: list[int] = []
    done: list[int] = []
    peak = 0

    def submit(indices: list[int]) -> list[Future]:
        nonlocal peak
        with lock:
            submitted.extend(indices)
            peak = max(peak, len(submitted) - len(done))
        return client.map(_slow, indices, pure=False)

    calls: list[tuple[int, int]] = []
    feed(
        placement,
        range(40),
        submit,
        progress=False,
        on_done=done.append,
        after_write=lambda written, pending: calls.append((written, pending)),
    )
    assert sorted(done) == list(range(40)) and sorted(submitted) == list(range(40))
    assert peak == window(placement) == 8
    # after_write sees every written chunk, and the chunks not yet submitted shrink to 0.
    assert [w for w, _ in calls] == list(range(1, 41))
    assert calls[0][1] == 40 - 8 and calls[-1][1] == 0


def test_data_parallel_submits_everything_at_once(client: Client) -> None:
    batches: list[list[int]] = []

    def submit(indices: list[int]) -> list[Future]:
        batches.append(indices)
        return client.map(_slow, indices, pure=False)

    done: list[int] = []
    feed(_placement("data", 1), [0, 2, 3, 5, 6, 7, 8, 9], submit, progress=False, on_done=done.append)
    assert batches == [[0, 2, 3, 5, 6, 7, 8, 9]] and sorted(done) == [0, 2, 3, 5, 6, 7, 8, 9]


def _wait_for(name: str) -> int:
    Event(name).wait()
    return 0


def _fail() -> int:
    raise ValueError("chunk 3 is corrupt")


@pytest.fixture
def blocker(client: Client) -> Iterator[str]:
    """An event tasks wait on; set afterwards, so cancelled tasks free their worker threads."""
    name = f"blocker-{uuid.uuid4().hex[:8]}"
    yield name
    Event(name, client=client).set()


def test_a_failed_chunk_cancels_the_rest(client: Client, blocker: str) -> None:
    stuck = [client.submit(_wait_for, blocker, pure=False) for _ in range(3)]
    done: list[int] = []
    with pytest.raises(ValueError, match="chunk 3 is corrupt"):
        track([*stuck, client.submit(_fail, pure=False)], progress=False, on_done=done.append)
    assert done == []
    assert [f.status for f in stuck] == ["cancelled"] * 3


def test_an_interrupt_cancels_the_rest(client: Client, blocker: str) -> None:
    """Ctrl-C (or a Jupyter stop) while waiting: nothing is left running on the cluster."""
    stuck = [client.submit(_wait_for, blocker, pure=False) for _ in range(3)]

    def interrupt(_result: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        track([*stuck, client.submit(_slow, 1, pure=False)], progress=False, on_done=interrupt)
    assert [f.status for f in stuck] == ["cancelled"] * 3
