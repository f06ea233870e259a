"""Node costs this process has measured already, for a model profiled again with the same shapes.

A CPU pipeline is profiled on a stage worker before every run: about 6 CPU seconds for
ResNet-50 at batch 8 on one thread, on the worker that then computes stage 0. A later
run on the same worker, with the same traced model, batch, dtype, memory format and
threads, would measure the same costs again. They are kept here instead, with the
output shape and the cuts already checked to reproduce the model, so that run profiles
nothing. Time depends on shapes, dtypes and threads, not on weight values: the key is
made of those and of the traced code.

Only callers that ask (``partition_model(..., reuse_profile=True)``) read or fill the
memo; :func:`forget` empties it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from dask_infer.partition.profile import NodeCost
from dask_infer.partition.split import ModelGraph

__all__ = ["Measured", "forget", "hits", "profile_key", "recall", "remember", "thread_hits"]

_LIMIT = 8
"""Profiles kept at most (the least recently used goes first)."""

_lock = threading.Lock()
_kept: OrderedDict[Hashable, Measured] = OrderedDict()
_hits = 0
_counted = threading.local()


@dataclass(frozen=True)
class Measured:
    """What profiling a graph on one sample found.

    ``verified`` holds the cut positions whose stages were checked to reproduce the
    model's output bit for bit on that sample.
    """

    costs: tuple[NodeCost, ...]
    output_shape: tuple[int, ...]
    verified: frozenset[tuple[int, ...]] = frozenset()


def _tensor_key(name: str, t: torch.Tensor) -> Hashable:
    return (name, tuple(t.shape), str(t.dtype), str(t.device), t.is_contiguous())


def profile_key(graph: ModelGraph, sample: torch.Tensor, threads: int | None, repeats: int) -> Hashable:
    """What a graph's measured costs depend on: its code, tensor shapes and dtypes, sample and threads."""
    module = graph.module
    return (
        module.code,
        tuple(type(m).__qualname__ for m in module.modules()),
        tuple(_tensor_key(n, p) for n, p in module.named_parameters()),
        tuple(_tensor_key(n, b) for n, b in module.named_buffers()),
        tuple(sample.shape),
        str(sample.dtype),
        tuple(sample.stride()),
        threads if threads is not None else torch.get_num_threads(),
        repeats,
        graph.tail is not None,
    )


def recall(key: Hashable) -> Measured | None:
    """The profile kept under ``key``, or ``None``; a hit is counted (see :func:`hits` and
    :func:`thread_hits`)."""
    global _hits
    with _lock:
        measured = _kept.get(key)
        if measured is not None:
            _kept.move_to_end(key)
            _hits += 1
    if measured is not None:
        _counted.hits = thread_hits() + 1
    return measured


def remember(key: Hashable, measured: Measured) -> None:
    """Keep ``measured`` under ``key``, dropping the least recently used beyond the limit."""
    with _lock:
        _kept[key] = measured
        _kept.move_to_end(key)
        while len(_kept) > _LIMIT:
            _kept.popitem(last=False)


def hits() -> int:
    """How many profiles this process has reused so far."""
    return _hits


def thread_hits() -> int:
    """How many profiles the calling thread has reused so far: a task that profiles learns
    whether it reused one, whatever other tasks on the same worker do meanwhile."""
    return int(getattr(_counted, "hits", 0))


def forget() -> None:
    """Drop every kept profile: the next profile of each model measures again."""
    with _lock:
        _kept.clear()
