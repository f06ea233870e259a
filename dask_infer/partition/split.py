"""Trace a model with torch.fx, find where it can be cut, and build stage modules.

A cut after node ``n`` is valid when ``n``'s output is the only value computed from
the input that is still needed afterwards, so each stage takes one tensor and returns
one tensor. Residual, dense and attention blocks keep their skip values alive inside
the block and therefore stay whole. Values that do not depend on the input (weights
read with ``get_attr``, tables computed from them) are not counted: each stage that
needs them recomputes or references them itself.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import fx, nn

from dask_infer.errors import ModelError, reason
from dask_infer.models.tracing import tracing
from dask_infer.partition.tail import ResizeTail, strip_resize_tail

__all__ = ["ModelGraph", "candidate_cuts", "resize_tail", "run_stages", "split_model", "trace_model"]


def _torchvision_op_modules() -> tuple[type[nn.Module], ...]:
    return tuple(
        obj
        for _, obj in inspect.getmembers(torchvision.ops)
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
    )


class _Tracer(fx.Tracer):
    """Tracer that keeps torchvision.ops modules whole and names nodes by module path.

    torchvision.ops modules (stochastic depth, squeeze-excitation, ...) are leaves, as in
    torchvision's feature extractor: their forwards hold Python control flow that
    tracing through would freeze, and as leaves they run eagerly inside the stage.
    Functions called inside a submodule get its path as prefix (``layer2_0_add``
    rather than ``add_3``), so cut points read as places in the model.
    """

    def __init__(self) -> None:
        # The stubs type autowrap_modules as a 1-tuple; torchvision's feature extractor passes two.
        super().__init__(autowrap_modules=(math, torchvision.ops))  # type: ignore[arg-type]
        self._leaves = _torchvision_op_modules()
        self._path = ""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        outer = self._path
        self._path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._path = outer

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None, *rest: Any, **more: Any
    ) -> fx.Proxy:
        if self._path and kind in ("call_function", "call_method"):
            base = name or (target if isinstance(target, str) else getattr(target, "__name__", "op"))
            name = f"{self._path}_{base}".replace(".", "_")
        return super().create_proxy(kind, target, args, kwargs, name, *rest, **more)


def trace_model(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` (in its current train/eval mode) into a GraphModule sharing its weights.

    Raises
    ------
    ModelError
        If torch.fx cannot trace the model, with the reason.
    """
    try:
        with tracing():
            graph = _Tracer().trace(model)
    except Exception as exc:
        raise ModelError(
            f"{type(model).__name__} cannot be split: torch.fx cannot trace it ({reason(exc)}); "
            "only models whose forward has no data-dependent Python control flow can be split"
        ) from exc
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


class ModelGraph:
    """A traced model with its input-dependent nodes in execution order and its cut points.

    Parameters
    ----------
    module
        A GraphModule from :func:`trace_model`.
    label
        How error messages name the model.
    strip_tail
        Take a final resize of the output to the input's size out of the graph
        (:mod:`dask_infer.partition.tail`), so a dense model has cut points; ``tail`` then
        holds it, for whoever runs the stages to apply after the last one.

    Attributes
    ----------
    order
        Nodes whose value depends on the input, in execution order; ``order[0]`` is the
        input placeholder.
    candidates
        Positions ``i`` in ``order`` such that ``order[i]`` is the only value crossing a
        cut placed right after it (never the input itself nor the last node).
    """

    def __init__(self, module: fx.GraphModule, label: str | None = None, *, strip_tail: bool = False) -> None:
        self.module = module
        self.label = label or type(module).__name__
        self.tail: ResizeTail | None = strip_resize_tail(module) if strip_tail else None
        nodes = list(module.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            names = ", ".join(n.name for n in placeholders)
            raise ModelError(
                f"{self.label} cannot be split: its forward takes {len(placeholders)} inputs ({names}); "
                "only single-input models can be split"
            )
        dependent: set[fx.Node] = set()
        for n in nodes:
            if n.op == "placeholder" or any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
        self.order: tuple[fx.Node, ...] = tuple(n for n in nodes if n in dependent and n.op != "output")
        self.position = {n: i for i, n in enumerate(self.order)}
        self._output = next(n for n in nodes if n.op == "output")
        self.candidates: tuple[int, ...] = self._find_candidates()
        self._by_name = {n.name: i for i, n in enumerate(self.order)}

    @classmethod
    def trace(cls, model: nn.Module, label: str | None = None, *, strip_tail: bool = False) -> ModelGraph:
        """Trace ``model`` as it is (no copy); see :func:`trace_model`."""
        return cls(trace_model(model), label, strip_tail=strip_tail)

    def _find_candidates(self) -> tuple[int, ...]:
        end = len(self.order)
        last_use = []
        for i, n in enumerate(self.order):
            uses = [end if u.op == "output" else self.position.get(u, i) for u in n.users]
            last_use.append(max(uses, default=i))
        # live[i] counts values made at or before position i and read after it.
        delta = [0] * (end + 1)
        for i, last in enumerate(last_use):
            if last > i:
                delta[i] += 1
                delta[last] -= 1
        found, live = [], 0
        for i in range(end):
            live += delta[i]
            if 0 < i < end - 1 and live == 1 and last_use[i] > i:
                found.append(i)
        return tuple(found)

    @property
    def candidate_names(self) -> tuple[str, ...]:
        """Names of the nodes after which the model can be cut, in execution order."""
        return tuple(self.order[i].name for i in self.candidates)

    def positions_of(self, cut_points: Sequence[str]) -> list[int]:
        """Positions in ``order`` of the named cut points, validated.

        Raises
        ------
        ModelError
            If a name is not a cut point of this model or the names are not in
            execution order without repeats.
        """
        if isinstance(cut_points, str):
            raise ModelError(f"cut_points={cut_points!r} must be a sequence of node names, not one string")
        valid = set(self.candidates)
        positions = []
        for name in cut_points:
            pos = self._by_name.get(name)
            if pos is None or pos not in valid:
                shown = ", ".join(self.candidate_names[:6])
                more = ", ..." if len(self.candidates) > 6 else ""
                raise ModelError(
                    f"{name!r} is not a cut point of {self.label}; "
                    f"valid cut points are {shown}{more} (see candidate_cuts)"
                )
            positions.append(pos)
        if any(b <= a for a, b in zip(positions, positions[1:], strict=False)):
            raise ModelError(
                f"cut_points {list(cut_points)} of {self.label} are not in execution order "
                "or repeat a node; sort them as candidate_cuts lists them"
            )
        return positions

    def stage_bounds(self, positions: Sequence[int]) -> list[tuple[int, int]]:
        """``(start, end)`` of each stage: it takes ``order[start]`` and returns ``order[end]``."""
        edges = [0, *positions, len(self.order) - 1]
        return list(zip(edges, edges[1:], strict=False))

    def build_stages(self, positions: Sequence[int]) -> list[fx.GraphModule]:
        """GraphModules of the stages cut after ``positions``; they share the traced weights."""
        bounds = self.stage_bounds(positions)
        stages = []
        for index, (start, end) in enumerate(bounds):
            last = index == len(bounds) - 1
            stages.append(self._build_stage(start, end, last, f"Stage{index}"))
        return stages

    def _build_stage(self, start: int, end: int, last: bool, class_name: str) -> fx.GraphModule:
        members = set(self.order[start + 1 : end + 1])
        needed: set[fx.Node] = set()
        # Input-independent values (weights, tables derived from them) are recreated
        # in every stage that reads them, so they never have to cross a cut.
        stack = [a for n in members for a in n.all_input_nodes if a not in self.position]
        if last:
            stack += [a for a in self._output.all_input_nodes if a not in self.position]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        graph = fx.Graph()
        source = self.order[start]
        env: dict[fx.Node, fx.Node] = {source: graph.placeholder(source.name)}
        for n in self.module.graph.nodes:
            if n in members or n in needed:
                env[n] = graph.node_copy(n, lambda a: env[a])
        if last:
            graph.node_copy(self._output, lambda a: env[a])
        else:
            graph.output(env[self.order[end]])
        graph.lint()
        stage = fx.GraphModule(self.module, graph, class_name=class_name)
        stage.eval()
        return stage


def candidate_cuts(model: nn.Module, *, strip_tail: bool = False) -> tuple[str, ...]:
    """Names of the graph nodes after which ``model`` can be cut, in execution order.

    The model is traced on a copy in eval mode; it is not modified. ``strip_tail``: as
    for :class:`ModelGraph`.
    """
    work = copy.deepcopy(model).eval()
    return ModelGraph.trace(work, strip_tail=strip_tail).candidate_names


def resize_tail(model: nn.Module) -> ResizeTail | None:
    """The final resize of ``model``'s output to its input's size, or ``None`` where it has none.

    Traced on a copy in eval mode. A model with one splits with ``strip_tail=True`` into
    stages whose last returns the map before the resize.
    """
    work = copy.deepcopy(model).eval()
    return ModelGraph.trace(work, strip_tail=True).tail


def split_model(
    model: nn.Module, cut_points: Sequence[str], *, copy_model: bool = True, strip_tail: bool = False
) -> list[nn.Module]:
    """Cut ``model`` after the named nodes into ``len(cut_points) + 1`` stage modules.

    Running the stages one after another on a batch gives bit-identical outputs to
    the whole model in eval mode. This is how a worker rebuilds its stage from a
    :class:`~dask_infer.partition.stage_plan.StagePlan`: ``split_model(build_model(name,
    weights=...).module, plan.cut_points)``.

    Parameters
    ----------
    model
        The whole model. It is traced in eval mode: stages are for inference.
    cut_points
        Node names from :func:`candidate_cuts` (or ``StagePlan.cut_points``), in
        execution order. Empty gives one stage holding the whole model.
    copy_model
        Work on a deep copy (default), so that moving or changing a stage never touches
        ``model``. ``False`` saves the copy's memory: the stages then share ``model``'s
        parameters and ``model`` is put in eval mode.
    strip_tail
        Leave a final resize to the input's size (see :func:`resize_tail`) out of the
        last stage, so a dense model can be cut; :func:`run_stages` with its ``tail``
        then gives the model's output.

    Returns
    -------
    list of torch.fx.GraphModule
        Stage ``i`` takes the output of stage ``i - 1`` (stage 0 takes the batch).

    Raises
    ------
    ModelError
        If the model cannot be traced, or a name is not one of its cut points.
    """
    if isinstance(cut_points, str):
        raise ModelError(f"cut_points={cut_points!r} must be a sequence of node names, not one string")
    work = copy.deepcopy(model) if copy_model else model
    work.eval()
    graph = ModelGraph.trace(work, strip_tail=strip_tail)
    return list(graph.build_stages(graph.positions_of(list(cut_points))))


def run_stages(stages: Sequence[nn.Module], batch: torch.Tensor, tail: ResizeTail | None = None) -> object:
    """Run ``stages`` one after another on ``batch`` and return the last stage's output.

    ``tail`` (stages split with ``strip_tail``): the output resized to ``batch``'s height
    and width, as the whole model's last step does.
    """
    out: object = batch
    for stage in stages:
        out = stage(out)
    if tail is not None and isinstance(out, torch.Tensor):
        out = tail.apply(out, (batch.shape[-2], batch.shape[-1]))
    return out
