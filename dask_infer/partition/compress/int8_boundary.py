"""int8 stages that pass their activations to each other in int8.

A converted int8 stage takes fp32 input and quantizes it first (``quantize_per_tensor``
with the scale its observer measured), and one that ends the stage before another returns
fp32. Between two such stages the boundary can move: the earlier stage applies the later
one's quantize step to its output and returns the uint8 tensor, and the later stage starts
from it. The numbers are the same (the same step on the same values, in the other
process), the activation that travels between workers is a quarter of the bytes, the
earlier stage's compiled graph fuses the step into its last layer, and the later one skips it.

A later stage that starts with a ReLU before the step (a cut between a residual add and its
ReLU) joins too when the step's zero point is its lowest value: quantizing then clamps what
the ReLU would have zeroed to that value, so the step alone gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from dask_infer.partition.compress.apply import CompressedStage

__all__ = ["InputQuantization", "input_quantization", "join_int8_boundaries"]


@dataclass(frozen=True)
class InputQuantization:
    """The ``quantize_per_tensor`` step a stage applies to its input.

    Attributes
    ----------
    scale, zero_point, quant_min, quant_max, dtype
        The step's arguments, as in ``torch.ops.quantized_decomposed.quantize_per_tensor``.
    """

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    dtype: torch.dtype

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` quantized by this step (what the stage's graph would do to it)."""
        return torch.ops.quantized_decomposed.quantize_per_tensor.default(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.dtype
        )


def _quantize_op() -> Any:
    return torch.ops.quantized_decomposed.quantize_per_tensor.default


def _input_node(graph: fx.Graph) -> fx.Node | None:
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    return inputs[0] if len(inputs) == 1 else None


def _is_guard(node: fx.Node) -> bool:
    # ``ExportedProgram.module()`` checks its input's shape in a ``_guards_fn`` call first.
    return node.op == "call_module" and str(node.target) == "_guards_fn"


_RELUS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)


def _only_use(node: fx.Node) -> fx.Node | None:
    uses = [u for u in node.users if not _is_guard(u)]
    return uses[0] if len(uses) == 1 and uses[0].op == "call_function" else None


def _input_steps(graph: fx.Graph) -> tuple[list[fx.Node], InputQuantization] | None:
    """The nodes between the graph's one input and its quantized form (an optional ReLU, then
    the quantize step), and the step; ``None`` where the input is used otherwise."""
    node = _input_node(graph)
    first = _only_use(node) if node is not None else None
    if first is None:
        return None
    chain = [first]
    if first.target in _RELUS:
        step = _only_use(first)
        if step is None:
            return None
        chain.append(step)
    step = chain[-1]
    if step.target != _quantize_op() or len(step.args) != 6 or step.kwargs:
        return None
    scale, zero_point, low, high, dtype = step.args[1:]
    if not (
        isinstance(scale, float | int)
        and all(isinstance(a, int) for a in (zero_point, low, high))
        and isinstance(dtype, torch.dtype)
    ):
        return None
    found = InputQuantization(float(scale), int(zero_point), int(low), int(high), dtype)  # type: ignore[arg-type]
    if len(chain) == 2 and found.zero_point != found.quant_min:
        return None  # the step alone would not clamp negatives where the ReLU zeroes them
    return chain, found


def input_quantization(module: nn.Module) -> InputQuantization | None:
    """The quantize step ``module``'s one input goes through before any other use, or ``None``.

    ``None`` when ``module`` is not an FX graph, takes more than one input, or uses its
    input other than through one constant ``quantize_per_tensor`` step (after a ReLU where
    the step's zero point is its lowest value).
    """
    if not isinstance(module, fx.GraphModule):
        return None
    found = _input_steps(module.graph)
    return None if found is None else found[1]


def _single_output(graph: fx.Graph) -> fx.Node | None:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, fx.Node) else None


def _quantize_output(module: fx.GraphModule, step: InputQuantization) -> None:
    graph = module.graph
    value = _single_output(graph)
    assert value is not None
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(out):
        quantized = graph.call_function(
            _quantize_op(),
            (value, step.scale, step.zero_point, step.quant_min, step.quant_max, step.dtype),
        )
    out.replace_input_with(value, quantized)
    module.recompile()


def _take_quantized_input(module: fx.GraphModule) -> None:
    graph = module.graph
    node, found = _input_node(graph), _input_steps(graph)
    assert node is not None and found is not None
    chain = found[0]
    chain[-1].replace_all_uses_with(node)
    for step in reversed(chain):
        graph.erase_node(step)
    module.recompile()


def join_int8_boundaries(stages: Sequence[CompressedStage]) -> list[int]:
    """Move each boundary between two int8 stages into int8, in place.

    Parameters
    ----------
    stages
        Compressed stages in order (:class:`~dask_infer.partition.compress.apply.CompressedStage`).
        Stage ``k`` and ``k + 1`` are joined when both are int8, stage ``k``'s graph returns one
        tensor and stage ``k + 1``'s graph quantizes its input in one step; stage ``k`` then
        returns that step's uint8 output and stage ``k + 1`` takes it. A joined stage ``k + 1``
        still accepts fp32 input, which it quantizes by the same step.

    Returns
    -------
    list of int
        The boundaries joined, by the index of the stage before each.
    """
    joined = []
    for k in range(len(stages) - 1):
        before, after = stages[k], stages[k + 1]
        if before.recipe.quantize != "int8" or after.recipe.quantize != "int8":
            continue
        step = input_quantization(after.module)
        if step is None or not isinstance(before.module, fx.GraphModule):
            continue
        assert isinstance(after.module, fx.GraphModule)  # input_quantization found a step in it
        if _single_output(before.module.graph) is None or before.output_dtype is not None:
            continue
        _quantize_output(before.module, step)
        _take_quantized_input(after.module)
        after.take_quantized_input(step)
        joined.append(k)
    return joined
