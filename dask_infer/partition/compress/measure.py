"""What a module costs: FLOPs and peak activation memory on a real input, serialised size, wall time."""

from __future__ import annotations

import io
import statistics
import time
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "forward_cost", "serialized_size", "time_call"]


def count_flops(module: Callable[[torch.Tensor], Any], sample: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``sample``, counted on the aten ops actually run.

    Counts matrix multiplies and convolutions (two FLOPs per multiply-add), as
    :class:`torch.utils.flop_counter.FlopCounterMode` does. An int8 model run eagerly
    dequantizes and runs fp32 convolutions, so its count equals the fp32 count.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(sample)
    return int(counter.get_total_flops())


class _PeakMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storage created during a forward that are alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or key == 0:
                continue
            self._seen.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def forward_cost(module: Callable[[torch.Tensor], Any], sample: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one forward pass on ``sample``, and the most bytes of activations alive at once.

    The peak counts the tensor storage the forward creates (not the weights or
    ``sample``), freed as the forward drops it: under ``torch.no_grad`` that is what a
    batch of ``sample``'s size needs beside the model.
    """
    peak = _PeakMemory()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, peak:
        module(sample)
    return int(counter.get_total_flops()), peak.peak


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a module holds: its state_dict and tensor constants of fx graphs."""
    tensors = dict(module.state_dict())
    seen = {t.data_ptr() for t in tensors.values() if t.device.type != "meta"}
    for name, sub in module.named_modules():
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op != "get_attr":
                continue
            try:
                value = (
                    sub.get_submodule(str(node.target).rpartition(".")[0]) if "." in str(node.target) else sub
                )
                value = getattr(value, str(node.target).rpartition(".")[2])
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                tensors[f"{name}.{node.target}" if name else str(node.target)] = value
    return tensors


def serialized_size(module: nn.Module) -> tuple[int, int]:
    """Bytes of the module's tensors as ``torch.save`` writes them, raw and zlib-compressed.

    The compressed figure is the one unstructured pruning reduces (zeros compress);
    for int8 models the int8 weight constants are what is counted.
    """
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in _tensors(module).items()}, buffer)
    raw = buffer.getvalue()
    return len(raw), len(zlib.compress(raw, 1))


def time_call(fn: Callable[[], Any], *, repeats: int = 5, device: torch.device | None = None) -> float:
    """Median wall time of ``fn()`` in seconds, synchronising CUDA around each call."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
