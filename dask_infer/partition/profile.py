"""Per-node cost of a traced model on a sample batch: parameters, FLOPs, time, memory.

Profiling runs the traced copy node by node with a :class:`torch.fx.Interpreter`, so
the cost of every node that a cut may separate is known, and stage costs are sums of
node costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from dask_infer.partition.split import ModelGraph

__all__ = ["NodeCost", "profile_graph"]


@dataclass(frozen=True)
class NodeCost:
    """What one input-dependent node costs on the sample batch.

    Attributes
    ----------
    name
        The node's name in the traced graph.
    params
        Parameters first read by this node (shared ones are counted once, where first used).
    weight_bytes
        Bytes of those parameters and of the buffers first read by this node.
    flops
        Floating point operations counted by ``FlopCounterMode``.
    time_s
        Fastest of the timed runs of the node.
    activation_bytes
        Bytes of new tensor storage the node's output holds (0 for in-place ops and views).
    shape
        Shape of the output if it is a tensor, else ``None``.
    nbytes
        Bytes of the output tensor (views included), 0 if it is not a tensor.
    """

    name: str
    params: int
    weight_bytes: int
    flops: int
    time_s: float
    activation_bytes: int
    shape: tuple[int, ...] | None
    nbytes: int

    @property
    def memory_bytes(self) -> int:
        """Weights plus the new activations of this node."""
        return self.weight_bytes + self.activation_bytes


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _NodeRecorder(fx.Interpreter):
    """Interpreter that records FLOPs, output memory and wall time of every node.

    Each node is first run once for real under ``FlopCounterMode``; then it is timed
    ``repeats`` times back to back on clones of its arguments (so in-place ops cannot
    change the values later nodes see) and the fastest run is kept: contention on a
    shared machine only ever adds time, and timing a node in a tight loop keeps a burst
    of contention from inflating a whole pass.
    """

    def __init__(self, module: fx.GraphModule, repeats: int) -> None:
        super().__init__(module)
        self.repeats = repeats
        self.times: dict[fx.Node, float] = {}
        self.flops: dict[fx.Node, int] = {}
        self.outputs: dict[fx.Node, tuple[tuple[int, ...] | None, int, int]] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        call = getattr(self, n.op)
        if n.op in ("placeholder", "output"):
            return call(n.target, args, kwargs)
        counter = FlopCounterMode(display=False)
        with counter:
            out = call(n.target, args, kwargs)
        self.flops[n] = int(counter.get_total_flops())
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        fresh = {_storage_key(t): t.untyped_storage().nbytes() for t in _tensors(out)}
        new_bytes = sum(size for key, size in fresh.items() if key not in inputs)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        nbytes = out.nelement() * out.element_size() if isinstance(out, torch.Tensor) else 0
        self.outputs[n] = (shape, nbytes, new_bytes)
        best = math.inf
        for _ in range(self.repeats):
            cloned_args, cloned_kwargs = fx.node.map_aggregate((args, kwargs), _clone)
            start = time.perf_counter()
            call(n.target, cloned_args, cloned_kwargs)
            best = min(best, time.perf_counter() - start)
        self.times[n] = best
        return out


def _clone(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _weights(graph: ModelGraph) -> tuple[list[int], list[int]]:
    """Parameter count and weight bytes attributed to the first order node reading them."""
    module = graph.module
    seen: set[int] = set()
    params, nbytes = [], []
    for n in graph.order:
        tensors: list[tuple[torch.Tensor, bool]] = []
        if n.op == "call_module":
            sub = module.get_submodule(str(n.target))
            tensors += [(p, True) for p in sub.parameters()]
            tensors += [(b, False) for b in sub.buffers()]
        stack, visited = [a for a in n.all_input_nodes if a not in graph.position], set()
        while stack:
            a = stack.pop()
            if a in visited:
                continue
            visited.add(a)
            if a.op == "get_attr":
                value = _fetch_attr(module, str(a.target))
                if isinstance(value, torch.Tensor):
                    tensors.append((value, isinstance(value, torch.nn.Parameter)))
            elif a.op == "call_module":
                sub = module.get_submodule(str(a.target))
                tensors += [(p, True) for p in sub.parameters()]
                tensors += [(b, False) for b in sub.buffers()]
            stack.extend(a.all_input_nodes)
        count = size = 0
        for t, is_param in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            size += t.nelement() * t.element_size()
            count += t.nelement() if is_param else 0
        params.append(count)
        nbytes.append(size)
    return params, nbytes


def _fetch_attr(module: torch.nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def profile_graph(graph: ModelGraph, sample: torch.Tensor, *, repeats: int = 5) -> list[NodeCost]:
    """Cost of each node of ``graph.order`` on ``sample``.

    Parameters
    ----------
    graph
        A traced model (a copy: profiling runs its modules).
    sample
        The input batch; it is cloned, so in-place ops cannot change it.
    repeats
        Timed runs of each node; the fastest is kept.

    Returns
    -------
    list of NodeCost
        One per node of ``graph.order`` (the input placeholder costs nothing).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    recorder = _NodeRecorder(graph.module, repeats)
    with torch.no_grad():
        recorder.run(sample.clone())
    params, weight_bytes = _weights(graph)
    costs = []
    for i, n in enumerate(graph.order):
        shape, nbytes, new_bytes = recorder.outputs.get(n, (None, 0, 0))
        costs.append(
            NodeCost(
                name=n.name,
                params=params[i],
                weight_bytes=weight_bytes[i],
                flops=recorder.flops.get(n, 0),
                time_s=recorder.times.get(n, 0.0),
                activation_bytes=new_bytes,
                shape=shape,
                nbytes=nbytes,
            )
        )
    return costs
