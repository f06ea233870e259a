"""Weights from local files only: state_dicts read with ``weights_only=True``, or safetensors.

Weights are never downloaded. A state_dict (``.pt``/``.pth``/``.bin``, read with
``torch.load(weights_only=True)``) or a ``.safetensors`` file is loaded into the
architecture; metadata stored beside the tensors (model name, class names, input size,
normalisation) travels with the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from dask_infer.errors import ModelError, reason

__all__ = [
    "file_sha256",
    "cached_weights",
    "fit_error",
    "head_size",
    "is_weights_enum_name",
    "load_weights",
    "load_weights_file",
    "weights_metadata_key",
]

weights_metadata_key = "dask_infer"
"""Key of the JSON metadata in a safetensors file's header."""


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of the file at ``path`` (read a MiB at a time), ``None`` for no file."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
            try:
                meta = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ModelError(
                    f"weights file {str(path)!r} has metadata {weights_metadata_key!r} that is not JSON "
                    f"({exc.msg}); write it with json.dumps"
                ) from None
            if not isinstance(meta, dict):
                raise ModelError(
                    f"weights file {str(path)!r} has metadata {weights_metadata_key!r} that is not a "
                    f"mapping ({type(meta).__name__}); store a JSON object"
                )
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


_ENUM_NAME = re.compile(r"^[A-Za-z]\w*_Weights\.\w+$")


def is_weights_enum_name(text: str | Path) -> bool:
    """Whether ``text`` reads as a torchvision weights enum name (``ResNet50_Weights.IMAGENET1K_V2``)."""
    return isinstance(text, str) and bool(_ENUM_NAME.match(text)) and not Path(text).exists()


def cached_weights(name: str) -> tuple[Path, dict[str, Any]]:
    """The local torch hub cache file of torchvision weights ``name``, and their metadata.

    Nothing is downloaded: the file must already be in ``torch.hub.get_dir()/checkpoints``
    under the name torchvision downloads it as.

    Returns
    -------
    path, metadata
        ``metadata`` holds ``model``, ``class_names``, ``input_size``, ``mean`` and ``std``.

    Raises
    ------
    ModelError
        For an unknown enum name, or a file not in the cache (naming where to put it).
    """
    try:
        weights = torchvision.models.get_weight(name)
    except (KeyError, ValueError, AttributeError):
        raise ModelError(
            f"weights {name!r} are not torchvision weights; give an enum name such as "
            "'ResNet50_Weights.IMAGENET1K_V2', or a local .pt/.pth/.safetensors file"
        ) from None
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        raise ModelError(
            f"weights {name!r} are not in the local torch cache: place the file {weights.url} at "
            f"{str(path)!r} (weights are never downloaded), or give a local weights file"
        )
    transforms = weights.transforms()
    meta: dict[str, Any] = {
        "model": _model_of(type(weights)),
        "class_names": list(weights.meta.get("categories") or []) or None,
        "input_size": int(transforms.crop_size[0]),
        "mean": [float(v) for v in transforms.mean],
        "std": [float(v) for v in transforms.std],
    }
    return path, {k: v for k, v in meta.items() if v is not None}


def _model_of(enum: type) -> str | None:
    """The torchvision model name whose weights enum is ``enum``."""
    for model in torchvision.models.list_models(module=torchvision.models):
        try:
            if torchvision.models.get_model_weights(model) is enum:
                return str(model)
        except (ValueError, AttributeError):
            continue
    return None


def load_weights(weights: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """A state_dict, its metadata and its file, from a local file or a cached torchvision enum name.

    See :func:`load_weights_file` and :func:`cached_weights`; the enum's metadata fills in
    what the file does not hold.
    """
    if is_weights_enum_name(weights):
        path, meta = cached_weights(str(weights))
        state, own = load_weights_file(path)
        return state, {**meta, **own}, str(path)
    state, meta = load_weights_file(weights)
    return state, meta, str(weights)


def head_size(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes implied by ``state`` for architecture ``name``.

    The last tensor whose first (output) dim differs from the architecture's default is the
    head's; a first layer taking other channels differs in its second dim, and is passed over.
    """
    with torch.device("meta"):  # shapes only: no weights drawn
        reference = torchvision.models.get_model(name, weights=None).state_dict()
    for key, tensor in reversed(list(reference.items())):
        mine = state.get(key)
        if mine is not None and mine.ndim >= 1 and tensor.ndim >= 1 and mine.shape[0] != tensor.shape[0]:
            return int(mine.shape[0])
    return None


def fit_error(name: str, path: str, module: nn.Module, state: dict[str, torch.Tensor]) -> ModelError:
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
