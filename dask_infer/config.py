"""Frozen, validated run configuration, round-tripping through dict and YAML.

``RunConfig`` is the one list of a run's options: ``dask_infer.run`` takes its fields
as keyword arguments, the ``dask-infer run`` command builds one flag per field, and a
YAML file holds any of them; the descriptions below are the help text of all three.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dask_infer.errors import DaskInferError
from dask_infer.input_options import (
    INTERPOLATIONS,
    describe_callable,
    parse_bands,
    parse_dims,
    parse_floats,
    parse_scale,
)
from dask_infer.options import (
    ACTIVATIONS,
    BALANCE_MODES,
    DEFAULT_BALANCE,
    DEVICES,
    LAYOUTS,
    MISSING_CHUNKS,
    OUTPUT_KINDS,
    PLACEMENTS,
    check_choice,
    check_positive_int,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["RunConfig", "option_help"]

_TLS = ("tls_ca_file", "tls_cert", "tls_key")
"""The TLS options, for a ``tls://`` scheduler."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; the same fields as ``dask-infer run`` options.

    Parameters
    ----------
    input
        Zarr store of the images: a local path or an fsspec URL. Never written.
    output
        Zarr store for the predictions (local path or fsspec URL). It must not exist
        unless ``overwrite`` is set, and must not be (or lie inside) the input.
    model
        torchvision classification model name (``dask-infer models`` lists them), an import
        path ``package.module:factory`` (a function or class returning an ``nn.Module``,
        importable on every worker), a ``.pt2`` program saved with ``torch.export.save``,
        or (in Python) an ``nn.Module`` instance.
    model_kwargs
        Keyword arguments of an import path's factory (a mapping; JSON text on the command line).
    weights
        Local state_dict (``.pt``/``.pth``) or ``.safetensors`` file, or torchvision weights
        already in the local torch hub cache (``ResNet50_Weights.IMAGENET1K_V2``); ``None`` runs a
        randomly initialised model.
    num_classes
        Classifier size; by default what the weights imply (1000 without weights).
    variable
        Name of the image array in the input store, when it holds several.
    layout
        ``"NHWC"`` (image, y, x, channel), ``"NCHW"``, or ``"auto"`` to tell by names and shape.
    dims
        The input array's dim names for the roles ``image``, ``y``, ``x``, ``channel``, when
        they have other names: ``"image=time,channel=band"`` (a mapping in Python and YAML).
        Roles left out are found by their usual names.
    bands
        Input bands the model takes, 1-based, in the model's order: ``"3,2,1"`` feeds bands
        3, 2 and 1 of a multispectral store to an RGB model. ``None``: every band.
    scale
        Pixels are divided by it to lie in [0, 1] (``10000`` for uint16 reflectance);
        ``None``: 255 for uint8, 65535 for uint16, floats as they are.
    resize
        Side the shorter image side is resized to before the centre crop; ``None``: the crop.
    crop
        Side of the centre crop, the model's input size; ``None``: what the weights file's
        metadata or torchvision says.
    interpolation
        Resizing filter: ``bilinear``, ``bicubic`` (both antialiased) or ``nearest``.
    mean
        Per-channel mean subtracted after scaling (``"0.485,0.456,0.406"``; one value for
        all channels); ``None``: the weights file's, torchvision's for RGB, 0 for other counts.
    std
        Per-channel standard deviation divided by; ``None``: as for ``mean``, 1 for other counts.
    normalize
        Apply ``(x - mean) / std``; with ``False`` the model gets pixels in [0, 1].
    transform
        Python only: a callable replacing the built-in preprocessing (all but ``bands``),
        e.g. a ``torchvision.transforms.v2`` pipeline. It gets the images as one (N, C, H, W)
        tensor of their stored dtype on the worker's device and returns the model's float
        (N, C, H, W) input; it is sent to each worker once and tried on the input's first
        images before the run.
    missing_chunks
        Storage chunks absent from the input (Zarr reads them as the fill value): ``"refuse"``
        the run, naming them, or ``"fill"`` to read them as the fill value, marked in the output.
    outputs
        Which results to write: any of ``logits``, ``probabilities``, ``top_k``, ``features``;
        with ``tile``: ``mask`` (the best class per pixel), ``logits``, ``probabilities``
        (default: ``mask`` for a map, ``logits,probabilities`` for a classifier's tiles).
    top_k
        How many best classes to keep per image.
    activation
        What makes ``probabilities`` and ``top_k`` from the model's output: ``"softmax"`` (one
        class per image), ``"sigmoid"`` (multi-label) or ``"none"`` (a raw output such as a
        regression or a dense map, written as ``logits`` only).
    feature_layer
        Module of the model (a name from ``model.named_modules()``, e.g. ``avgpool``) whose
        output, flattened per image, is written as ``features`` (with ``outputs`` ``features``).
    tile
        Split each image into tiles of this side (pixels) and run the model on each: a model
        that returns a map writes per-pixel ``mask``/``logits`` on the input's own y/x grid,
        stitched from the tiles' centres; a classifier writes one prediction per tile.
        ``None``: whole images, resized to the model's input.
    halo
        Pixels of context read around each tile of a dense map and dropped after the
        forward pass, so tiles stitch without seams: a number (at most ``tile``), or ``"auto"``
        (``None`` with ``tile``) for the model's measured receptive field, rounded up to its
        output stride and capped at half the tile (at most 256).
    stride
        Step between tile origins of a classifier's tiles (at most ``tile``); ``None``: ``tile``.
    logits_dtype
        How tiled runs store ``logits``: ``float32``, or ``float16`` for half the size
        (about 3 significant digits; scores beyond 65504 become infinite).
    scale_factor
        With ``tile``: resample each whole image by this factor (``0.5`` halves its height and
        width) before tiling, with ``interpolation``; outputs lie on the resampled grid, its
        coordinates the input's resampled the same way. ``1``: the image's own pixels.
    chunk_size
        Images per task (rounded to whole storage chunks); ``None`` picks from the data.
    batch_size
        Images per forward pass inside a task; ``None`` picks by device.
    scheduler
        Address of an existing Dask scheduler; ``None`` starts a local cluster.
    scheduler_file
        JSON file a Dask scheduler wrote (``dask scheduler --scheduler-file``, dask-jobqueue);
        an alternative to ``scheduler``.
    tls_ca_file
        CA certificate (PEM file) that a ``tls://`` scheduler's and workers' certificates
        are checked against. Without the TLS options, dask's own ``distributed.comm.tls``
        config applies.
    tls_cert
        This client's certificate (PEM file), signed by that CA, for a ``tls://`` scheduler.
    tls_key
        This client's private key (PEM file); leave it out when ``tls_cert`` holds the key too.
    n_workers
        Workers of the local cluster; ``None``: one per GPU, else one. More than the GPUs
        run several worker processes per GPU, round-robin, each with its own interpreter
        for decoding and launching kernels.
    threads_per_worker
        Threads of each local worker; ``None`` picks from the machine.
    memory_limit
        Memory limit of each local worker (``"4GB"``, or bytes); its nanny restarts a worker
        that exceeds it. ``None``: the machine's memory shared between the workers.
    device
        ``"auto"`` (CUDA when the worker has it), ``"cpu"`` or ``"cuda"``.
    stages
        Split the model into this many sequential stages.
    balance
        Cost the stages are balanced by: ``time``, ``flops``, ``params`` or ``memory``.
    placement
        Where stages run: ``"data"`` (every worker holds all stages), ``"pipeline"``
        (stage k on its own worker group), ``"hybrid"`` (``replicas`` pipelines), or
        ``"auto"`` (data-parallel when the model fits one worker's device, else pipelined).
    replicas
        Pipelines side by side for ``"hybrid"``; ``None`` makes as many as the workers allow.
    rebalance
        Re-cut a pipeline after its first chunks when the slowest stage's measured time
        exceeds the mean by this factor; a pipeline with a shared boundary stage is never
        re-cut, and instead routes that stage again by the measured times after every wave
        of chunks, whatever the factor. ``None`` (or ``False``) does neither.
    report
        Write the run report here: one HTML file that opens offline (throughput, stage busy
        time, chunk latency, worker memory, plan, config), with Dask's performance report
        beside it as ``<name>.dask.html``.
    summary
        Write the run summary as JSON here.
    compress
        Compression plan: one recipe for all stages (``"bf16+channels_last"``) or per
        stage (``"0-2:int8,3-4:bf16"``); see ``dask_infer.partition.compress.recipe``.
        ``"auto"`` (``"auto=0.99"``): each worker picks, per stage, the fastest recipe its
        hardware does well whose top-1 agreement with fp32 on the input's first images is at
        least 99.5% (0.99); see ``dask_infer.partition.compress.auto``.
    calibration_images
        Images of the input (its first ones) that int8 and structured pruning calibrate on.
    overwrite
        Replace an existing output store (only one dask-infer wrote, or an empty folder).
    resume
        Finish an output an interrupted run left incomplete: only the chunks its manifest does
        not record as written are computed. Refused when the input, model, weights, recipe or
        outputs differ from the recorded run.
    progress
        Show a progress bar.
    storage_options
        fsspec options for remote stores (a mapping; JSON text on the command line).
    """

    input: str
    output: str
    model: str | nn.Module = "resnet50"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    num_classes: int | None = None
    variable: str | None = None
    layout: str = "auto"
    dims: dict[str, str] | None = None
    bands: tuple[int, ...] | None = None
    scale: float | None = None
    resize: int | None = None
    crop: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    normalize: bool = True
    transform: Callable[[Any], Any] | None = None
    missing_chunks: str = "refuse"
    outputs: tuple[str, ...] = ("logits", "top_k")
    top_k: int = 5
    activation: str = "softmax"
    feature_layer: str | None = None
    tile: int | None = None
    halo: int | str | None = None
    stride: int | None = None
    logits_dtype: str = "float32"
    scale_factor: float = 1.0
    chunk_size: int | None = None
    batch_size: int | None = None
    scheduler: str | None = None
    scheduler_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = None
    device: str = "auto"
    stages: int = 1
    balance: str = DEFAULT_BALANCE
    placement: str = "auto"
    replicas: int | None = None
    rebalance: float | None = 1.1
    report: str | None = None
    summary: str | None = None
    compress: str | None = None
    calibration_images: int = 64
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            value = getattr(self, name)
            if not value or not isinstance(value, str):
                verb = "to write" if name == "output" else "to read"
                raise DaskInferError(f"{name}={value!r}: give the path or URL of a Zarr store {verb}")
        check_choice("layout", self.layout, LAYOUTS)
        self._check_preprocessing()
        check_choice("missing_chunks", self.missing_chunks, MISSING_CHUNKS)
        check_choice("device", self.device, DEVICES)
        check_choice("balance", self.balance, BALANCE_MODES)
        check_choice("placement", self.placement, PLACEMENTS)
        if self.scheduler is not None and self.scheduler_file is not None:
            raise DaskInferError(
                f"scheduler={self.scheduler!r} and scheduler_file={self.scheduler_file!r} both given; "
                "give one of them"
            )
        if self.resume is True and self.overwrite is True:
            raise DaskInferError(
                "resume=True and overwrite=True both given; resume keeps the output, keep one"
            )
        if self.replicas is not None and self.placement != "hybrid":
            raise DaskInferError(
                f"replicas={self.replicas!r} applies to placement='hybrid' only, not {self.placement!r}"
            )
        if self.rebalance is False:
            object.__setattr__(self, "rebalance", None)
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
        outputs = tuple([self.outputs] if isinstance(self.outputs, str) else self.outputs)
        bad = [o for o in outputs if o not in OUTPUT_KINDS]
        if bad or not outputs:
            raise DaskInferError(
                f"outputs={list(outputs)!r}: choose one or more of {', '.join(OUTPUT_KINDS)}"
            )
        object.__setattr__(self, "outputs", tuple(dict.fromkeys(outputs)))
        check_choice("activation", self.activation, ACTIVATIONS)
        self._check_tiles()
        self._check_heads()
        if self.compress is not None:
            # Imported here: the recipe's package imports torch, which the CLI's --help and
            # `models` would otherwise pay for at every start.
            from dask_infer.partition.compress.auto import auto_bound, is_auto
            from dask_infer.partition.compress.recipe import CompressionPlan

            if is_auto(self.compress):
                object.__setattr__(self, "compress", f"auto={auto_bound(str(self.compress)):g}")
            else:
                plan = CompressionPlan.coerce(self.compress)
                plan.validate(self.stages)
                object.__setattr__(self, "compress", None if plan.is_identity else plan.to_string())
        for name in ("top_k", "stages", "calibration_images"):
            check_positive_int(name, getattr(self, name))
        for name in (
            "num_classes",
            "chunk_size",
            "batch_size",
            "n_workers",
            "threads_per_worker",
            "replicas",
        ):
            check_positive_int(name, getattr(self, name), optional=True)
        for name in ("overwrite", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise DaskInferError(f"{name}={getattr(self, name)!r} must be true or false")
        _check_model(self.model, self.model_kwargs)
        texts = ("weights", "variable", "scheduler", "scheduler_file", "report", "summary")
        for name in (*texts, *_TLS):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise DaskInferError(f"{name}={value!r} must be text")
        self._check_tls()
        _check_memory_limit(self.memory_limit)
        if not isinstance(self.storage_options, dict):
            raise DaskInferError(
                f"storage_options={self.storage_options!r} must be a mapping of fsspec options, "
                'e.g. {"anon": true}'
            )

    def _check_heads(self) -> None:
        """``features`` goes with a ``feature_layer``, and ``activation="none"`` with raw outputs only."""
        layer = self.feature_layer
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise DaskInferError(f"feature_layer={layer!r} must name a module of the model, e.g. 'avgpool'")
        if "features" in self.outputs and layer is None:
            raise DaskInferError(
                "outputs include 'features' but no feature_layer is given; name the layer, "
                "e.g. --feature-layer avgpool"
            )
        if layer is not None and "features" not in self.outputs:
            raise DaskInferError(
                f"feature_layer={layer!r} given but outputs={list(self.outputs)} lack 'features'; "
                "add it, e.g. --outputs features or --outputs logits,features"
            )
        scored = [o for o in self.outputs if o in ("probabilities", "top_k")]
        if self.activation == "none" and scored:
            raise DaskInferError(
                f"activation='none' writes the model's raw output, but outputs include {', '.join(scored)}, "
                "which need softmax or sigmoid; pass --outputs logits (and/or features)"
            )

    def _check_tiles(self) -> None:
        """The tile options in canonical form; ``mask``, float16 logits and resampling only with a tile.

        What else goes with tiles (outputs, preprocessing, placement) is checked by the
        tiled run once the model is known, before any cluster starts.
        """
        from dask_infer.tiles.options import check_logits_dtype, check_scale_factor, check_tile_options

        tile, halo, _ = check_tile_options(self.tile, self.halo, self.stride)
        object.__setattr__(self, "halo", halo)
        check_logits_dtype(self.logits_dtype, tile)
        object.__setattr__(self, "scale_factor", check_scale_factor(self.scale_factor, tile))
        if tile is None and "mask" in self.outputs:
            raise DaskInferError(
                "outputs include 'mask', which tiled runs write; give --tile (e.g. --tile 512)"
            )

    def _check_preprocessing(self) -> None:
        """Input and preprocessing options in canonical form; a transform without the knobs it replaces."""
        object.__setattr__(self, "dims", parse_dims(self.dims))
        object.__setattr__(self, "bands", parse_bands(self.bands))
        object.__setattr__(self, "scale", parse_scale(self.scale))
        object.__setattr__(self, "mean", parse_floats("mean", self.mean))
        object.__setattr__(self, "std", parse_floats("std", self.std, positive=True))
        check_positive_int("resize", self.resize, optional=True)
        check_positive_int("crop", self.crop, optional=True)
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        if not isinstance(self.normalize, bool):
            raise DaskInferError(f"normalize={self.normalize!r} must be true or false")
        if self.transform is None:
            return
        if not callable(self.transform):
            raise DaskInferError(
                f"transform={self.transform!r} is not callable; pass a function or a "
                "torchvision.transforms.v2 pipeline in Python (the command line and YAML take "
                "--resize, --crop, --mean, --std instead)"
            )
        replaced = [
            name for name in ("scale", "resize", "crop", "mean", "std") if getattr(self, name) is not None
        ]
        replaced += ["interpolation"] if self.interpolation != "bilinear" else []
        replaced += ["normalize"] if not self.normalize else []
        if replaced:
            raise DaskInferError(
                f"transform given with {', '.join(replaced)}: the transform replaces the built-in "
                "preprocessing; do that inside the transform, or leave the transform out"
            )

    def _check_tls(self) -> None:
        """TLS options go with a scheduler that is not local, and a key with its certificate."""
        given = [name for name in _TLS if getattr(self, name) is not None]
        if not given:
            return
        if self.scheduler is None and self.scheduler_file is None:
            raise DaskInferError(
                f"{given[0]}={getattr(self, given[0])!r} applies to a tls:// scheduler; give --scheduler "
                "tls://HOST:PORT or --scheduler-file (a local cluster listens on 127.0.0.1 only)"
            )
        if self.scheduler is not None and not self.scheduler.startswith(("tls://", "wss://")):
            raise DaskInferError(
                f"{given[0]} given but scheduler={self.scheduler!r} is not encrypted; "
                "use its tls:// address, or leave the TLS options out"
            )
        if self.tls_key is not None and self.tls_cert is None:
            raise DaskInferError(f"tls_key={self.tls_key!r} given without tls_cert; give the certificate too")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and YAML-safe dict of every field."""
        # An instance is recorded by its class path; the run's attrs add a hash of its state_dict.
        out = dataclasses.asdict(self.replace(transform=None, model=_model_text(self.model)))
        out["outputs"] = list(self.outputs)
        for name in ("bands", "mean", "std"):
            out[name] = list(out[name]) if out[name] is not None else None
        out["transform"] = describe_callable(self.transform) if self.transform is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from a dict; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DaskInferError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(names))}")
        return cls(**data)

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        """Read a YAML file; ``overrides`` (those not ``None``) win over the file."""
        p = Path(path)
        if not p.is_file():
            raise DaskInferError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DaskInferError(
                f"config file {str(path)!r} is not plain YAML ({first}); write options as key: value"
            ) from None
        if not isinstance(data, dict):
            raise DaskInferError(f"config file {str(path)!r} must hold a mapping of options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def _model_text(model: Any) -> str:
    """``model`` itself when it is text, else its class path ``package.module.Class``."""
    return model if isinstance(model, str) else f"{type(model).__module__}.{type(model).__qualname__}"


def _check_model(model: Any, kwargs: Any) -> None:
    """``model`` is text or an ``nn.Module``; ``kwargs`` a mapping with text keys."""
    torch_nn = sys.modules.get("torch.nn")
    if not isinstance(model, str) and not (torch_nn is not None and isinstance(model, torch_nn.Module)):
        raise DaskInferError(
            f"model={model!r} must be text (a torchvision name, 'package.module:factory' or a .pt2 file) "
            "or a torch.nn.Module"
        )
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise DaskInferError(
            f"model_kwargs={kwargs!r} must be a mapping of the factory's keyword arguments, "
            'e.g. {"num_classes": 10}'
        )


def _check_memory_limit(value: Any) -> None:
    """Raise unless ``value`` is ``None``, a whole number of bytes >= 1, or text like ``"4GB"``."""
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    if isinstance(value, str):
        from dask.utils import parse_bytes

        try:
            if parse_bytes(value) >= 1:
                return
        except (ValueError, TypeError):
            pass
    raise DaskInferError(f"memory_limit={value!r} must be a size such as '4GB' or '512MiB', or bytes")


@cache
def option_help() -> dict[str, str]:
    """Each ``RunConfig`` field's description from its docstring, as one plain line.

    The CLI's help text and ``dask_infer.run``'s docstring come from here, so an
    option is described once.
    """
    doc = RunConfig.__doc__ or ""
    body = doc.split("Parameters\n    ----------\n", 1)[1]
    out: dict[str, str] = {}
    names: list[str] = []
    for line in body.splitlines():
        if line.startswith("    ") and not line.startswith("        ") and line.strip():
            names = [n.strip() for n in line.split(",")]
            for n in names:
                out[n] = ""
        elif line.startswith("        ") and names:
            for n in names:
                out[n] = (out[n] + " " + line.strip()).strip()
    return {name: re.sub(r"``([^`]*)``", r"\1", text) for name, text in out.items()}
