"""Feature layers: a named module's output, flattened per image, taken during the normal forward.

A forward hook on the module stores what it returns; the runtime takes the stored
values after each chunk. The hook sits on the module object itself, so it fires in
whichever stage calls that module once the model is split (stages share their modules
with the model they were cut from), and in a deep copy of a stage too (the store lives
on the module, not in the hook).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dask_infer.errors import ModelError

if TYPE_CHECKING:
    from dask_infer.partition.compress import CompressionPlan

__all__ = [
    "check_feature_compression",
    "check_feature_layer",
    "feature_layer_names",
    "take_features",
    "tap_layer",
]

_STORE = "_dask_infer_features"
"""Attribute of a tapped module: the list its hook appends each batch's output to."""


def feature_layer_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s submodules that a feature layer can name, in definition order."""
    return tuple(name for name, _ in module.named_modules() if name)


def check_feature_layer(module: nn.Module, layer: str, *, label: str = "the model") -> nn.Module:
    """The submodule named ``layer``; an unknown name is refused naming a few valid ones.

    Raises
    ------
    ModelError
        When ``module`` has no submodule ``layer``.
    """
    names = feature_layer_names(module)
    if layer in names:
        return module.get_submodule(layer)
    top = [n for n in names if "." not in n]
    close = difflib.get_close_matches(layer, names, n=3)
    shown = list(dict.fromkeys([*close, *top[-4:]]))
    raise ModelError(
        f"feature_layer={layer!r} is not a module of {label}; valid names include "
        f"{', '.join(shown)} (any name from model.named_modules())"
    )


def _store(module: nn.Module, _args: Any, output: Any) -> None:
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            f"feature layer {type(module).__name__} returned {type(output).__name__}, not a tensor; "
            "name a layer whose output is one tensor"
        )
    module.__dict__[_STORE].append(output.detach())


def tap_layer(module: nn.Module, layer: str) -> nn.Module:
    """Make the submodule ``layer`` of ``module`` keep its outputs for :func:`take_features`."""
    tapped = check_feature_layer(module, layer)
    if _STORE not in tapped.__dict__:
        tapped.__dict__[_STORE] = []
        tapped.register_forward_hook(_store)
    return tapped


def _tapped(modules: Iterable[nn.Module]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for module in modules:
        for sub in module.modules():
            if _STORE in sub.__dict__:
                seen.setdefault(id(sub), sub)
    return list(seen.values())


def take_features(modules: Iterable[nn.Module], images: int | None = None) -> torch.Tensor | None:
    """What the tapped layer inside ``modules`` stored since the last take, as (image, feature) float32.

    ``None`` when it stored nothing (a pipeline stage that does not hold the layer).
    ``images=None`` only empties the store (values left by a warm-up or a calibration).

    Raises
    ------
    RuntimeError
        When the layer ran another number of times than the chunk has images (a model
        that calls it twice per forward).
    """
    parts: list[torch.Tensor] = []
    for tapped in _tapped(modules):
        parts += tapped.__dict__[_STORE]
        tapped.__dict__[_STORE].clear()
    if images is None or not parts:
        return None
    out = torch.cat([torch.flatten(p, 1).float() for p in parts]).to("cpu")
    if len(out) != images:
        raise RuntimeError(
            f"the feature layer gave {len(out)} rows for {images} images: it runs more than once per "
            "forward; name a layer the model calls once"
        )
    return out


def check_feature_compression(plan: CompressionPlan, stages: int, layer: str) -> None:
    """Refuse recipes that hide or reshape the feature layer.

    int8 and compile replace the modules by a graph the layer's hook does not reach;
    structured pruning changes the layer's width.

    Raises
    ------
    ModelError
        Naming the first stage whose recipe does so.
    """
    for index in range(stages):
        recipe = plan.recipe_for(index)
        if recipe.quantize is not None or recipe.compile or recipe.prune == "structured":
            raise ModelError(
                f"feature_layer={layer!r} cannot be read from stage {index} compressed with "
                f"{recipe.to_string()!r}: int8, compile and structured pruning replace or reshape its "
                "modules; use fp16, bf16, channels_last or prune-unstructured with features"
            )
