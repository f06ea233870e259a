"""Per-node cost of a traced model on a sample batch: parameters, FLOPs, time, memory.

Profiling runs the traced copy node by node with a :class:`torch.fx.Interpreter`, so
the cost of every node that a cut may separate is known, and stage costs are sums of
node costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from dask_infer.errors import ModelError
from dask_infer.models.tracing import running_modules
from dask_infer.options import check_positive_int
from dask_infer.partition.split import ModelGraph

__all__ = ["NodeCost", "profile_graph", "torch_threads"]


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
        Fastest of the timed runs of the node: CPU time of the calling thread when torch
        runs on one thread (immune to preemption by other processes), else wall time.
    activation_bytes
        Bytes of new tensor storage the node's output holds (0 for in-place ops and views).
    shape
        Shape of the output if it is a tensor, else ``None``.
    nbytes
        Bytes of the output tensor (views included), 0 if it is not a tensor.
    pointwise
        The node keeps its input's shape and counts no FLOPs (batch norm in eval, an
        activation, a residual add): compiled code fuses it into the operation before it.
    """

    name: str
    params: int
    weight_bytes: int
    flops: int
    time_s: float
    activation_bytes: int
    shape: tuple[int, ...] | None
    nbytes: int
    pointwise: bool = False

    @property
    def memory_bytes(self) -> int:
        """Weights plus the new activations of this node."""
        return self.weight_bytes + self.activation_bytes


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (``None``: leave as is)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _describe(value: Any) -> Hashable:
    """A hashable stand-in for a node's argument: tensors by shape, dtype and strides."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.stride())
    if isinstance(value, list | tuple):
        return tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _describe(v)) for k, v in value.items()))
    return repr(value)


def _signature(module: torch.nn.Module, n: fx.Node, args: Any, kwargs: Any) -> Hashable:
    """What a node computes: the same operation on inputs of the same shapes and layout.

    Nodes with equal signatures (the repeated blocks of a ResNet stage, say) do the
    same work, so they share one time estimate.
    """
    if n.op == "call_module":
        op = repr(module.get_submodule(str(n.target)))
    elif n.op == "call_function":
        op = f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', repr(n.target))}"
    else:
        op = str(n.target)
    return (n.op, op, _describe(args), _describe(kwargs))


class _NodeRecorder(fx.Interpreter):
    """Interpreter that records, per node, wall time or (when ``count``) FLOPs and output memory."""

    def __init__(self, module: fx.GraphModule, count: bool) -> None:
        super().__init__(module)
        self.count = count
        # One intra-op thread runs every op on this thread, so its CPU time is the op's
        # time without the time it spent preempted; with more threads, wall time.
        self.clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        self.times: dict[fx.Node, float] = {}
        self.flops: dict[fx.Node, int] = {}
        self.outputs: dict[fx.Node, tuple[tuple[int, ...] | None, int, int]] = {}
        self.signatures: dict[fx.Node, Hashable] = {}
        self.pointwise: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        call = getattr(self, n.op)
        if n.op in ("placeholder", "output"):
            return call(n.target, args, kwargs)
        if not self.count:
            start = self.clock()
            out = call(n.target, args, kwargs)
            self.times[n] = self.clock() - start
            return out
        counter = FlopCounterMode(display=False)
        with counter:
            out = call(n.target, args, kwargs)
        self.flops[n] = int(counter.get_total_flops())
        self.signatures[n] = _signature(self.module, n, args, kwargs)
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        fresh = {_storage_key(t): t.untyped_storage().nbytes() for t in _tensors(out)}
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        nbytes = out.nelement() * out.element_size() if isinstance(out, torch.Tensor) else 0
        self.outputs[n] = (shape, nbytes, sum(size for key, size in fresh.items() if key not in inputs))
        first = next(_tensors((args, kwargs)), None)
        if self.flops[n] == 0 and shape is not None and first is not None and tuple(first.shape) == shape:
            self.pointwise.add(n)
        return out


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
        The input batch; it is cloned for every run, so in-place ops cannot change it.
    repeats
        Timed runs of the whole graph after one run that counts FLOPs and memory (and
        warms up). Each node keeps its fastest time: contention on a shared machine
        only ever adds time, and spreading the runs out keeps one burst of it from
        inflating a node in every run.

    Returns
    -------
    list of NodeCost
        One per node of ``graph.order`` (the input placeholder costs nothing).
    """
    check_positive_int("repeats", repeats, error=ModelError)
    with torch.no_grad(), running_modules():
        counting = _NodeRecorder(graph.module, count=True)
        counting.run(sample.clone())
        fastest = dict.fromkeys(graph.order, math.inf)
        for _ in range(repeats):
            timing = _NodeRecorder(graph.module, count=False)
            timing.run(sample.clone())
            for n in graph.order:
                fastest[n] = min(fastest[n], timing.times.get(n, math.inf))
        # Nodes doing the same work share the fastest time any of them took: more
        # samples of the same cost, so one noisy node cannot tip the cuts.
        timed = [n for n in graph.order if n in counting.signatures]
        by_signature: dict[Hashable, float] = {}
        for n in timed:
            signature = counting.signatures[n]
            by_signature[signature] = min(by_signature.get(signature, math.inf), fastest[n])
        for n in timed:
            fastest[n] = by_signature[counting.signatures[n]]
    params, weight_bytes = _weights(graph)
    costs = []
    for i, n in enumerate(graph.order):
        shape, nbytes, new_bytes = counting.outputs.get(n, (None, 0, 0))
        costs.append(
            NodeCost(
                name=n.name,
                params=params[i],
                weight_bytes=weight_bytes[i],
                flops=counting.flops.get(n, 0),
                time_s=fastest[n] if math.isfinite(fastest[n]) else 0.0,
                activation_bytes=new_bytes,
                shape=shape,
                nbytes=nbytes,
                pointwise=n in counting.pointwise,
            )
        )
    return costs
