"""Model registry: torchvision classifiers by name, weights from local files only.

Weights are never downloaded. A state_dict (``.pt``/``.pth``/``.bin``, read with
``torch.load(weights_only=True)``) or a ``.safetensors`` file is loaded into the
torchvision architecture; without one the model is randomly initialised.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from dask_infer.errors import ModelError, reason

__all__ = [
    "LoadedModel",
    "ModelDefaults",
    "available_models",
    "build_model",
    "check_model_name",
    "load_weights_file",
    "model_defaults",
    "weights_metadata_key",
]

weights_metadata_key = "dask_infer"
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


def load_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a state_dict and its dask-infer metadata from a local file.

    Parameters
    ----------
    path
        ``.safetensors``, or a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``) holding
        a state_dict, or a dict with a ``state_dict`` (or ``model``) entry and an
        optional ``meta`` entry. Read with ``weights_only=True``: no code is executed.

    Returns
    -------
    state_dict, metadata
        ``metadata`` may hold ``model``, ``class_names``, ``input_size``, ``mean``, ``std``.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(
            f"weights file {str(path)!r} does not exist; give a local .pt, .pth or .safetensors file"
        )
    meta: dict[str, Any] = {}
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            state = load_file(str(p), device="cpu")
            with safe_open(str(p), framework="pt") as f:
                raw = (f.metadata() or {}).get(weights_metadata_key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"weights file {str(path)!r} is not a readable safetensors file: {exc}") from exc
        if raw:
            meta = json.loads(raw)
        return dict(state), meta
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"weights file {str(path)!r} cannot be read as a state_dict with weights_only=True: "
            f"{reason(exc)}; save it with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("meta"), dict):
        meta = dict(obj["meta"])
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {str(path)!r} holds no state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, meta


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


def _head_size(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes implied by ``state`` for architecture ``name``."""
    reference = torchvision.models.get_model(name, weights=None).state_dict()
    for key, tensor in reversed(list(reference.items())):
        if key in state and state[key].shape != tensor.shape and state[key].ndim >= 1:
            return int(state[key].shape[0])
    return None


def _fit_error(name: str, path: str, module: nn.Module, state: dict[str, torch.Tensor]) -> ModelError:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 2} more)" if len(items) > 2 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:2])}{more}")
    return ModelError(
        f"weights file {path!r} does not fit model {name!r} ({'; '.join(parts)}); "
        "check --model or the weights file"
    )


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
    if num_classes is not None and num_classes < 1:
        raise ModelError(f"num_classes={num_classes} must be >= 1")
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
            num_classes = _head_size(name, state)
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
            raise _fit_error(name, str(weights), module, state) from exc
    module.eval()
    class_names = meta.get("class_names")
    if class_names is None and state is not None and num_classes == len(defaults.categories):
        class_names = defaults.categories
    return LoadedModel(
        module=module,
        name=name,
        num_classes=num_classes,
        input_size=int(meta.get("input_size", defaults.input_size)),
        mean=tuple(meta.get("mean", defaults.mean)),
        std=tuple(meta.get("std", defaults.std)),
        class_names=tuple(str(c) for c in class_names) if class_names is not None else None,
        weights=str(weights) if weights is not None else None,
    )
