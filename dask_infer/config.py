"""Frozen, validated run configuration, round-tripping through dict and YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dask_infer.errors import DaskInferError

__all__ = ["OUTPUT_KINDS", "PLACEMENTS", "RunConfig"]

OUTPUT_KINDS = ("logits", "probabilities", "top_k")
_LAYOUTS = ("auto", "NHWC", "NCHW")
_DEVICES = ("auto", "cpu", "cuda")
_BALANCES = ("time", "flops", "params", "memory")
PLACEMENTS = ("auto", "data", "pipeline", "hybrid")


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise DaskInferError(f"{name}={value!r} must be a whole number >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; the same fields as ``dask-infer run`` options.

    Parameters
    ----------
    input, output
        Zarr stores (local paths or fsspec URLs). The output must not exist unless
        ``overwrite`` is set, and must not be (or lie inside) the input.
    model
        torchvision classification model name.
    weights
        Local state_dict (``.pt``/``.pth``) or ``.safetensors`` file; ``None`` runs a
        randomly initialised model.
    num_classes
        Classifier size; by default what the weights imply (1000 without weights).
    variable
        Name of the image array in the input store, when it holds several.
    layout
        ``"NHWC"`` (image, y, x, channel), ``"NCHW"``, or ``"auto"`` to tell by names and shape.
    outputs
        Which results to write: any of ``logits``, ``probabilities``, ``top_k``.
    top_k
        How many best classes to keep per image.
    chunk_size
        Images per task (rounded to whole storage chunks); ``None`` picks from the data.
    batch_size
        Images per forward pass inside a task; ``None`` picks by device.
    scheduler
        Address of an existing Dask scheduler; ``None`` starts a local cluster.
    n_workers, threads_per_worker
        Size of the local cluster; ``None`` picks from the machine.
    device
        ``"auto"`` (CUDA when the worker has it), ``"cpu"`` or ``"cuda"``.
    stages, balance
        Split the model into this many sequential stages, balanced by this cost.
    placement
        Where stages run: ``"data"`` (every worker holds all stages), ``"pipeline"``
        (stage k on its own worker group), ``"hybrid"`` (``replicas`` pipelines), or
        ``"auto"`` (data-parallel when the model fits one worker's device, else pipelined).
    replicas
        Pipelines side by side for ``"hybrid"``; ``None`` makes as many as the workers allow.
    rebalance
        Re-cut a pipeline after its first chunks when the slowest stage's measured time
        exceeds the mean by this factor; ``None`` never re-cuts.
    report
        Write a ``distributed.performance_report`` HTML file here.
    summary
        Write the run summary as JSON here.
    compress
        Compression plan: one recipe for all stages (``"bf16+channels_last"``) or per
        stage (``"0-2:int8,3-4:bf16"``); see ``dask_infer.partition.recipe``.
    calibration_images
        Images of the input (its first ones) that int8 recipes calibrate on.
    overwrite
        Replace an existing output store.
    progress
        Show a progress bar.
    storage_options
        fsspec options for remote stores.
    """

    input: str
    output: str
    model: str = "resnet50"
    weights: str | None = None
    num_classes: int | None = None
    variable: str | None = None
    layout: str = "auto"
    outputs: tuple[str, ...] = ("logits", "top_k")
    top_k: int = 5
    chunk_size: int | None = None
    batch_size: int | None = None
    scheduler: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    device: str = "auto"
    stages: int = 1
    balance: str = "time"
    placement: str = "auto"
    replicas: int | None = None
    rebalance: float | None = 1.1
    report: str | None = None
    summary: str | None = None
    compress: str | None = None
    calibration_images: int = 64
    overwrite: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.input or not isinstance(self.input, str):
            raise DaskInferError(f"input={self.input!r}: give the path or URL of a Zarr store")
        if not self.output or not isinstance(self.output, str):
            raise DaskInferError(f"output={self.output!r}: give the path or URL of a Zarr store to write")
        if self.layout not in _LAYOUTS:
            raise DaskInferError(f"layout={self.layout!r} is not one of {', '.join(_LAYOUTS)}")
        if self.device not in _DEVICES:
            raise DaskInferError(f"device={self.device!r} is not one of {', '.join(_DEVICES)}")
        if self.balance not in _BALANCES:
            raise DaskInferError(f"balance={self.balance!r} is not one of {', '.join(_BALANCES)}")
        if self.placement not in PLACEMENTS:
            raise DaskInferError(f"placement={self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.replicas is not None and self.placement != "hybrid":
            raise DaskInferError(
                f"replicas={self.replicas!r} applies to placement='hybrid' only, not {self.placement!r}"
            )
        if self.rebalance is not None and (
            isinstance(self.rebalance, bool)
            or not isinstance(self.rebalance, int | float)
            or not self.rebalance >= 1.0
        ):
            raise DaskInferError(
                f"rebalance={self.rebalance!r} must be a max/mean stage time ratio >= 1.0 (e.g. 1.25), "
                "or None to never re-cut"
            )
        if self.report is not None and not str(self.report).endswith((".html", ".htm")):
            raise DaskInferError(f"report={self.report!r} must name an .html file")
        outputs = tuple(self.outputs)
        bad = [o for o in outputs if o not in OUTPUT_KINDS]
        if bad or not outputs:
            raise DaskInferError(
                f"outputs={list(outputs)!r}: choose one or more of {', '.join(OUTPUT_KINDS)}"
            )
        object.__setattr__(self, "outputs", tuple(dict.fromkeys(outputs)))
        if self.compress is not None:
            from dask_infer.partition.recipe import CompressionPlan

            plan = CompressionPlan.coerce(self.compress)
            plan.validate(self.stages)
            object.__setattr__(self, "compress", None if plan.is_identity else plan.to_string())
        for name in (
            "top_k",
            "chunk_size",
            "batch_size",
            "n_workers",
            "threads_per_worker",
            "stages",
            "calibration_images",
            "replicas",
        ):
            _positive(name, getattr(self, name))
        _positive("num_classes", self.num_classes)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and YAML-safe dict of every field."""
        out = dataclasses.asdict(self)
        out["outputs"] = list(self.outputs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DaskInferError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(names))}")
        values = dict(data)
        if "outputs" in values:
            outs = values["outputs"]
            values["outputs"] = tuple([outs] if isinstance(outs, str) else outs)
        return cls(**values)

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a YAML file; ``overrides`` (those not ``None``) win over the file."""
        p = Path(path)
        if not p.is_file():
            raise DaskInferError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise DaskInferError(f"config file {str(path)!r} must hold a mapping of options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)
