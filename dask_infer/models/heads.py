"""What a run writes from the model's output: its shape, the dims that name it, the activation.

A classifier returns (image, category): ``probabilities`` are its softmax (one class per
image) or sigmoid (multi-label), and ``top_k`` ranks them. Any other output (a
regression's (image, output), a dense map's (image, c, h, w)) is written as it comes with
``activation="none"``; the shapes are found before any cluster starts, by running one
blank image through the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dask_infer.errors import ModelError
from dask_infer.models.features import check_feature_layer
from dask_infer.models.tracing import running_modules

__all__ = ["OutputShapes", "activate", "probe_outputs"]


@dataclass(frozen=True)
class OutputShapes:
    """Per-image shapes of what a model gives: its output and, with a feature layer, the features.

    Attributes
    ----------
    result
        Shape of one image's output (``(1000,)`` for an ImageNet classifier).
    features
        Length of one image's flattened feature-layer output; ``None`` without a feature layer.
    """

    result: tuple[int, ...]
    features: int | None = None


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Probabilities from (image, category) scores: ``softmax`` over categories, or ``sigmoid``."""
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"activation={activation!r} gives no probabilities")


def probe_outputs(
    module: nn.Module,
    sample: Sequence[int],
    *,
    activation: str,
    feature_layer: str | None = None,
    cut_points: Sequence[str] = (),
    label: str = "the model",
) -> OutputShapes:
    """Per-image shapes of ``module``'s output and of its feature layer, from one blank batch.

    With ``cut_points`` the batch runs through the stages the model is cut into, as a
    run does, so a feature layer that splitting does not call as one module (a container
    torch.fx traces through) is found here. ``module`` is put in eval mode, and otherwise
    left as it was.

    Raises
    ------
    ModelError
        When the output is not one tensor, or ``activation`` needs (image, category) scores
        and the output has another shape, or ``feature_layer`` is not a module of ``module``
        or does not run.
    """
    from dask_infer.partition.split import run_stages, split_model

    module.eval()
    captured: list[torch.Tensor] = []
    handle = None
    layer = check_feature_layer(module, feature_layer, label=label) if feature_layer is not None else None
    # Split before the hook goes on: tracing would call it with proxies.
    stages = split_model(module, list(cut_points), copy_model=False) if cut_points else [module]
    if layer is not None:
        handle = layer.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        with torch.inference_mode(), running_modules():
            out = run_stages(stages, torch.zeros(tuple(sample)))
    finally:
        if handle is not None:
            handle.remove()
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"{label} returns {type(out).__name__}, not one tensor; wrap it in a module that returns "
            "the tensor to write"
        )
    shape = tuple(int(n) for n in out.shape[1:])
    if activation != "none" and len(shape) != 1:
        raise ModelError(
            f"{label} gives per-image outputs of shape {shape}, not (category,) scores, so "
            f"activation={activation!r}, probabilities and top_k do not apply; write it as it is with "
            "--activation none --outputs logits, or run a map over tiles with --tile (e.g. --tile 512)"
        )
    if feature_layer is None:
        return OutputShapes(shape)
    if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
        where = f" once cut into {len(cut_points) + 1} stages" if cut_points else ""
        raise ModelError(
            f"feature_layer={feature_layer!r} of {label} runs {len(captured)} times per forward{where}, "
            "not once with one tensor out; name a layer the model calls once "
            "(torch.fx traces through containers such as 'layer4': name one of their leaves)"
        )
    return OutputShapes(shape, int(torch.flatten(captured[0], 1).shape[1]))
