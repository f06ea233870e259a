"""Stages a worker process keeps after a run, for the next run of the same model to take.

Every run registers its own runtime on the workers, and building its stages (the model
read, cut, compressed, compiled and warmed up) takes seconds: 5.8 s for ResNet-50
bf16+compile on two cores with TorchInductor's cache warm, 8.5 s cold. A worker process
keeps the stages of the runtime a run released, for ``DASK_INFER_KEEP_LOADED_S`` seconds
(default 600; 0 keeps nothing), and a later runtime whose stages would be built the same
way takes them instead of building its own. One set is kept per process: a load that
does not match drops it before building, so memory holds one model, not two.

A weights file counts by its SHA-256, so a file rewritten in place is built again whatever
its size and mtime. The digest of the file a build read is computed in a background thread
while the build runs, and the file's current digest only when a kept entry matches all else:
a first load waits for no hashing (about 0.15 s for ResNet-50's 100 MB).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from dask_infer.models.weights import file_sha256
from dask_infer.partition.compress import CompressionPlan
from dask_infer.partition.compress.auto import is_auto
from dask_infer.workflows.stages import RuntimeSpec

__all__ = [
    "KEEP_ENV",
    "BuildKey",
    "Kept",
    "WeightsDigest",
    "build_key",
    "keep",
    "keep_seconds",
    "take",
]

KEEP_ENV = "DASK_INFER_KEEP_LOADED_S"
_DEFAULT_KEEP_S = 600.0


def keep_seconds() -> float:
    """Seconds a worker keeps a released runtime's stages: ``DASK_INFER_KEEP_LOADED_S``, default 600.

    Raises
    ------
    RuntimeError
        The variable holds anything but a number of seconds >= 0.
    """
    text = os.environ.get(KEEP_ENV, "").strip()
    if not text:
        return _DEFAULT_KEEP_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise RuntimeError(
            f"{KEEP_ENV}={text!r} is not a number of seconds >= 0; give 0 to free a run's model "
            "when it ends, or unset it to keep it 600 s for the next run"
        )
    return value


@dataclass(frozen=True)
class BuildKey:
    """What decides how a worker builds its stages: equal keys build equal stages."""

    spec: RuntimeSpec
    held: tuple[int, ...]
    batch_size: int
    device: str
    images: tuple[tuple[int, int, int], str] | None


def _digest_now(path: str | None) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None  # building reports the file


class WeightsDigest:
    """The SHA-256 of a weights file as a build read it, computed in a background thread.

    Parameters
    ----------
    path
        The weights file, or ``None`` for a model built without one.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._future: Future[str | None] = Future()
        if path is None:
            self._future.set_result(None)
        else:
            threading.Thread(target=self._run, name="dask-infer-weights-digest", daemon=True).start()

    def _run(self) -> None:
        self._future.set_result(_digest_now(self.path))

    def result(self) -> str | None:
        """The digest, waiting for the thread if it has not finished; ``None`` if unreadable."""
        return self._future.result()

    def matches_file(self) -> bool:
        """Whether the file at :attr:`path` still holds what the build read."""
        built = self.result()
        if self.path is None:
            return True
        return built is not None and built == _digest_now(self.path)


def _reads_input(spec: RuntimeSpec) -> bool:
    """Whether building reads the input's images (int8 calibration, ``auto``'s measurements)."""
    if spec.compress is None:
        return False
    return is_auto(spec.compress) or CompressionPlan.coerce(spec.compress).uses_calibration


def build_key(spec: RuntimeSpec, held: tuple[int, ...], batch_size: int, device: str) -> BuildKey:
    """The key of the stages ``held`` of ``spec`` built for ``device`` and ``batch_size``.

    What only shapes a run's outputs or placement (outputs, top-k, activation, which worker
    holds which stage) is left out; the input counts only where building reads it, and
    otherwise by the shape and dtype of its images (what folded preprocessing compiles for).
    """
    source = spec.calibration
    essential = replace(
        spec,
        outputs=(),
        top_k=0,
        activation="softmax",
        stage_map=(),
        device_resource=None,
        calibration=source if _reads_input(spec) else None,
    )
    images = (source.image_shape, source.dtype) if source is not None else None
    return BuildKey(essential, held, batch_size, device, images)


@dataclass(frozen=True)
class Kept:
    """Built stages, the preprocessing made with them, and the seconds their build took."""

    key: BuildKey
    weights: WeightsDigest
    stages: dict[int, nn.Module]
    preprocess: Any
    build_s: float


_lock = threading.Lock()
_kept: Kept | None = None


def _expire(entry: Kept) -> None:
    global _kept
    with _lock:
        if _kept is entry:
            _kept = None


def keep(entry: Kept) -> None:
    """Keep ``entry`` for :func:`keep_seconds`, in place of what was kept (nothing when that is 0)."""
    global _kept
    seconds = keep_seconds()
    with _lock:
        _kept = entry if seconds > 0 else None
    if seconds > 0:
        timer = threading.Timer(seconds, _expire, args=(entry,))
        timer.daemon = True
        timer.start()


def take(key: BuildKey) -> Kept | None:
    """The kept stages if they were built under ``key`` from the weights file as it is now; what
    was kept is dropped either way."""
    global _kept
    with _lock:
        entry, _kept = _kept, None
    if entry is None or entry.key != key:
        return None
    return entry if entry.weights.matches_file() else None
