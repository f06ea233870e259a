"""Models that are not torchvision's: built by an import path's factory, unpickled, or loaded from ``.pt2``.

Their classes come from the model itself: one forward of a blank image gives the number
of outputs. The input size comes from the weights file's metadata, from the ``.pt2``
program's input shape, or is 224; the normalisation from the metadata, else ImageNet's.
"""

from __future__ import annotations

import zipfile
from typing import Any

import torch
from torch import nn

from dask_infer.errors import ModelError, reason
from dask_infer.models.sources import ModelSource, import_object, unpickle_module

__all__ = ["DEFAULT_INPUT_SIZE", "build_own_module", "count_outputs", "program_input_size"]

DEFAULT_INPUT_SIZE = 224
"""Input side of a model that does not say (no metadata, no fixed program input)."""


def build_own_module(source: ModelSource, *, seed: int = 0, where: str | None = None) -> nn.Module:
    """The module of an import path, an instance or a ``.pt2`` program, in eval mode.

    A factory runs under ``seed``, so every worker builds the same randomly initialised model.

    Raises
    ------
    ModelError
        When the code does not import (naming ``where``), a factory fails or returns no
        module, or a ``.pt2`` file is not a saved program.
    """
    if source.kind == "import":
        factory = import_object(source.ref, where=where)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                module = factory(**source.kwargs)
            except Exception as exc:
                args = f" with model_kwargs={dict(source.kwargs)!r}" if source.kwargs else ""
                raise ModelError(
                    f"factory {source.ref!r} failed{args}: {reason(exc)}; check its arguments"
                ) from exc
        if not isinstance(module, nn.Module):
            raise ModelError(
                f"factory {source.ref!r} returned a {type(module).__name__}, not a torch.nn.Module; "
                "make it return the model"
            )
    elif source.kind == "module":
        module = unpickle_module(source, where=where)
    elif source.kind == "exported":
        module = load_program(source.ref).module()
        # The program's graph is fixed in the mode it was exported in; its module refuses
        # train()/eval() only to say so, and splitting and compression call eval().
        for name in ("train", "eval"):
            module.__dict__.pop(name, None)
    else:
        raise ModelError(f"model kind {source.kind!r} is not one of import, module, exported")
    return module.eval()


def load_program(path: str) -> torch.export.ExportedProgram:
    """The ``torch.export`` program saved at ``path``.

    Raises
    ------
    ModelError
        If the file is not one.
    """
    fix = "save one with torch.export.save(torch.export.export(model, (x,)), path)"
    if not zipfile.is_zipfile(path):
        raise ModelError(f"model file {path!r} is not a saved torch.export program (not a zip file); {fix}")
    try:
        return torch.export.load(path)
    except Exception as exc:
        raise ModelError(
            f"model file {path!r} is not a saved torch.export program ({reason(exc)}); {fix}"
        ) from exc


def program_input_size(module: nn.Module) -> int | None:
    """The fixed square input side of a ``.pt2`` program's module, if its input shape says one."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None or len(shape) != 4:
            return None
        h, w = shape[2], shape[3]
        if isinstance(h, int) and isinstance(w, int) and h == w:
            return h
        return None
    return None


@torch.inference_mode()
def count_outputs(module: nn.Module, label: str, input_size: int, channels: int = 3) -> int:
    """Classes of ``module``: the size of its output's second dim for one blank image.

    Raises
    ------
    ModelError
        If the forward fails or does not give one tensor of two dims or more.
    """
    x = torch.zeros((1, channels, input_size, input_size))
    try:
        out: Any = module(x)
    except Exception as exc:
        raise ModelError(
            f"model {label!r} fails on a blank batch of shape (1, {channels}, {input_size}, {input_size}): "
            f"{reason(exc)}; it must take normalised (image, channel, y, x) batches of that size "
            "(a weights file's metadata may give input_size)"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {label!r} returns {shape} for one image; it must return one tensor with the image "
            "first: (image, class), or (image, ...) with --activation none"
        )
    return int(out.shape[1])
