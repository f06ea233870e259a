"""A dense model's last step, resizing its map to the input's height and width, kept out of its stages.

Segmentation networks (torchvision's FCN, DeepLabV3 and LR-ASPP, and most of their kind)
end with ``F.interpolate(scores, size=x.shape[-2:], ...)``. The input's size is then live
from the first layer to the last, so no single tensor crosses anywhere in between and the
model has no cut point. Taking that resize out of the traced graph leaves a body whose
cuts pass one tensor, as a classifier's do; a pipeline then runs the body's stages and
resizes the last stage's output to the size its first stage was given, which computes the
same numbers as the whole model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["ResizeTail", "strip_resize_tail"]


@dataclass(frozen=True)
class ResizeTail:
    """``F.interpolate(x, size=<the input's height and width>, mode=mode, align_corners=align_corners)``."""

    mode: str
    align_corners: bool | None = None
    antialias: bool = False

    def apply(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``x`` resized to ``size`` (height, width), as the model's own last step does."""
        return F.interpolate(
            x, size=tuple(size), mode=self.mode, align_corners=self.align_corners, antialias=self.antialias
        )


def _input_hw(node: object, placeholder: fx.Node) -> bool:
    """Whether ``node`` is ``x.shape[-2:]`` or ``x.size()[-2:]`` of the input ``x``."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not operator.getitem:
        return False
    shape, index = node.args
    if index != slice(-2, None, None) or not isinstance(shape, fx.Node):
        return False
    if shape.op == "call_function" and shape.target is getattr:
        return shape.args == (placeholder, "shape")
    return shape.op == "call_method" and shape.target == "size" and shape.args == (placeholder,)


def strip_resize_tail(module: fx.GraphModule) -> ResizeTail | None:
    """Make the resized map's source the output of ``module``'s graph, in place, and return the resize.

    Only a graph whose output is exactly ``F.interpolate(scores, size=x.shape[-2:], mode=...)``
    of its one input ``x`` (no scale factor) changes; any other is left as it is and gives
    ``None``.
    """
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if len(placeholders) != 1 or output is None or len(output.args) != 1:
        return None
    last = output.args[0]
    if not (
        isinstance(last, fx.Node)
        and last.op == "call_function"
        and last.target is F.interpolate
        and len(last.args) == 1
        and isinstance(last.args[0], fx.Node)
        and len(last.users) == 1
    ):
        return None
    kwargs = dict(last.kwargs)
    if not _input_hw(kwargs.get("size"), placeholders[0]) or kwargs.get("scale_factor") is not None:
        return None
    if kwargs.get("recompute_scale_factor") not in (None, False):
        return None
    tail = ResizeTail(
        mode=str(kwargs.get("mode", "nearest")),
        align_corners=kwargs.get("align_corners"),  # type: ignore[arg-type]
        antialias=bool(kwargs.get("antialias", False)),
    )
    output.args = (last.args[0],)
    graph.erase_node(last)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return tail
