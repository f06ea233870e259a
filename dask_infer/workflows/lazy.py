"""``dask_infer.predict``: a model's outputs over an in-memory or dask-backed array, as a lazy Dataset.

The images may be an ``xarray.DataArray`` (dask- or numpy-backed, dims mapped as ``run``
maps them) or a dask or numpy array. The result is an ``xarray.Dataset`` of dask arrays
with the variables, dims and coordinates ``run`` writes; nothing is read or computed
until the caller computes it. The model is a :class:`~dask_infer.workflows.runtime.ModelRuntime`
worker plugin, loaded once per worker when ``predict`` is called (without running a
forward pass), and each image chunk's model task runs in that runtime's compute
executor under the same task-group name as ``run``'s (``infer_<model>``).
Only data-parallel placement is offered: every worker holds the whole model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from distributed import Client, get_client, get_worker

from dask_infer._version import __version__
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError, InputError
from dask_infer.io.images import SUPPORTED_DTYPES, ImageSource, image_layout
from dask_infer.io.outputs import CATEGORY_DIM, FEATURE_DIM, result_dims
from dask_infer.io.stores import WRITER_ATTR
from dask_infer.models import LoadedModel, build_model
from dask_infer.models.heads import OutputShapes
from dask_infer.partition.compress import CompressionPlan
from dask_infer.workflows.environment import check_worker_environment
from dask_infer.workflows.graph import READ, infer_prefix
from dask_infer.workflows.preprocessing import TRANSFORM_CHECK_IMAGES, preprocess_spec
from dask_infer.workflows.run import output_shapes, runtime_spec
from dask_infer.workflows.runtime import ModelRuntime, compute_executor, infer_chunk, infer_chunk_here
from dask_infer.workflows.stages import RuntimeSpec

__all__ = ["PREDICT_OPTIONS", "RUNTIME_ATTR", "RuntimeHandle", "predict"]

PREDICT_OPTIONS = frozenset(
    {
        "model",
        "model_kwargs",
        "weights",
        "num_classes",
        "layout",
        "dims",
        "bands",
        "scale",
        "resize",
        "crop",
        "interpolation",
        "mean",
        "std",
        "normalize",
        "transform",
        "outputs",
        "top_k",
        "activation",
        "feature_layer",
        "batch_size",
        "device",
        "compress",
        "stages",
        "placement",
    }
)
"""The :class:`~dask_infer.config.RunConfig` fields ``predict`` takes: the model, its input, its outputs."""

RUNTIME_ATTR = "dask_infer_runtime"
"""Attr of ``predict``'s Dataset: the name of the worker plugin holding the model."""

_NO_PATH = "<array>"
"""What stands for the input and output paths in the options of an array held in memory."""

_DEFAULT_CHUNK = 64
"""Images per task for an array that is not chunked (numpy-backed)."""

_FLAGS = ("valid", "filled")


@dataclass(frozen=True)
class _Images:
    """The input as ``(image, y, x, channel)`` dask array, with what the output keeps of it."""

    data: da.Array
    label: str
    coords: dict[str, np.ndarray]
    class_names: tuple[str, ...] | None


def _config(options: dict[str, Any]) -> RunConfig:
    """The options as a validated :class:`RunConfig`; refuses what only ``run`` takes."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise DaskInferError(
            f"unknown option(s) {unknown}; predict takes: {', '.join(sorted(PREDICT_OPTIONS))}"
        )
    elsewhere = sorted(set(options) - PREDICT_OPTIONS)
    if elsewhere:
        raise DaskInferError(
            f"option(s) {elsewhere} apply to dask_infer.run, which reads and writes Zarr stores; predict "
            f"takes only {', '.join(sorted(PREDICT_OPTIONS))} (write its result with .to_zarr)"
        )
    config = RunConfig(input=_NO_PATH, output=_NO_PATH, **options)
    if config.stages > 1 or config.placement not in ("data", "auto"):
        raise DaskInferError(
            f"stages={config.stages}, placement={config.placement!r}: predict runs the whole model on every "
            "worker (data-parallel); leave stages and placement out, or use dask_infer.run for a pipeline"
        )
    if config.compress is not None and CompressionPlan.coerce(config.compress).uses_calibration:
        raise DaskInferError(
            f"compress={config.compress!r} calibrates on images, which predict does not read up front; use a "
            "recipe without int8 or structured pruning, or dask_infer.run on a Zarr store"
        )
    return config


def _image_coords(array: xr.DataArray, image_dim: str) -> dict[str, np.ndarray]:
    """The DataArray's 1-dim coordinates along its image dim, the dim's own named ``image``."""
    coords: dict[str, np.ndarray] = {}
    for name, coord in array.coords.items():
        if coord.dims != (image_dim,):
            continue
        key = "image" if name == image_dim else str(name)
        coords[f"input_{key}" if key in _FLAGS else key] = np.asarray(coord.values)
    return coords


def _as_images(images: Any, config: RunConfig) -> _Images:
    """``images`` as an ``(image, y, x, channel)`` dask array, one chunk across each image."""
    names: tuple[str, ...] | None = None
    coords: dict[str, np.ndarray] = {}
    class_names = None
    if isinstance(images, xr.DataArray):
        names = tuple(str(d) for d in images.dims)
        label = str(images.name) if images.name is not None else "images"
        raw = images.attrs.get("class_names")
        if isinstance(raw, list | tuple):
            class_names = tuple(str(c) for c in raw)
        data = images.data
    elif isinstance(images, da.Array | np.ndarray):
        label, data = "images", images
    else:
        raise InputError(
            f"predict takes an xarray.DataArray, a dask array or a numpy array of images, not "
            f"{type(images).__name__}; open a Zarr store with dask_infer.open_images or xarray.open_zarr"
        )
    shape = tuple(int(s) for s in data.shape)
    layout = image_layout(label, shape, names, layout=config.layout, dims=config.dims)
    dtype = np.dtype(data.dtype).name
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"array {label!r} has dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)} "
            "(floats are taken to lie in [0, 1]); convert it with .astype"
        )
    if 0 in shape:
        raise InputError(f"array {label!r} holds no images or images of zero size (shape {shape})")
    if isinstance(data, np.ndarray):
        data = da.from_array(data, chunks=(min(shape[0], _DEFAULT_CHUNK), *shape[1:]))
    elif not isinstance(data, da.Array):
        data = da.asarray(data)
    if names is not None:
        assert isinstance(images, xr.DataArray)
        coords = _image_coords(images, names[0])
    if layout == "NCHW":
        data = data.transpose(0, 2, 3, 1)
    elif layout == "NHW":
        data = data[..., None]
    return _Images(data.rechunk({1: -1, 2: -1, 3: -1}), label, coords, class_names)


def _stand_in(images: _Images) -> ImageSource:
    """What the preprocessing checks read of the input: its label, shape and dtype."""
    return ImageSource(
        url=_NO_PATH,
        variable=images.label,
        layout="NHWC",
        shape=tuple(int(s) for s in images.data.shape),
        dtype=np.dtype(images.data.dtype).name,
        storage_chunk=int(images.data.chunks[0][0]),
    )


def _connect(client: Client | None) -> Client:
    if client is not None:
        return client
    try:
        return get_client()
    except ValueError:
        raise DaskInferError(
            "predict needs a Dask cluster and none is connected; start one first, e.g. "
            "distributed.Client() for a local cluster, or pass client="
        ) from None


def _runtime_name(spec: RuntimeSpec) -> str:
    """A plugin name per model, weights file (and its version) and options: calls that agree share one."""
    stamp = None
    if spec.weights is not None and os.path.exists(spec.weights):
        stat = os.stat(spec.weights)
        stamp = (stat.st_size, stat.st_mtime_ns)
    return f"dask-infer-predict-{tokenize(spec, stamp)[:16]}"


def _registered(client: Client, name: str) -> bool:
    return bool(client.run_on_scheduler(lambda dask_scheduler: name in dask_scheduler.worker_plugins))


class RuntimeHandle:
    """The name of a ``predict`` runtime, as its tasks take it; the last one dropped unloads it.

    Every lazy result that can still run the model holds this object in its graph (a
    selection or a derived Dataset too). Once none does, the handle is collected and the
    worker plugin is unregistered, which frees the model on every worker. It travels to
    the workers as its plain name.
    """

    def __init__(self, name: str, client: Client) -> None:
        self.name = name
        weakref.finalize(self, _unload, client, name)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (str, (self.name,))

    def __dask_tokenize__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name


_HANDLES: weakref.WeakValueDictionary[tuple[int, str], RuntimeHandle] = weakref.WeakValueDictionary()
_HANDLES_LOCK = threading.Lock()


def _unload(client: Client, name: str) -> None:
    """Unregister the runtime ``name`` on ``client``'s cluster, from whatever thread collected its handle."""
    scheduler, loop = client.scheduler, client.loop
    if client.status not in ("running", "connecting") or scheduler is None or loop is None:
        return

    async def unregister() -> None:
        with contextlib.suppress(Exception):
            await scheduler.unregister_worker_plugin(name=name)

    with contextlib.suppress(RuntimeError):
        loop.add_callback(unregister)


def _register(client: Client, spec: RuntimeSpec) -> RuntimeHandle:
    """The runtime's handle, its plugin registered on every worker (and those that join) once.

    Calls that agree on the spec share one runtime and one handle while any of their
    results lives.
    """
    name = _runtime_name(spec)
    with _HANDLES_LOCK:
        handle = _HANDLES.get((id(client), name))
        if handle is not None and _registered(client, name):
            return handle
        client.register_plugin(ModelRuntime(spec, name), name=name)
        handle = _HANDLES[(id(client), name)] = RuntimeHandle(name, client)
        return handle


def _infer_block(images: np.ndarray, runtime: str | RuntimeHandle) -> dict[str, np.ndarray]:
    """Task body: the runtime's outputs for one image chunk, computed in its compute executor.

    The task is annotated to run there, but dask's graph optimisation may fuse it with
    the read before it, dropping the annotation; then it hands the model work over.
    """
    images = np.ascontiguousarray(images)
    runtime = str(runtime)
    executor = compute_executor(runtime)
    if threading.current_thread().name.startswith(executor):
        return infer_chunk(runtime, images)
    context = contextvars.copy_context()
    return get_worker().executors[executor].submit(context.run, infer_chunk_here, runtime, images).result()


def _take(results: dict[str, np.ndarray], name: str) -> np.ndarray:
    """One variable of a chunk's outputs."""
    return results[name]


def _variable(results: da.Array, name: str, shape: tuple[int, ...], dtype: str, token: str) -> da.Array:
    """The lazy array of output ``name`` (per-image ``shape``) from each chunk's outputs."""
    return da.map_blocks(
        _take,
        results,
        name,
        new_axis=list(range(1, 1 + len(shape))) or None,
        chunks=(results.chunks[0], *((s,) for s in shape)),
        dtype=dtype,
        meta=np.empty((0,) * (1 + len(shape)), dtype=dtype),
        name=f"{name.replace('_', '')}-{token}",
    )


def _outputs(
    config: RunConfig, shapes: OutputShapes, top_k: int
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str]]:
    """Each variable's dims after ``image``, per-image shape and dtype, as ``run`` writes them."""
    dims = result_dims(shapes.result, config.activation)
    out: dict[str, tuple[tuple[str, ...], tuple[int, ...], str]] = {}
    for name in ("logits", "probabilities"):
        if name in config.outputs:
            out[name] = (dims, shapes.result, "float32")
    if "top_k" in config.outputs:
        out["top_k_class"] = (("rank",), (top_k,), "int64")
        out["top_k_probability"] = (("rank",), (top_k,), "float32")
    if "features" in config.outputs:
        if shapes.features is None:
            raise DaskInferError(
                "outputs include 'features': give feature_layer, the module to take them from"
            )
        out["features"] = ((FEATURE_DIM,), (shapes.features,), "float32")
    return out


def _attrs(
    loaded: LoadedModel, spec: RuntimeSpec, config: RunConfig, runtime: RuntimeHandle
) -> dict[str, Any]:
    preprocess = spec.preprocessing
    return {
        WRITER_ATTR: "predictions",
        "dask_infer_version": __version__,
        "model": loaded.name,
        "weights": loaded.weights or "",
        "pretrained": loaded.pretrained,
        "input_size": preprocess.input_shape[-1],
        "normalize_mean": list(preprocess.mean),
        "normalize_std": list(preprocess.std),
        "preprocess": json.dumps(preprocess.describe()),
        "config": json.dumps({k: v for k, v in config.to_dict().items() if k in PREDICT_OPTIONS}),
        RUNTIME_ATTR: runtime.name,
    }


def _dataset(
    images: _Images,
    loaded: LoadedModel,
    spec: RuntimeSpec,
    config: RunConfig,
    shapes: OutputShapes,
    runtime: RuntimeHandle,
) -> xr.Dataset:
    """The lazy graph: read -> infer per image chunk, then one array per output."""
    data = images.data
    token = tokenize(runtime.name, data)
    read = da.map_blocks(np.ascontiguousarray, data, dtype=data.dtype, name=f"{READ}-{token}")
    with dask.annotate(executor=compute_executor(runtime.name)):
        results = da.map_blocks(
            _infer_block,
            read,
            runtime,
            drop_axis=[1, 2, 3],
            dtype=object,
            meta=np.empty((0,), dtype=object),
            name=f"{infer_prefix(loaded.name)}-{token}",
        )
    wanted = _outputs(config, shapes, spec.top_k)
    variables = {
        name: (("image", *dims), _variable(results, name, shape, dtype, token))
        for name, (dims, shape, dtype) in wanted.items()
    }
    coords: dict[str, Any] = {}
    for dims, shape, _ in wanted.values():
        coords.update({dim: np.arange(size) for dim, size in zip(dims, shape, strict=True)})
    coords.update({name: ("image", values) for name, values in images.coords.items()})
    coords.setdefault("image", np.arange(data.shape[0]))
    names = loaded.class_names or images.class_names
    scored = result_dims(shapes.result, config.activation)
    if names is not None and scored == (CATEGORY_DIM,) and len(names) == shapes.result[0]:
        coords["class_name"] = (CATEGORY_DIM, np.asarray(names, dtype=str))
    coords["valid"] = ("image", _variable(results, "valid", (), "bool", token))
    return xr.Dataset(variables, coords=coords, attrs=_attrs(loaded, spec, config, runtime))


def predict(
    images: Any,
    model: Any = None,
    weights: str | None = None,
    *,
    client: Client | None = None,
    **options: Any,
) -> xr.Dataset:
    """Predictions of a model over ``images`` as a lazy ``xarray.Dataset``; nothing is computed.

    Parameters
    ----------
    images
        An ``xarray.DataArray`` (dask- or numpy-backed), a dask array or a numpy array of
        images, the image axis first: ``(image, y, x, channel)``, ``(image, channel, y, x)``
        or ``(image, y, x)``, told by dim names (map others with ``dims``) or ``layout``.
        Each chunk along the image axis is one model task; the other axes are joined
        into one chunk.
    model
        As :func:`dask_infer.run` takes it: a torchvision name, an import path, a ``.pt2``
        file or an ``nn.Module``; ``None``: ``run``'s default.
    weights
        A state_dict or ``.safetensors`` file; ``None`` runs a randomly initialised model.
    client
        The ``distributed.Client`` whose workers load the model; default: the current
        client (``distributed.get_client()``). Without one, start it first:
        ``distributed.Client()``.
    **options
        Any of :data:`PREDICT_OPTIONS`, as :func:`dask_infer.run` takes them (``outputs``,
        ``top_k``, ``activation``, ``feature_layer``, ``bands``, ``scale``, ``transform``,
        ``dims``, ``batch_size``, ``device``, ...). A ``transform`` is tried on blank images,
        not on the input.

    Returns
    -------
    xarray.Dataset
        Dask-backed ``logits``/``probabilities`` (image, category), ``top_k_class``/
        ``top_k_probability`` (image, rank) and ``features`` (image, feature), as
        ``outputs`` asks, with the input's coordinates along its image dim (that dim's own
        as ``image``), a lazy ``valid`` flag per image, and the model and preprocessing in
        attrs; ``attrs["dask_infer_runtime"]`` names the worker plugin holding the model.
        The plugin is unregistered (the model freed on every worker) once no lazy result
        that could run it is left; ``client.unregister_worker_plugin(name)`` frees it
        sooner.

    Raises
    ------
    DaskInferError
        For options ``predict`` does not take, a pipeline placement, a compression recipe
        that calibrates, or no Dask client.
    InputError
        When the array's dims, dtype or channels do not fit the model.
    """
    given = {k: v for k, v in {"model": model, "weights": weights, **options}.items() if v is not None}
    config = _config(given)
    check_worker_environment()
    array = _as_images(images, config)
    connected = _connect(client)
    loaded = build_model(
        config.model, weights=config.weights, num_classes=config.num_classes, model_kwargs=config.model_kwargs
    )
    source = _stand_in(array)
    count = min(TRANSFORM_CHECK_IMAGES, source.n_images)
    sample = np.zeros((count, *source.image_shape), dtype=source.dtype)
    preprocessing = preprocess_spec(config, loaded, source, sample=sample)
    shapes = output_shapes(config, loaded, (), preprocessing.input_shape)
    spec = runtime_spec(config, loaded, preprocessing, shapes)
    runtime = _register(connected, spec)
    return _dataset(array, loaded, spec, config, shapes, runtime)
