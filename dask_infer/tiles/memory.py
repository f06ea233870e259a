"""Whether one batch of tiles can fit a worker's memory at all, checked before any work.

The estimate is a lower bound of the worker's host memory: on the CPU, the batch's float32
model input and float32 map of scores (the model's own activations come on top) and the
model's weights; on a GPU, which holds those itself, the pixels as the task passes them
and the scores kept. With ``--scale-factor``, the input region a tile is resampled from
comes on top. A batch that needs more than the smallest worker memory limit would only
fail later, so the run is refused first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes

from dask_infer.errors import InputError

__all__ = ["TileBatch", "check_tile_memory", "worker_memory_limit"]

_FLOAT32 = 4


@dataclass(frozen=True)
class TileBatch:
    """What one forward pass of a tiled run holds.

    Attributes
    ----------
    tile, halo
        The run's tile and halo (as given or measured).
    side
        Side of the square the model gets: ``tile + 2 * halo``, at most the image.
    batch
        Tiles per forward pass (1 for a dense map: a task is one tile).
    channels, classes
        The model's input channels and output classes.
    dense
        Whether the model returns a map (scores per pixel) rather than scores per tile.
    weight_bytes
        The model's parameters and buffers.
    read_bytes
        The input region one batch is resampled from (0 without ``--scale-factor``).
    on_gpu
        Whether the model runs on a GPU, so host memory holds only what the task passes
        and gets back.
    pixel_bytes
        Bytes per value of the pixels a task passes (1 for uint8; 4 once resampled).
    """

    tile: int
    halo: int
    side: int
    batch: int
    channels: int
    classes: int
    dense: bool
    weight_bytes: int = 0
    read_bytes: int = 0
    on_gpu: bool = False
    pixel_bytes: int = 1

    @property
    def bytes(self) -> int:
        """Host bytes the batch needs at least."""
        pixels = self.batch * self.side * self.side
        if not self.on_gpu:
            scores = pixels * self.classes if self.dense else self.batch * self.classes
            return (pixels * self.channels + scores) * _FLOAT32 + self.weight_bytes + self.read_bytes
        kept = self.batch * self.tile * self.tile * self.classes if self.dense else self.batch * self.classes
        return pixels * self.channels * self.pixel_bytes + kept * _FLOAT32 + self.read_bytes


def worker_memory_limit(workers: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The smallest memory limit among the scheduler's ``workers`` info; ``None`` when none is set."""
    limits: Iterable[int] = (int(w.get("memory_limit") or 0) for w in workers.values())
    set_limits = [n for n in limits if n > 0]
    return min(set_limits) if set_limits else None


def check_tile_memory(batch: TileBatch, limit: int | None) -> None:
    """Refuse a run whose one batch of tiles needs more than ``limit`` bytes.

    Raises
    ------
    InputError
        One line naming tile, halo and batch, what they need, the limit and the fix.
    """
    if limit is None or batch.bytes <= limit:
        return
    if batch.dense:  # a task is one tile, so only its size helps
        smaller = "a smaller --tile" + (" or --halo" if batch.halo else "")
    else:
        smaller = "a smaller --tile or --batch-size"
    raise InputError(
        f"tile={batch.tile}, halo={batch.halo}, batch={batch.batch}: one batch of tiles "
        f"({batch.side}x{batch.side} pixels x {batch.channels} channel(s) in, {batch.classes} class scores "
        f"out) needs at least {format_bytes(batch.bytes)}, more than the workers' memory limit "
        f"{format_bytes(limit)}; give {smaller}, or workers with more memory (--memory-limit)"
    )
