"""Per-worker runtime: a WorkerPlugin that builds its stages once and runs every chunk on its device.

Tasks carry only the plugin's name; the model, device and compute thread live on
the worker for the whole run. Under a pipeline placement each worker holds only the
stages placed on it and runs one stage per task, passing activations on. Building the
stages is :mod:`dask_infer.workflows.stages`; this module runs them.

Images with NaN or infinite pixels still run (their logits come out NaN or meaningless),
but their ``valid`` flag is false and their top-k classes are -1 (probabilities NaN), so no
class is claimed for them. A pipeline counts them at stage 0 and passes the flags on with
the activations.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Concatenate, ParamSpec, TypeAlias, TypeVar

import numpy as np
import torch
from dask.sizeof import sizeof
from distributed import WorkerPlugin, get_worker
from torch import nn

from dask_infer.io.images import non_finite_pixels
from dask_infer.models.features import take_features
from dask_infer.models.heads import activate
from dask_infer.models.tracing import running_modules
from dask_infer.options import default_batch_size
from dask_infer.workflows.activation import Activation
from dask_infer.workflows.cores import usable_cores
from dask_infer.workflows.fold import fold_preprocessing
from dask_infer.workflows.kept import (
    BuildKey,
    Kept,
    WeightsDigest,
    build_key,
    keep,
    keep_seconds,
    take,
)
from dask_infer.workflows.monitor import GpuSampler
from dask_infer.workflows.slots import leave_worker_slot
from dask_infer.workflows.stages import RuntimeSpec, build_stages
from dask_infer.workflows.streams import ThreadStreams, compute_threads

__all__ = [
    "SWITCH_INTERVAL_ENV",
    "ModelRuntime",
    "StageOutput",
    "StageStats",
    "compute_executor",
    "gpu_switch_interval",
    "infer_chunk",
    "infer_chunk_here",
    "run_stage",
]


@dataclass(frozen=True)
class StageOutput:
    """What a pipeline stage other than the last passes on: its activation and each image's ``valid`` flag.

    ``features`` are the feature layer's values once the stage holding that layer has run.
    """

    activation: Activation
    valid: np.ndarray
    features: np.ndarray | None = None
    input_hw: tuple[int, int] | None = None
    """Height and width of the model's input (after preprocessing), for a last stage that resizes
    its map to them (:mod:`dask_infer.partition.tail`)."""


@sizeof.register(StageOutput)
def _sizeof_stage_output(out: StageOutput) -> int:
    features = out.features.nbytes if out.features is not None else 0
    return int(sizeof(out.activation.data)) + out.valid.nbytes + features


StageInput: TypeAlias = np.ndarray | StageOutput
"""A stage task's input: images for stage 0, the previous stage's output after."""


def finite_images(images: np.ndarray) -> np.ndarray:
    """Per image: whether every pixel is finite (always, for integer images)."""
    return non_finite_pixels(images) == 0


def compute_executor(runtime: str) -> str:
    """Name of the runtime's worker executor that runs the model (one thread, or one per
    CUDA stream: :mod:`dask_infer.workflows.streams`).

    Reads and writes use the worker's other threads, so they overlap the model.
    """
    return f"{runtime}-compute"


@dataclass
class StageStats:
    """What one stage did on one worker.

    Attributes
    ----------
    chunks
        Chunks whose images the stage counted.
    images
        Images it ran.
    busy_s
        Wall seconds it ran.
    work_s
        Seconds of work: CPU time on a CPU (which other processes do not inflate), wall
        time on a GPU.
    sent_bytes
        Bytes of the activations it returned for the next stage (0 for the last stage).
    """

    chunks: int = 0
    images: int = 0
    busy_s: float = 0.0
    work_s: float = 0.0
    sent_bytes: int = 0

    def add(self, *, images: int = 0, busy_s: float = 0.0, work_s: float = 0.0, sent_bytes: int = 0) -> None:
        """Count one more stretch of work; a stretch with images counts as a chunk."""
        self.chunks += 1 if images else 0
        self.images += images
        self.busy_s += busy_s
        self.work_s += work_s
        self.sent_bytes += sent_bytes


_EXECUTOR_GRACE_S = 30.0
"""Seconds a removed runtime's compute executor stays, for the tasks of a cancelled run still arriving."""

SWITCH_INTERVAL_ENV = "DASK_INFER_SWITCH_INTERVAL"
_GPU_SWITCH_INTERVAL = 0.0005


def gpu_switch_interval() -> float:
    """Seconds a thread of a GPU worker may hold the GIL while the model's thread waits for it.

    Every torch call releases the GIL and takes it back; with the worker's reading and
    writing threads wanting it too, Python's default 5 ms would leave the GPU idle for
    milliseconds at each call. ``DASK_INFER_SWITCH_INTERVAL`` in the workers' environment
    overrides the default of 0.5 ms.
    """
    text = os.environ.get(SWITCH_INTERVAL_ENV)
    if not text:
        return _GPU_SWITCH_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RuntimeError(
            f"{SWITCH_INTERVAL_ENV}={text!r} is not a positive number of seconds; "
            "unset it or give e.g. 0.0005"
        )
    return value


def _pick_device(wanted: str) -> torch.device:
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but this worker has no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


_R = TypeVar("_R")
_P = ParamSpec("_P")


def _in_use(
    method: Callable[Concatenate[ModelRuntime, _P], _R],
) -> Callable[Concatenate[ModelRuntime, _P], _R]:
    """Count the calls of ``method`` running, so teardown keeps no stages a call still runs."""

    @functools.wraps(method)
    def counted(self: ModelRuntime, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            self._in_flight += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            with self._lock:
                self._in_flight -= 1

    return counted


class ModelRuntime(WorkerPlugin):
    """Builds the model's stages on each worker once and runs chunks through them.

    Parameters
    ----------
    spec
        Model, weights file, preprocessing and output options.
    name
        Plugin name, unique per run; tasks look the runtime up by it.
    """

    def __init__(self, spec: RuntimeSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self.loads = 0
        self.load_s = 0.0
        self.chunks = 0
        self.images = 0
        self.busy_seconds = 0.0
        self.address: str | None = None
        self._stage_stats: dict[int, StageStats] = {}
        self._lock = threading.Lock()
        self._stages: dict[int, nn.Module] = {}
        self._gpu = GpuSampler()
        self._switch_interval: float | None = None
        self._key: BuildKey | None = None
        self._weights: WeightsDigest | None = None
        self._in_flight = 0
        self._build_s = 0.0
        self.reused = False
        """Whether this worker took stages a released runtime kept (:mod:`dask_infer.workflows.kept`)."""

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["name"])  # type: ignore[misc]

    async def setup(self, worker: Any) -> None:
        """Build this worker's stages, then give it a compute executor (one thread, or one per
        CUDA stream: :mod:`dask_infer.workflows.streams`).

        Loading runs in a thread, so the worker keeps running the tasks it has (those of
        a runtime being replaced by a re-cut) and answering the scheduler meanwhile.
        """
        if self.spec.torch_threads is None and self.spec.device != "cuda":
            # Nannies pin OMP_NUM_THREADS=1; the model owns this worker's share of cores, and
            # never more threads than the cores this process may run on.
            torch.set_num_threads(max(1, min(worker.state.nthreads, usable_cores())))
        resources = dict(worker.state.total_resources)
        await asyncio.get_running_loop().run_in_executor(None, self.load, worker.address, resources)
        name = compute_executor(self.name)
        worker.executors[name] = ThreadPoolExecutor(compute_threads(self.spec), thread_name_prefix=name)
        if self.device.type == "cuda":
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(gpu_switch_interval())

    def teardown(self, worker: Any) -> None:
        """Free the model now; stop the compute thread a little later.

        Tasks of a cancelled run may still be on their way into the worker's compute
        executor: finding it gone, the worker would log each one as an error with its
        traceback, where finding it there they fail quietly, being cancelled.
        """
        name = compute_executor(self.name)
        executor = worker.executors.get(name)
        if executor is not None:

            def retire() -> None:
                if worker.executors.get(name) is executor:
                    worker.executors.pop(name, None)
                executor.shutdown(wait=False)

            worker.loop.call_later(_EXECUTOR_GRACE_S, retire)
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        with self._lock:
            idle = self._in_flight == 0  # a cancelled run's chunk may still run on the stages
        # Kept only where no other runtime holds stages here (a re-cut's, a lazy result's):
        # the worker would hold two models until the next load or the time runs out.
        alone = not any(
            isinstance(p, ModelRuntime) and p is not self and p._stages for p in worker.plugins.values()
        )
        if self._stages and self._key is not None and self._weights is not None and idle and alone:
            keep(Kept(self._key, self._weights, self._stages, self.preprocess, self._build_s))
        self._stages = {}
        self._gpu.stop()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load(self, address: str | None = None, resources: dict[str, float] | None = None) -> None:
        """Build the stages placed on the worker at ``address`` with ``resources`` (see ``stages_for``)."""
        spec = self.spec
        self.address = address
        started = time.perf_counter()
        if spec.torch_threads is not None:
            torch.set_num_threads(spec.torch_threads)
        self.device = _pick_device(spec.device)
        eager = spec.preprocessing.build().to(self.device)
        self.preprocess: Callable[[torch.Tensor], torch.Tensor] = eager
        self.batch_size = spec.batch_size or default_batch_size(self.device.type == "cuda")
        held = spec.stages_for(address, resources)
        if not held:
            return
        self._key = build_key(spec, held, self.batch_size, str(self.device))
        kept = take(self._key)
        if kept is not None:
            self._stages, self.preprocess, self._build_s = kept.stages, kept.preprocess, kept.build_s
            self._weights = kept.weights
            self.reused = True
        else:
            self._weights = WeightsDigest(spec.weights) if keep_seconds() > 0 else None
            self._stages = build_stages(spec, held, eager, self.device, self.batch_size, address=address)
            self.preprocess = fold_preprocessing(spec, self._stages, eager, self.device, self.batch_size)
        self._stage_stats.clear()
        if self.device.type == "cuda":
            self._streams = ThreadStreams(self.device, shared=compute_threads(spec) == 1)
            self._gpu.start()
        self.loads += 1
        # What building takes, also when kept stages were taken: a re-cut weighs it.
        if not self.reused:
            self._build_s = time.perf_counter() - started
        self.load_s = self._build_s

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        # Per-stage times need no device sync on the CPU; on a GPU only the chunk total is kept.
        timed = self.device.type == "cpu"
        start, work = time.perf_counter(), self._work_clock()
        x = self.preprocess(x)
        size = (x.shape[-2], x.shape[-1])
        for k in range(self.spec.num_stages):
            x = self._stages[k](x)
            if timed:
                now, now_work = time.perf_counter(), self._work_clock()
                self._add_stage_time(k, busy_s=now - start, work_s=now_work - work)
                start, work = now, now_work
        return self._resized(x, size)

    def _resized(self, out: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """The last stage's ``out`` resized to the model's input ``size`` where the model's split
        left that resize out of its stages; else ``out``."""
        tail = self.spec.resize_tail
        if tail is None or not self.spec.cut_points:
            return out
        if size is None:
            raise RuntimeError(
                "the last stage resizes its map to the model's input size, which stage 0 did not pass on"
            )
        return tail.apply(out, size)

    def _work_clock(self) -> float:
        """Seconds of work done, unaffected by other processes sharing the cores.

        On a GPU that is wall time (the device is this worker's own). On the CPU it is
        CPU time: of this thread when torch computes in it alone, else of the process.
        Wall time there counts waiting for a core, which would make whichever stage
        shares its cores with busier neighbours look slow.
        """
        if self.device.type != "cpu":
            return time.perf_counter()
        return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()

    def _add_stage_time(self, stage: int, **figures: Any) -> None:
        with self._lock:
            self._stage_stats.setdefault(stage, StageStats()).add(**figures)

    @_in_use
    @torch.inference_mode()
    def forward(self, images: np.ndarray) -> torch.Tensor:
        """Logits (float32) of a chunk of (image, y, x, channel) images, on the runtime's device."""
        if not images.flags.writeable:
            images = images.copy()
        host = torch.from_numpy(images)
        if self.device.type == "cuda":
            return self._forward_cuda(host)
        out = [
            self._run_stages(host[i : i + self.batch_size]).float()
            for i in range(0, len(host), self.batch_size)
        ]
        return torch.cat(out)

    def _forward_cuda(self, host: torch.Tensor) -> torch.Tensor:
        """Logits on the GPU; batch k+1 uploads on the copy stream while batch k computes.

        A chunk in pinned memory (a pooled read) uploads straight from it. Any other goes
        through a pinned staging copy one batch at a time, made after batch k is queued,
        so the copy overlaps its compute (pinning the whole chunk first would not). The
        staging buffers come from torch's pinned-memory cache, which reuses one only once
        its upload is done.
        """
        pinned = host.is_pinned()
        compute = torch.cuda.current_stream(self.device)
        copy = self._streams.copy()
        size = self.batch_size

        def upload(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            part = host[i : i + size]
            if not pinned:
                part = torch.empty(part.shape, dtype=part.dtype, pin_memory=True).copy_(part)
            with torch.cuda.stream(copy):
                on_device = part.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copy)
            return on_device, ready

        parts = []
        pending = upload(0)
        for i in range(0, len(host), size):
            batch, ready = pending
            compute.wait_event(ready)
            batch.record_stream(compute)
            parts.append(self._run_stages(batch).float())
            if i + size < len(host):
                pending = upload(i + size)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @_in_use
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every requested output for one chunk, as numpy arrays keyed by variable name."""
        start = time.perf_counter()
        if len(self._stages) != self.spec.num_stages:
            raise RuntimeError(
                f"worker {self.address} holds stages {sorted(self._stages)} of {self.spec.num_stages}; "
                "a whole-model task needs all of them (data-parallel placement)"
            )
        valid = finite_images(images)
        self._features()
        with self._compute_stream():
            logits = self.forward(images)
            result = self._outputs(logits, valid, self._features(images.shape[0]))
        if self.device.type == "cpu":
            for k in range(self.spec.num_stages):
                self._add_stage_time(k, images=images.shape[0])
        with self._lock:
            self.chunks += 1
            self.images += images.shape[0]
            self.busy_seconds += time.perf_counter() - start
        return result

    @_in_use
    @torch.inference_mode()
    def run_stage(self, stage: int, data: StageInput) -> StageOutput | dict[str, np.ndarray]:
        """Run stage ``stage`` on one chunk: images for stage 0, the previous stage's output after.

        Batches are the same as a whole-model task's, so every placement computes the
        same numbers. The last stage returns the outputs dict; the others a
        :class:`StageOutput` for the next stage's task.
        """
        module = self._stages.get(stage)
        if module is None:
            raise RuntimeError(
                f"stage {stage} is not loaded on worker {self.address}, which holds stages "
                f"{sorted(self._stages)}; its task was placed on the wrong worker"
            )
        start, work = time.perf_counter(), self._work_clock()
        features, size = None, None
        if isinstance(data, StageOutput):
            host, valid, features, size = (
                data.activation.to_tensor(),
                data.valid,
                data.features,
                data.input_hw,
            )
        else:
            host = torch.from_numpy(data if data.flags.writeable else data.copy())
            valid = finite_images(data)
        self._features()
        last = stage == self.spec.num_stages - 1
        parts = []
        with self._compute_stream():
            for i in range(0, len(host), self.batch_size):
                x = host[i : i + self.batch_size].to(self.device)
                if stage == 0:
                    x = self.preprocess(x)
                    size = (x.shape[-2], x.shape[-1])
                y = module(x)
                parts.append(self._resized(y, size).float() if last else y)
            out = torch.cat(parts)
            here = self._features(len(host))
            features = here if here is not None else features
            result: StageOutput | dict[str, np.ndarray] = (
                self._outputs(out, valid, features)
                if last
                else StageOutput(Activation.from_tensor(out), valid, features, size)
            )
        seconds = time.perf_counter() - start
        sent = 0 if isinstance(result, dict) else result.activation.data.nbytes
        self._add_stage_time(
            stage, images=len(host), busy_s=seconds, work_s=self._work_clock() - work, sent_bytes=sent
        )
        with self._lock:
            self.chunks += 1 if last else 0
            self.images += len(host) if last else 0
            self.busy_seconds += seconds
        return result

    def _compute_stream(self) -> contextlib.AbstractContextManager[None]:
        """The calling thread's CUDA compute stream (the current one with one compute thread)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return self._streams.compute()

    def _features(self, images: int | None = None) -> np.ndarray | None:
        """The feature layer's values for the ``images`` just run here (``None``: not held here).

        Without ``images`` it only drops what a warm-up or an earlier failed chunk left.
        """
        if self.spec.feature_layer is None:
            return None
        features = take_features(self._stages.values(), images)
        return None if features is None else features.numpy()

    def _outputs(
        self, logits: torch.Tensor, valid: np.ndarray, features: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The requested outputs and ``valid``; invalid images get top-k classes -1 and probabilities NaN."""
        result: dict[str, np.ndarray] = {"valid": valid}
        if "logits" in self.spec.outputs:
            result["logits"] = _numpy(logits)
        if "features" in self.spec.outputs:
            if features is None:
                raise RuntimeError(
                    f"feature layer {self.spec.feature_layer!r} did not run in any stage of this chunk"
                )
            result["features"] = features
        if "probabilities" in self.spec.outputs or "top_k" in self.spec.outputs:
            # On the model's device: a GPU ranks a chunk's classes in microseconds.
            probs = activate(logits, self.spec.activation)
            if "probabilities" in self.spec.outputs:
                result["probabilities"] = _numpy(probs)
            if "top_k" in self.spec.outputs:
                top = torch.topk(probs, k=self.spec.top_k, dim=1)
                classes = _numpy(top.indices).astype(np.int64)
                scores = _numpy(top.values).copy()
                classes[~valid] = -1
                scores[~valid] = np.nan
                result["top_k_class"] = classes
                result["top_k_probability"] = scores
        return result

    def stats(self) -> dict[str, Any]:
        """Loads, chunks, images, busy seconds, per-stage figures and GPU samples on this worker."""
        with self._lock:
            stages = {k: asdict(s) for k, s in sorted(self._stage_stats.items())}
        return {
            "loads": self.loads,
            "load_s": self.load_s,
            "reused": self.reused,
            "held_stages": sorted(self._stages),
            "chunks": self.chunks,
            "images": self.images,
            "busy_s": self.busy_seconds,
            "stages": stages,
            "gpu": self._gpu.stats(),
            "auto_compression": [
                choice.to_dict()
                for _, stage in sorted(self._stages.items())
                if (choice := getattr(stage, "auto_choice", None)) is not None
            ],
        }


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a numpy array on the host (a copy from a GPU, a view of a CPU tensor)."""
    return tensor.cpu().numpy()


def infer_chunk(runtime: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Task body, on the runtime's compute executor: run the worker's runtime named ``runtime``
    on one chunk, the worker's thread given back meanwhile (:func:`leave_worker_slot`)."""
    leave_worker_slot()
    return infer_chunk_here(runtime, images)


def infer_chunk_here(runtime: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`infer_chunk` for a caller that is itself a task holding its worker thread."""
    plugin = get_worker().plugins[runtime]
    # Another runtime may be loading (tracing its stages) on this worker meanwhile.
    with running_modules():
        return plugin.infer(images)  # type: ignore[attr-defined]


def run_stage(runtime: str, stage: int, data: StageInput) -> StageOutput | dict[str, np.ndarray]:
    """Task body, on the runtime's compute executor: run stage ``stage`` of the worker's runtime
    named ``runtime`` on one chunk, the worker's thread given back meanwhile."""
    leave_worker_slot()
    plugin = get_worker().plugins[runtime]
    with running_modules():
        return plugin.run_stage(stage, data)  # type: ignore[attr-defined]
