"""Per-worker runtime: a WorkerPlugin that loads the model once and runs every chunk.

Tasks carry only the plugin's name; the model, device and compute thread live on
the worker for the whole run.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from distributed import WorkerPlugin, get_worker
from torch import nn

from dask_infer.io.images import ImageSource, read_chunk
from dask_infer.partition.models import build_model
from dask_infer.workflows.preprocess import Preprocess

__all__ = ["ModelRuntime", "RuntimeSpec", "compute_executor", "infer_chunk"]


def compute_executor(runtime: str) -> str:
    """Name of the runtime's one-thread worker executor that runs the model.

    Reads and writes use the worker's other threads, so they overlap the model.
    """
    return f"{runtime}-compute"


@dataclass(frozen=True)
class RuntimeSpec:
    """What a worker needs to rebuild the model: names and files, never a pickled model."""

    model: str
    weights: str | None
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    outputs: tuple[str, ...]
    top_k: int
    batch_size: int | None = None
    device: str = "auto"
    torch_threads: int | None = None
    cut_points: tuple[str, ...] = ()
    compress: str | None = None
    calibration: ImageSource | None = None
    calibration_images: int = 64


def _pick_device(wanted: str) -> torch.device:
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but this worker has no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())


class ModelRuntime(WorkerPlugin):
    """Loads the model on each worker once and runs chunks through it.

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
        self.chunks = 0
        self.images = 0
        self.busy_seconds = 0.0
        self._lock = threading.Lock()
        self._stages: list[nn.Module] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], state["name"])  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        """Build the model on this worker and give it a one-thread compute executor."""
        if self.spec.torch_threads is None and self.spec.device != "cuda":
            # Nannies pin OMP_NUM_THREADS=1; the model owns this worker's share of cores.
            torch.set_num_threads(max(1, worker.state.nthreads))
        self.load()
        name = compute_executor(self.name)
        worker.executors[name] = ThreadPoolExecutor(1, thread_name_prefix=name)

    def teardown(self, worker: Any) -> None:
        """Free the model and stop the compute thread."""
        executor = worker.executors.pop(compute_executor(self.name), None)
        if executor is not None:
            executor.shutdown(wait=False)
        self._stages = []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load(self) -> None:
        """Build model, stages and preprocessing on this process's device."""
        spec = self.spec
        if spec.torch_threads is not None:
            torch.set_num_threads(spec.torch_threads)
        self.device = _pick_device(spec.device)
        loaded = build_model(spec.model, weights=spec.weights, num_classes=spec.num_classes)
        module = loaded.module
        if spec.cut_points:
            from dask_infer.partition import split_model

            stages = list(split_model(module, list(spec.cut_points)))
        else:
            stages = [module]
        self._stages = [s.to(self.device).eval() for s in stages]
        self.preprocess = Preprocess(spec.input_size, spec.mean, spec.std).to(self.device)
        self.batch_size = spec.batch_size or (256 if self.device.type == "cuda" else 32)
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(self.device)
        if spec.compress is not None:
            self._compress()
        self.loads += 1

    def _compress(self) -> None:
        """Apply the compression plan; calibrate on the input's first images; warm up compiles."""
        from dask_infer.partition.compress import compress_stages
        from dask_infer.partition.recipe import CompressionPlan

        spec = self.spec
        plan = CompressionPlan.coerce(spec.compress)
        calibration = None
        if plan.needs_calibration and spec.calibration is not None:
            count = min(spec.calibration_images, spec.calibration.n_images)
            images = read_chunk(spec.calibration, 0, count, pooled=False)
            with torch.inference_mode():
                calibration = self.preprocess(torch.from_numpy(images).to(self.device))
        self._stages = [
            s.eval() for s in compress_stages(self._stages, plan, calibration=calibration, device=self.device)
        ]
        if any(plan.recipe_for(i).compile for i in range(len(self._stages))):
            size = spec.input_size
            warm = np.zeros((self.batch_size, size, size, 3), dtype=np.uint8)
            self.forward(warm)

    def _run_stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        for stage in self._stages:
            x = stage(x)
        return x

    @torch.inference_mode()
    def forward(self, images: np.ndarray) -> torch.Tensor:
        """Logits (float32, on CPU) of a chunk of (image, y, x, channel) images."""
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
        """Uploads batch k+1 on the copy stream while batch k computes; logits return pinned."""
        if not host.is_pinned():
            host = host.pin_memory()
        compute = torch.cuda.current_stream(self.device)
        copy = self._copy_stream

        def upload(i: int) -> tuple[torch.Tensor, torch.cuda.Event]:
            with torch.cuda.stream(copy):
                on_device = host[i : i + self.batch_size].to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copy)
            return on_device, ready

        out: torch.Tensor | None = None
        pending = upload(0)
        for i in range(0, len(host), self.batch_size):
            batch, ready = pending
            if i + self.batch_size < len(host):
                pending = upload(i + self.batch_size)
            compute.wait_event(ready)
            batch.record_stream(compute)
            logits = self._run_stages(batch).float()
            if out is None:
                out = torch.empty((len(host), logits.shape[1]), dtype=torch.float32, pin_memory=True)
            out[i : i + len(logits)].copy_(logits, non_blocking=True)
        compute.synchronize()
        assert out is not None
        return out

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every requested output for one chunk, as numpy arrays keyed by variable name."""
        start = time.perf_counter()
        logits = self.forward(images)
        result: dict[str, np.ndarray] = {}
        if "logits" in self.spec.outputs:
            result["logits"] = logits.numpy()
        if "probabilities" in self.spec.outputs or "top_k" in self.spec.outputs:
            probs = torch.softmax(logits, dim=1)
            if "probabilities" in self.spec.outputs:
                result["probabilities"] = probs.numpy()
            if "top_k" in self.spec.outputs:
                top = torch.topk(probs, k=self.spec.top_k, dim=1)
                result["top_k_class"] = top.indices.numpy().astype(np.int64)
                result["top_k_probability"] = top.values.numpy()
        with self._lock:
            self.chunks += 1
            self.images += images.shape[0]
            self.busy_seconds += time.perf_counter() - start
        return result

    def stats(self) -> dict[str, Any]:
        """Loads, chunks, images and busy seconds on this worker so far."""
        return {
            "loads": self.loads,
            "chunks": self.chunks,
            "images": self.images,
            "busy_s": self.busy_seconds,
        }


def infer_chunk(runtime: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Task body: run the worker's runtime named ``runtime`` on one chunk."""
    plugin = get_worker().plugins[runtime]
    return plugin.infer(images)  # type: ignore[attr-defined]
