"""Where a model comes from: a torchvision name, an import path, an ``nn.Module``, or a ``.pt2`` program.

A :class:`ModelSource` is plain data that travels to the workers inside the run's spec,
once per worker: a name, an import path with its keyword arguments, the path of a saved
``torch.export`` program, or an ``nn.Module`` instance pickled once on the client.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import torch
from torch import nn

from dask_infer.errors import ModelError, reason

__all__ = [
    "MODEL_KINDS",
    "ModelSource",
    "import_object",
    "model_label",
    "model_source",
    "module_digest",
    "unpickle_module",
]

MODEL_KINDS = ("torchvision", "import", "module", "exported")
"""Ways a model can be given: a torchvision name, ``package.module:factory``, an instance, a ``.pt2`` file."""

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

IMPORTABLE_HINT = (
    "the code must be importable (installed, or on PYTHONPATH) on the client and on every worker; "
    "a .pt2 program saved with torch.export.save needs no code there"
)


@dataclass(frozen=True)
class ModelSource:
    """A model as given by the user, in a form that rebuilds it anywhere.

    Attributes
    ----------
    kind
        One of :data:`MODEL_KINDS`.
    ref
        The torchvision name, the import path ``package.module:factory``, the absolute path of
        the ``.pt2`` file, or the class path ``package.module.Class`` of an instance.
    kwargs
        Keyword arguments of an import path's factory.
    payload
        An instance pickled (cloudpickle) once on the client; workers unpickle it.
    digest
        SHA-256 of an instance's state_dict or of a ``.pt2`` file: what resumes compare.
    """

    kind: str
    ref: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes | None = field(default=None, repr=False)
    digest: str | None = None

    @property
    def label(self) -> str:
        """Short name for task keys and messages: the model name, factory, class or file stem."""
        if self.kind == "import":
            return self.ref.rsplit(":", 1)[1].rsplit(".", 1)[-1]
        if self.kind == "module":
            return self.ref.rsplit(".", 1)[-1]
        if self.kind == "exported":
            return Path(self.ref).stem
        return self.ref

    def __str__(self) -> str:
        return self.label

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (no payload)."""
        return {"kind": self.kind, "ref": self.ref, "kwargs": dict(self.kwargs), "digest": self.digest}


def module_digest(module: nn.Module) -> str:
    """SHA-256 of ``module``'s class path and state_dict (names, dtypes, shapes, values)."""
    h = hashlib.sha256(_class_path(module).encode())
    for key, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _class_path(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def model_label(model: Any) -> str:
    """The short name of ``model`` as :attr:`ModelSource.label` gives it, without pickling anything."""
    if isinstance(model, ModelSource):
        return model.label
    if isinstance(model, nn.Module):
        return type(model).__name__
    text = str(model)
    if text.endswith(".pt2"):
        return Path(text).stem
    return text.rsplit(":", 1)[-1].rsplit(".", 1)[-1] if ":" in text else text


def model_source(model: Any, kwargs: Mapping[str, Any] | None = None) -> ModelSource:
    """Tell which of the four ways ``model`` is given, checked without building it.

    Parameters
    ----------
    model
        A torchvision name (``"resnet50"``), an import path (``"package.module:factory"``), the
        path of a ``.pt2`` file written by ``torch.export.save``, an ``nn.Module`` instance, or
        a :class:`ModelSource` (returned as it is).
    kwargs
        Keyword arguments for an import path's factory.

    Raises
    ------
    ModelError
        For a value that is none of these, a ``.pt2`` file that does not exist, or ``kwargs``
        given with a model that takes none.
    """
    kwargs = dict(kwargs or {})
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, nn.Module):
        _no_kwargs(kwargs, f"an instance of {type(model).__name__}")
        payload = cloudpickle.dumps(model)
        return ModelSource("module", _class_path(model), payload=payload, digest=module_digest(model))
    if not isinstance(model, str) or not model:
        raise ModelError(
            f"model={model!r} must be a torchvision name, an import path 'package.module:factory', "
            "a .pt2 file or a torch.nn.Module"
        )
    if model.endswith(".pt2"):
        _no_kwargs(kwargs, f"the program {model!r}")
        path = Path(model).expanduser().absolute()
        if not path.is_file():
            raise ModelError(
                f"model file {model!r} does not exist; give a program saved with torch.export.save"
            )
        return ModelSource("exported", str(path), digest=_file_digest(path))
    if ":" in model:
        if not _IMPORT_PATH.match(model):
            raise ModelError(f"model={model!r} is not an import path; write it as 'package.module:factory'")
        if any(not isinstance(k, str) for k in kwargs):
            raise ModelError(f"model_kwargs={kwargs!r} must have text keys (the factory's argument names)")
        return ModelSource("import", model, kwargs=kwargs)
    _no_kwargs(kwargs, f"torchvision model {model!r}")
    return ModelSource("torchvision", model)


def _no_kwargs(kwargs: Mapping[str, Any], what: str) -> None:
    if kwargs:
        raise ModelError(
            f"model_kwargs={dict(kwargs)!r} given for {what}, which takes none; they apply to an "
            "import path 'package.module:factory'"
        )


def import_object(path: str, *, where: str | None = None) -> Callable[..., Any]:
    """The object ``package.module:name`` names (``name`` may be dotted: ``Class.method``).

    Raises
    ------
    ModelError
        Naming the path, where it was imported (``where``), the reason, and what to do.
    """
    on = f" on {where}" if where else ""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import {path!r}{on}: {reason(exc)}; {IMPORTABLE_HINT}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelError(
                f"cannot import {path!r}{on}: module {module_name!r} has no {attr!r}; "
                "check the name after the colon"
            ) from None
    if not callable(obj):
        raise ModelError(
            f"{path!r} is a {type(obj).__name__}, not a function or class that returns a torch.nn.Module"
        )
    return obj


def unpickle_module(source: ModelSource, *, where: str | None = None) -> nn.Module:
    """A fresh copy of an instance's model from its payload."""
    assert source.payload is not None
    try:
        module = cloudpickle.loads(source.payload)
    except Exception as exc:
        on = f" on {where}" if where else ""
        raise ModelError(
            f"cannot rebuild the {source.ref} instance{on}: {reason(exc)}; its class must be importable "
            "there (installed, or on PYTHONPATH), or save the model with torch.export.save as a .pt2 file"
        ) from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"the {source.ref} payload is a {type(module).__name__}, not a torch.nn.Module")
    return module
