"""Model registry: torchvision classifiers by name, their defaults, and building any model.

:func:`build_model` also builds the models that are not torchvision's (an import path, an
``nn.Module`` instance, a ``.pt2`` program; see :mod:`dask_infer.models.sources`).

Weights come from local files only (see :mod:`dask_infer.models.weights`); without
them the model is randomly initialised, seeded, so every worker builds the same one.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from dask_infer.errors import ModelError
from dask_infer.models.channels import adapt_input_channels, input_channels
from dask_infer.models.dense import (
    DEFAULT_DENSE_CLASSES,
    MapOutput,
    dense_classes,
    dense_models,
    make_dense_model,
)
from dask_infer.models.own import DEFAULT_INPUT_SIZE, build_own_module, count_outputs, program_input_size
from dask_infer.models.sources import ModelSource, model_source
from dask_infer.models.weights import fit_error, head_size, load_weights
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
    if isinstance(name, str) and (name in available_models() or name in dense_models()):
        return name
    if not isinstance(name, str):
        raise ModelError(f"model={name!r} is not a torchvision model name")
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
    if name in dense_models():
        # Segmentation weights resize without a crop; tiled runs feed tiles at their own size.
        side = int(transforms.resize_size[0])
        return ModelDefaults(side, side, tuple(transforms.mean), tuple(transforms.std), ())
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
    source: ModelSource | None = None
    """How the model was given; what workers rebuild it from."""

    @property
    def pretrained(self) -> bool:
        """Whether real weights were loaded or came with the model (otherwise the model is random)."""
        given = self.source is not None and self.source.kind in ("module", "exported")
        return self.weights is not None or given


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
    name: str, value: Any, weights: str | Path | None, *, channels: int = 3, positive: bool = False
) -> tuple[float, ...]:
    ok = isinstance(value, list | tuple) and len(value) == channels
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok or (positive and min(value) <= 0):
        need = "positive " if positive else ""
        raise ModelError(
            f"{name}={value!r} in the metadata of weights file {str(weights)!r} must be {channels} finite "
            f"{need}numbers, one per input channel of the model; fix the file's metadata"
        )
    return tuple(float(v) for v in value)


def build_model(
    model: str | nn.Module | ModelSource,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    where: str | None = None,
) -> LoadedModel:
    """Build a model in eval mode, with weights from a local file.

    Parameters
    ----------
    model
        A torchvision classification model name (``"resnet50"``), an import path
        ``"package.module:factory"`` (a function or class returning an ``nn.Module``), the
        path of a ``.pt2`` program saved with ``torch.export.save``, an ``nn.Module``
        instance (copied, never changed), or a :class:`~dask_infer.models.sources.ModelSource`.
    weights
        Local weights file (state_dict or safetensors), or the name of torchvision weights
        already in the local torch hub cache (``"ResNet50_Weights.IMAGENET1K_V2"``); ``None``
        gives a randomly initialised model (seeded by ``seed``, so every worker builds the
        same one). A ``.pt2`` program holds its own weights.
    num_classes
        Size of the classifier head. Default: what the weights file implies, else 1000; for
        a model that is not torchvision's, the size of its output for one image.
    seed
        Seed of the random initialisation when no weights are given.
    model_kwargs
        Keyword arguments of an import path's factory.
    where
        Where the model is built (a worker's address), for error messages.
    """
    source = model_source(model, model_kwargs)
    if source.kind != "torchvision":
        return _build_own(source, weights=weights, num_classes=num_classes, seed=seed, where=where)
    loaded = _build_torchvision(source.ref, weights=weights, num_classes=num_classes, seed=seed)
    return replace(loaded, source=source)


def _build_own(
    source: ModelSource,
    *,
    weights: str | Path | None,
    num_classes: int | None,
    seed: int,
    where: str | None,
) -> LoadedModel:
    """An import path's, an instance's or a ``.pt2`` program's model, with what is known about it."""
    check_positive_int("num_classes", num_classes, optional=True, error=ModelError)
    if weights is not None and source.kind == "exported":
        raise ModelError(
            f"weights={str(weights)!r} given with the program {source.ref!r}, which holds its own weights; "
            "leave --weights out"
        )
    module = build_own_module(source, seed=seed, where=where)
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    if weights is not None:
        state, meta, weights = load_weights(weights)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise fit_error(source.label, str(weights), module, state) from exc
    module.eval()
    channels = input_channels(module) or 3
    default_size = program_input_size(module) or DEFAULT_INPUT_SIZE
    input_size = _input_size(meta.get("input_size", default_size), weights)
    mean = meta.get("mean", _IMAGENET_MEAN if channels == 3 else (0.0,) * channels)
    std = meta.get("std", _IMAGENET_STD if channels == 3 else (1.0,) * channels)
    if num_classes is None:
        num_classes = count_outputs(module, source.label, input_size, channels)
    class_names = meta.get("class_names")
    return LoadedModel(
        module=module,
        name=source.label,
        num_classes=num_classes,
        input_size=input_size,
        mean=_channel_values("mean", mean, weights, channels=channels),
        std=_channel_values("std", std, weights, channels=channels, positive=True),
        class_names=tuple(str(c) for c in class_names) if class_names is not None else None,
        weights=str(weights) if weights is not None else None,
        source=source,
    )


def _initialised(name: str, kwargs: dict[str, Any], seed: int) -> nn.Module:
    """Torchvision model ``name`` built with ``kwargs``, its weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return torchvision.models.get_model(name, **kwargs)
        except TypeError:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("aux_logits", "init_weights")}
            return torchvision.models.get_model(name, **kwargs)


def _assigned(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module | None:
    """Model ``name`` whose tensors are ``state``'s own, built without drawing weights it would
    then overwrite (on the meta device); ``None`` where ``state`` does not fill it exactly (other
    keys, shapes or dtypes, or tensors outside the state_dict), for the checked, copying load.

    Drawing ResNet-50's random weights takes longer than loading its file.
    """
    with torch.device("meta"):
        try:
            module = _initialised(name, kwargs, 0)
        except Exception:  # an architecture that cannot be built on the meta device
            return None
        adapt_input_channels(module, state)
    expected = module.state_dict()
    if expected.keys() != state.keys() or any(
        state[k].shape != v.shape or state[k].dtype != v.dtype for k, v in expected.items()
    ):
        return None
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        return None
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        return None
    return module


def _build_torchvision(
    name: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build torchvision model ``name`` (see :func:`build_model`)."""
    check_model_name(name)
    check_positive_int("num_classes", num_classes, optional=True, error=ModelError)
    defaults = model_defaults(name)
    state: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = {}
    dense = name in dense_models()
    if weights is not None:
        state, meta, weights = load_weights(weights)
        if meta.get("model") not in (None, name):
            raise ModelError(
                f"weights file {str(weights)!r} was made for {meta['model']!r}, not {name!r}; "
                f"use --model {meta['model']}"
            )
        if num_classes is None:
            num_classes = dense_classes(state) if dense else head_size(name, state)
    if dense:
        num_classes = num_classes or DEFAULT_DENSE_CLASSES
        aux = state is not None and any(k.startswith("aux_classifier.") for k in state)
        inner = make_dense_model(name, num_classes, aux=aux, seed=seed)
        if state is not None:
            try:
                inner.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise fit_error(name, str(weights), inner, state) from exc
        return LoadedModel(
            module=MapOutput(inner).eval(),
            name=name,
            num_classes=num_classes,
            input_size=_input_size(meta.get("input_size", defaults.input_size), weights),
            mean=_channel_values("mean", meta.get("mean", defaults.mean), weights),
            std=_channel_values("std", meta.get("std", defaults.std), weights, positive=True),
            class_names=tuple(str(c) for c in meta["class_names"]) if "class_names" in meta else None,
            weights=str(weights) if weights is not None else None,
        )
    num_classes = num_classes or 1000
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = False
    module = _assigned(name, kwargs, state) if state is not None else None
    if module is None:
        module = _initialised(name, kwargs, seed)
        channels = (adapt_input_channels(module, state) if state is not None else input_channels(module)) or 3
        if state is not None:
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise fit_error(name, str(weights), module, state) from exc
    else:
        channels = input_channels(module) or 3
    if channels != 3:
        # Statistics are per band; without them an N-band model gets pixels scaled to [0, 1].
        defaults = replace(defaults, mean=(0.0,) * channels, std=(1.0,) * channels)
    module.eval()
    class_names = meta.get("class_names")
    if class_names is None and state is not None and num_classes == len(defaults.categories):
        class_names = defaults.categories
    return LoadedModel(
        module=module,
        name=name,
        num_classes=num_classes,
        input_size=_input_size(meta.get("input_size", defaults.input_size), weights),
        mean=_channel_values("mean", meta.get("mean", defaults.mean), weights, channels=channels),
        std=_channel_values("std", meta.get("std", defaults.std), weights, channels=channels, positive=True),
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
