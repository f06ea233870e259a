"""Model registry: torchvision classifiers by name, their defaults, and building them.

Weights come from local files only (see :mod:`dask_infer.models.weights`); without
them the model is randomly initialised, seeded, so every worker builds the same one.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from dask_infer.errors import ModelError
from dask_infer.models.weights import fit_error, head_size, load_weights_file
from dask_infer.options import check_positive_int

__all__ = [
    "LoadedModel",
    "ModelInfo",
    "model_table",
    "ModelDefaults",
    "available_models",
    "build_model",
    "check_model_name",
    "model_defaults",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=1)
def available_models() -> tuple[str, ...]:
    """Names of the torchvision image classification models, sorted."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def check_model_name(name: str) -> str:
    """Return ``name`` if torchvision has a classifier of that name, else raise.

    Raises
    ------
    ModelError
        With the closest known names as the fix.
    """
    if name in available_models():
        return name
    close = difflib.get_close_matches(name, available_models(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see `dask-infer models`"
    raise ModelError(f"unknown model {name!r}: {hint}")


@dataclass(frozen=True)
class ModelDefaults:
    """Input size, normalisation and ImageNet categories of a torchvision model."""

    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...]


def model_defaults(name: str) -> ModelDefaults:
    """Preprocessing defaults of torchvision's weights for ``name`` (no download)."""
    check_model_name(name)
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError):
        return ModelDefaults(224, 256, _IMAGENET_MEAN, _IMAGENET_STD, ())
    transforms = weights.transforms()
    crop = int(transforms.crop_size[0])
    resize = int(transforms.resize_size[0]) if transforms.resize_size else crop
    return ModelDefaults(
        input_size=crop,
        resize_size=resize,
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        categories=tuple(weights.meta.get("categories", ())),
    )


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference and what is known about its inputs and outputs."""

    module: nn.Module
    name: str
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None
    weights: str | None

    @property
    def pretrained(self) -> bool:
        """Whether real weights were loaded (otherwise the model is random)."""
        return self.weights is not None


MAX_INPUT_SIZE = 4096
"""Largest model input side accepted from a weights file's metadata (a 4096x4096 RGB batch of
one is 200 MB in float32; larger values are mistakes that would exhaust a worker's memory)."""


def _input_size(value: Any, weights: str | Path | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= MAX_INPUT_SIZE:
        raise ModelError(
            f"input_size={value!r} in the metadata of weights file {str(weights)!r} must be a whole "
            f"number from 8 to {MAX_INPUT_SIZE}; fix the file's metadata"
        )
    return value


def _channel_values(
    name: str, value: Any, weights: str | Path | None, *, positive: bool = False
) -> tuple[float, ...]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or (positive and min(value) <= 0):
        need = "positive " if positive else ""
        raise ModelError(
            f"{name}={value!r} in the metadata of weights file {str(weights)!r} must be 3 finite "
            f"{need}numbers, one per RGB channel; fix the file's metadata"
        )
    return tuple(float(v) for v in value)


def build_model(
    name: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build torchvision model ``name`` in eval mode, with weights from a local file.

    Parameters
    ----------
    name
        A torchvision classification model name, e.g. ``"resnet50"``.
    weights
        Local weights file; ``None`` gives a randomly initialised model (seeded by
        ``seed``, so every worker builds the same one).
    num_classes
        Size of the classifier head. Default: what the weights file implies, else 1000.
    seed
        Seed of the random initialisation when no weights are given.
    """
    check_model_name(name)
    check_positive_int("num_classes", num_classes, optional=True, error=ModelError)
    defaults = model_defaults(name)
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if weights is not None:
        state, meta = load_weights_file(weights)
        if meta.get("model") not in (None, name):
            raise ModelError(
                f"weights file {str(weights)!r} was made for {meta['model']!r}, not {name!r}; "
                f"use --model {meta['model']}"
            )
        if num_classes is None:
            num_classes = head_size(name, state)
    num_classes = num_classes or 1000
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            module = torchvision.models.get_model(name, **kwargs)
        except TypeError:
            kwargs.pop("aux_logits", None)
            kwargs.pop("init_weights", None)
            module = torchvision.models.get_model(name, **kwargs)
    if state is not None:
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise fit_error(name, str(weights), module, state) from exc
    module.eval()
    class_names = meta.get("class_names")
    if class_names is None and state is not None and num_classes == len(defaults.categories):
        class_names = defaults.categories
    return LoadedModel(
        module=module,
        name=name,
        num_classes=num_classes,
        input_size=_input_size(meta.get("input_size", defaults.input_size), weights),
        mean=_channel_values("mean", meta.get("mean", defaults.mean), weights),
        std=_channel_values("std", meta.get("std", defaults.std), weights, positive=True),
        class_names=tuple(str(c) for c in class_names) if class_names is not None else None,
        weights=str(weights) if weights is not None else None,
    )


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``dask-infer models``: what a registry model does and what it takes."""

    name: str
    task: str
    input_size: int
    params: int | None

    @property
    def params_text(self) -> str:
        """Parameters in millions, or ``?`` where torchvision does not say."""
        return f"{self.params / 1e6:.1f}M" if self.params else "?"


def model_table() -> list[ModelInfo]:
    """Every registry model with its input size and parameter count, read from torchvision's
    weight metadata: no model is built, so listing all of them takes milliseconds."""
    rows = []
    for name in available_models():
        defaults = model_defaults(name)
        try:
            params = torchvision.models.get_model_weights(name).DEFAULT.meta.get("num_params")
        except (ValueError, AttributeError):
            params = None
        rows.append(ModelInfo(name, "classification", defaults.input_size, params))
    return rows
