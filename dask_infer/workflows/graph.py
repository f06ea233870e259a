"""The task graph: read -> infer -> write, one of each per chunk of images.

Reads and writes run in the workers' ordinary threads; infer tasks are annotated
to run in the runtime's one-thread compute executor, so decoding and writing
overlap the model. Priorities make a worker finish chunks it holds before it
starts reading new ones, which keeps memory bounded for datasets of any size.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
from dask.base import tokenize
from distributed import Client, Future

from dask_infer.io.images import ImageSource, read_chunk
from dask_infer.io.outputs import OutputTarget, write_chunk
from dask_infer.workflows.runtime import compute_executor, infer_chunk

__all__ = ["ChunkPlan", "plan_chunks", "submit_chunks"]

_READ, _INFER, _WRITE = 0, 1, 2


@dataclass(frozen=True)
class ChunkPlan:
    """Images per task and the (start, stop) of every task's chunk."""

    size: int
    bounds: tuple[tuple[int, int], ...]


def plan_chunks(n_images: int, storage_chunk: int, *, target: int, min_tasks: int = 1) -> ChunkPlan:
    """Split ``n_images`` into tasks of whole storage chunks, about ``target`` images each.

    A task never splits a storage chunk (which would decode it twice) unless a single
    storage chunk exceeds ``target`` several times over, and there are at least
    ``min_tasks`` tasks where the data allows, so every worker gets work.
    """
    per_task = max(1, round(target / storage_chunk)) * storage_chunk
    if storage_chunk > 4 * target:
        per_task = target
    while per_task > storage_chunk and -(-n_images // per_task) < min_tasks:
        per_task -= storage_chunk
    bounds = tuple((s, min(s + per_task, n_images)) for s in range(0, n_images, per_task))
    return ChunkPlan(size=per_task, bounds=bounds)


def submit_chunks(
    client: Client,
    source: ImageSource,
    target: OutputTarget,
    runtime: str,
    chunks: ChunkPlan,
    *,
    label: str,
) -> list[Future]:
    """Submit every chunk's read, infer and write tasks; return the write futures.

    Only the write futures are returned, so the scheduler releases each chunk's
    images and logits as soon as they are written.
    """
    token = tokenize(source, target, runtime, chunks)
    starts = [b[0] for b in chunks.bounds]
    stops = [b[1] for b in chunks.bounds]
    n = len(starts)
    reads = client.map(
        read_chunk,
        [source] * n,
        starts,
        stops,
        key=[f"read-{token}-{i}" for i in range(n)],
        priority=_READ,
    )
    with dask.annotate(executor=compute_executor(runtime)):
        logits = client.map(
            infer_chunk,
            [runtime] * n,
            reads,
            key=[f"{label}-infer-{token}-{i}" for i in range(n)],
            priority=_INFER,
        )
    return client.map(
        write_chunk,
        [target] * n,
        starts,
        stops,
        logits,
        key=[f"write-{token}-{i}" for i in range(n)],
        priority=_WRITE,
    )
