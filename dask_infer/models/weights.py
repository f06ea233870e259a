"""Weights from local files only: state_dicts read with ``weights_only=True``, or safetensors.

Weights are never downloaded. A state_dict (``.pt``/``.pth``/``.bin``, read with
``torch.load(weights_only=True)``) or a ``.safetensors`` file is loaded into the
architecture; metadata stored beside the tensors (model name, class names, input size,
normalisation) travels with the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from dask_infer.errors import ModelError, reason

__all__ = ["fit_error", "head_size", "load_weights_file", "weights_metadata_key"]

weights_metadata_key = "dask_infer"
"""Key of the JSON metadata in a safetensors file's header."""


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


def head_size(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """Number of classes implied by ``state`` for architecture ``name``."""
    reference = torchvision.models.get_model(name, weights=None).state_dict()
    for key, tensor in reversed(list(reference.items())):
        if key in state and state[key].shape != tensor.shape and state[key].ndim >= 1:
            return int(state[key].shape[0])
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
