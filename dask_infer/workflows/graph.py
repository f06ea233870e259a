"""The task graph: read -> infer -> write per chunk, or read -> stage 0 .. S-1 -> write.

Reads and writes run in the workers' ordinary threads; model tasks are annotated
to run in the runtime's one-thread compute executor, so decoding and writing
overlap the model. Priorities make a worker finish chunks it holds before it
starts reading new ones, which keeps memory bounded for datasets of any size.

Task keys are ``{group}-{token}-{chunk}``: ``-`` only between those three parts, and
``_`` between the words of a group's name (``read``, ``infer_resnet18``,
``s0_resnet18``, ``write``, ``recut_resnet18``, ``profile_resnet18``). Dask's
dashboard names a task group by the key's words up to the first one with a digit
(:func:`dask.utils.key_split`), so a group name with digits must be one word; it
starts with what tells the groups apart, which the dashboard's progress bars show
within their first characters.

Pipelined placements pin each stage's tasks to its worker group with worker
restrictions (``workers=``, no other workers allowed). Restrictions need nothing
from how the workers were started, so they work on any existing cluster, and work
stealing honours them: idle workers of the same group still steal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dask
from dask.base import tokenize
from dask.utils import format_bytes
from distributed import Client, Future

from dask_infer.errors import DaskInferError
from dask_infer.io.images import ImageSource, read_chunk
from dask_infer.io.outputs import OutputTarget, write_chunk
from dask_infer.workflows.placement import Placement
from dask_infer.workflows.runtime import compute_executor, infer_chunk, run_stage

__all__ = [
    "READ",
    "WRITE",
    "ChunkMemoryError",
    "Chunks",
    "chunk_target",
    "group_name",
    "infer_prefix",
    "over_pipeline",
    "split_chunks",
    "stage_prefix",
    "submit_chunks",
    "submit_pipeline",
]

READ = "read"
"""Task-group name of the chunks' reads."""
WRITE = "write"
"""Task-group name of the chunks' writes."""

_READ, _INFER, _WRITE = 0, 1, 2


def over_pipeline(stages: int) -> int:
    """A priority above every task :func:`submit_pipeline` gives a chunk of ``stages`` stages.

    A worker starts its ready tasks by priority, so a task of lower priority waits while
    any chunk's read, stage or write is ready there; on a stage-0 worker fed a window of
    chunks, that can be until the last chunk's stage 0.
    """
    return _READ + 3 + stages


@dataclass(frozen=True)
class Chunks:
    """How the images are cut into tasks: images per task and each task's (start, stop)."""

    size: int
    bounds: tuple[tuple[int, int], ...]


_RATE_GPU = 5e13
_RATE_CPU = 5e10
_TASK_SECONDS_GPU = 0.05
_TASK_SECONDS_CPU = 2.0
_MAX_CHUNK_BYTES = 256 << 20
_ROOM_SHARE = 0.6
"""Share of a worker's memory_limit a run plans to use: dask pauses a worker at 80%."""
_CHUNKS_HELD = 8
"""Chunks a worker may hold at once: being read, waiting, computing, being written, pooled."""


class ChunkMemoryError(DaskInferError):
    """The workers' memory cannot hold the model and even the smallest chunk."""


def chunk_target(
    flops_per_image: float,
    bytes_per_image: int,
    *,
    gpu: bool,
    memory_limit: int | None = None,
    model_bytes: int = 0,
    worker_bytes: int = 0,
) -> int:
    """Images per task, from the model's cost, the images' size and the workers' memory.

    A task should compute for tens of milliseconds on a GPU and a couple of seconds on a
    CPU worker (rates assumed: 50 TFLOP/s and 50 GFLOP/s), far above Dask's 0.2-1 ms
    per-task overhead, while its decoded images stay under 256 MiB. With a
    ``memory_limit``, the worker plans to use 60% of it (dask pauses a worker at 80%):
    what its process already uses and the model (weights and a batch's activations) come
    first, and the rest is shared by the few chunks a worker holds at once.

    Parameters
    ----------
    flops_per_image
        FLOPs of one forward pass of one image.
    bytes_per_image
        Decoded bytes of one image.
    gpu
        Whether the model runs on a GPU.
    memory_limit
        The smallest ``memory_limit`` of the workers, in bytes; ``None`` or 0 when unknown.
    model_bytes
        Host memory the model takes on a worker: weights and a batch's activations (0 on
        a GPU, whose memory placement checks).
    worker_bytes
        Memory the worker's process uses before the run (Python, Dask, torch).

    Raises
    ------
    ChunkMemoryError
        When the room left cannot hold a few single images: one line with the figures.
    """
    rate, seconds = (_RATE_GPU, _TASK_SECONDS_GPU) if gpu else (_RATE_CPU, _TASK_SECONDS_CPU)
    images = seconds * rate / max(flops_per_image, 1.0)
    budget = _MAX_CHUNK_BYTES
    if memory_limit:
        room = int(memory_limit * _ROOM_SHARE) - worker_bytes - model_bytes
        if room < _CHUNKS_HELD * bytes_per_image:
            raise ChunkMemoryError(
                f"workers with memory_limit={format_bytes(memory_limit)} have no room for images: the worker "
                f"process uses {format_bytes(worker_bytes)}, the model {format_bytes(model_bytes)} (weights "
                f"and a batch's activations), and {_CHUNKS_HELD} images of {format_bytes(bytes_per_image)} "
                f"must fit in {_ROOM_SHARE:.0%} of the limit; use workers with more memory (--memory-limit), "
                "a smaller --batch-size, or a smaller model"
            )
        budget = min(budget, room // _CHUNKS_HELD)
    cap = max(1, budget // max(bytes_per_image, 1))
    return int(min(max(images, 16), 4096, cap))


def split_chunks(
    n_images: int, storage_chunk: int, *, target: int, min_tasks: int = 1, exact: bool = False
) -> Chunks:
    """Split ``n_images`` into tasks of whole storage chunks, about ``target`` images each.

    A task never splits a storage chunk (which would decode it twice) unless a single
    storage chunk exceeds ``target`` several times over, and there are at least
    ``min_tasks`` tasks where the data allows, so every worker gets work. With
    ``exact``, tasks hold exactly ``target`` images (a size the user asked for).
    """
    if exact:
        per_task = target
    else:
        per_task = max(1, round(target / storage_chunk)) * storage_chunk
        if storage_chunk > 4 * target:
            per_task = target
        while per_task > storage_chunk and -(-n_images // per_task) < min_tasks:
            per_task -= storage_chunk
    bounds = tuple((s, min(s + per_task, n_images)) for s in range(0, n_images, per_task))
    return Chunks(size=per_task, bounds=bounds)


def submit_chunks(
    client: Client,
    source: ImageSource,
    target: OutputTarget,
    runtime: str,
    chunks: Chunks,
    *,
    label: str,
    indices: Sequence[int] | None = None,
    workers: Sequence[str] | None = None,
) -> list[Future]:
    """Submit the read, infer and write tasks of the chunks ``indices`` (all by default).

    Only the write futures are returned, so the scheduler releases each chunk's
    images and logits as soon as they are written. ``workers`` restricts the infer
    tasks (to the workers holding a device); ``None`` lets every worker run them.
    """
    token = tokenize(source, target, runtime, chunks)
    order = list(range(len(chunks.bounds))) if indices is None else list(indices)
    starts = [chunks.bounds[i][0] for i in order]
    stops = [chunks.bounds[i][1] for i in order]
    n = len(order)
    reads = client.map(
        read_chunk,
        [source] * n,
        starts,
        stops,
        key=[f"{READ}-{token}-{i}" for i in order],
        priority=_READ,
    )
    with dask.annotate(executor=compute_executor(runtime)):
        logits = client.map(
            infer_chunk,
            [runtime] * n,
            reads,
            key=[f"{infer_prefix(label)}-{token}-{i}" for i in order],
            priority=_INFER,
            workers=list(workers) if workers else None,
        )
    return client.map(
        write_chunk,
        [target] * n,
        starts,
        stops,
        logits,
        key=[f"{WRITE}-{token}-{i}" for i in order],
        priority=_WRITE,
    )


def group_name(*words: str) -> str:
    """One task-group name from ``words``: joined by ``_``, every other character made ``_``.

    A key's ``-`` separates its group, token and chunk, so a model's label such as
    ``my-net`` (a ``.pt2`` file's stem) becomes ``my_net``.
    """
    return "_".join(re.sub(r"[^0-9A-Za-z_]", "_", w) for w in words if w)


def infer_prefix(label: str) -> str:
    """Task-group name of the whole model's tasks: ``infer_resnet18``."""
    return group_name("infer", label)


def stage_prefix(label: str, stage: int) -> str:
    """Task-group name of stage ``stage``'s tasks: ``s2_resnet50``.

    The stage comes first, so the dashboard, which shows a group's first dozen
    characters, tells the stages of a model apart.
    """
    return group_name(f"s{stage}", label)


def submit_pipeline(
    client: Client,
    source: ImageSource,
    target: OutputTarget,
    runtime: str,
    chunks: Chunks,
    placement: Placement,
    *,
    label: str,
    indices: Sequence[int] | None = None,
) -> list[Future]:
    """Submit read, one task per stage, and write for the chunks ``indices``; return the write futures.

    Chunk ``i`` goes to replica ``i % replicas``. Its read runs on that replica's
    stage-0 workers, so images never travel, and stage ``k`` only on the replica's
    stage-``k`` workers. Later stages outrank earlier ones, so a worker passes chunks
    on before it starts new ones: many chunks are in flight and the pipeline fills
    once per run. Reads outrank the stages: a read is short, and done as soon as its
    chunk is submitted it has the chunk waiting when stage 0 is free, instead of
    adding a read and a scheduler round trip between every two stage-0 tasks (the
    caller bounds how many chunks are submitted ahead).
    """
    token = tokenize(source, target, runtime, chunks, placement)
    order = list(range(len(chunks.bounds))) if indices is None else list(indices)
    stages = placement.num_stages
    writes: dict[int, Future] = {}
    for replica in range(placement.replicas):
        mine = [i for i in order if i % placement.replicas == replica]
        if not mine:
            continue
        starts = [chunks.bounds[i][0] for i in mine]
        stops = [chunks.bounds[i][1] for i in mine]
        n = len(mine)
        data: list[Future[Any]] = client.map(
            read_chunk,
            [source] * n,
            starts,
            stops,
            key=[f"{READ}-{token}-{i}" for i in mine],
            priority=_READ + 1 + stages,
            workers=list(placement.stage_workers(0, replica)),
            allow_other_workers=False,
        )
        for k in range(stages):
            # Most stages go to their group; a shared stage to one of its two workers a chunk.
            routes: dict[tuple[str, ...], list[int]] = {}
            for j, i in enumerate(mine):
                routes.setdefault(placement.route(k, i, replica), []).append(j)
            out: list[Any] = [None] * n
            with dask.annotate(executor=compute_executor(runtime)):
                for workers, at in routes.items():
                    futures = client.map(
                        run_stage,
                        [runtime] * len(at),
                        [k] * len(at),
                        [data[j] for j in at],
                        key=[f"{stage_prefix(label, k)}-{token}-{mine[j]}" for j in at],
                        priority=_READ + 1 + k,
                        workers=list(workers),
                        allow_other_workers=False,
                    )
                    for j, future in zip(at, futures, strict=True):
                        out[j] = future
            data = out
        done = client.map(
            write_chunk,
            [target] * n,
            starts,
            stops,
            data,
            key=[f"{WRITE}-{token}-{i}" for i in mine],
            priority=_READ + 2 + stages,
        )
        writes.update(zip(mine, done, strict=True))
    return [writes[i] for i in order]
