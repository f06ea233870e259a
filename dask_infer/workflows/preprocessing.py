"""The run's preprocessing, decided and checked on the client before any cluster starts.

The options (``bands``, ``scale``, ``resize``, ``crop``, ``interpolation``, ``mean``,
``std``, ``normalize`` or a ``transform``) win over what the weights file's metadata and
torchvision say (:class:`~dask_infer.models.LoadedModel`). Band numbers, channel counts
and the number of ``mean``/``std`` values are checked against the input and the model's
first layer; a ``transform`` is run once on the input's first images, so one that fails
does so here, in one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError, InputError, reason
from dask_infer.input_options import describe_callable
from dask_infer.io.images import ImageSource, read_chunk
from dask_infer.models import LoadedModel
from dask_infer.models.channels import input_channels
from dask_infer.models.preprocess import PreprocessSpec

__all__ = ["TRANSFORM_CHECK_IMAGES", "check_transform", "preprocess_record", "preprocess_spec"]

TRANSFORM_CHECK_IMAGES = 2
"""Images of the input (its first ones) a ``transform`` is tried on before the run."""


def _label(source: ImageSource) -> str:
    return f"input array {source.variable!r}" if source.variable else f"input {source.url!r}"


def _bands(config: RunConfig, source: ImageSource) -> tuple[int, ...] | None:
    """``config.bands`` as 0-based indices, each checked to be one of the input's bands."""
    if config.bands is None:
        return None
    count = source.channels
    outside = [b for b in config.bands if b > count]
    if outside:
        raise InputError(
            f"bands={','.join(map(str, config.bands))}: {_label(source)} has {count} band(s), numbered 1 to "
            f"{count} (bands are 1-based); band {outside[0]} does not exist"
        )
    return tuple(b - 1 for b in config.bands)


def _model_channels(loaded: LoadedModel, source: ImageSource, bands: tuple[int, ...] | None) -> int:
    """Channels the model's first layer takes; for a model without a convolution, what it is given."""
    known = input_channels(loaded.module)
    if known is not None:
        return known
    if bands is not None:
        return len(bands)
    return 3 if source.channels in (1, 3, 4) else source.channels


def _per_channel(
    name: str, given: tuple[float, ...] | None, default: tuple[float, ...], channels: int
) -> tuple[float, ...]:
    if given is None:
        return default
    if len(given) == 1:
        return given * channels
    if len(given) != channels:
        raise DaskInferError(
            f"{name}={','.join(map(str, given))} has {len(given)} values but the model takes {channels} "
            f"channel(s); give one value per channel (or one for all)"
        )
    return given


def preprocess_spec(
    config: RunConfig, loaded: LoadedModel, source: ImageSource, *, sample: np.ndarray | None = None
) -> PreprocessSpec:
    """What turns ``source``'s images into ``loaded``'s input under ``config``.

    ``sample``, (image, y, x, channel) images, is what a ``transform`` is tried on instead of
    the input's first images (for inputs that are not a Zarr store).

    Raises
    ------
    InputError
        When a band number exceeds the input's bands, or the input's channels (after
        ``bands``) are not what the model's first layer takes.
    DaskInferError
        When ``mean``/``std`` have the wrong number of values, ``resize`` is below
        ``crop``, or the ``transform`` fails on the input's first images.
    """
    bands = _bands(config, source)
    channels = _model_channels(loaded, source, bands)
    size = config.crop or loaded.input_size
    if config.transform is not None:
        spec = PreprocessSpec(
            size, loaded.mean, loaded.std, bands=bands, channels=channels, transform=config.transform
        )
        return check_transform(spec, source, sample=sample)
    given = len(bands) if bands is not None else source.channels
    rgb_compatible = channels == 3 and bands is None and given in (1, 4)
    if given != channels and not rgb_compatible:
        raise InputError(
            f"{_label(source)} has {given} channel(s) but model {loaded.name}'s first layer takes "
            f"{channels}; "
            f"pick {channels} with --bands (1-based, e.g. --bands 3,2,1), check --layout/--dims, or use a "
            f"model whose first layer takes {given}"
        )
    if config.resize is not None and config.resize < size:
        raise DaskInferError(
            f"resize={config.resize} is smaller than the crop of {size}: the centre crop would be padded; "
            f"give resize >= {size}"
        )
    return PreprocessSpec(
        size,
        _per_channel("mean", config.mean, loaded.mean, channels),
        _per_channel("std", config.std, loaded.std, channels),
        resize=config.resize,
        interpolation=config.interpolation,
        normalize=config.normalize,
        bands=bands,
        scale=config.scale,
        channels=channels,
    )


def check_transform(
    spec: PreprocessSpec, source: ImageSource, *, sample: np.ndarray | None = None
) -> PreprocessSpec:
    """Run ``spec``'s transform on the input's first images; ``spec`` with the model input shape it gives.

    ``sample``, (image, y, x, channel) images, is used instead of reading the input.

    Raises
    ------
    DaskInferError
        One line naming the transform and the batch's shape and dtype, when it raises
        or returns anything but a floating (N, C, H, W) tensor of the same N.
    """
    assert spec.transform is not None
    count = min(TRANSFORM_CHECK_IMAGES, source.n_images) if sample is None else len(sample)
    pixels = read_chunk(source, 0, count, pooled=False) if sample is None else sample
    images = torch.from_numpy(pixels)
    batch = spec.build().pick_bands(images).contiguous()
    shown = f"{tuple(batch.shape)} and dtype {str(batch.dtype).removeprefix('torch.')}"
    name = describe_callable(spec.transform)
    try:
        with torch.inference_mode():
            out = spec.transform(batch)
    except Exception as exc:
        raise DaskInferError(
            f"transform {name} failed on the input's first {count} image(s), a batch (N, C, H, W) of shape "
            f"{shown}: {type(exc).__name__}: {reason(exc)}; make it take such a batch"
        ) from exc
    fits = isinstance(out, torch.Tensor) and out.is_floating_point() and out.ndim == 4
    if not fits or len(out) != count:
        if isinstance(out, torch.Tensor):
            got = f"a {str(out.dtype).removeprefix('torch.')} tensor of shape {tuple(out.shape)}"
        else:
            got = type(out).__name__
        raise DaskInferError(
            f"transform {name} returned {got} for a batch of shape {shown}; it must return a floating "
            f"(N, C, H, W) tensor with the same N (end it with ToDtype(torch.float32, scale=True))"
        )
    return dataclasses.replace(spec, model_input=(int(out.shape[1]), int(out.shape[2]), int(out.shape[3])))


def preprocess_record(config: RunConfig, spec: PreprocessSpec) -> dict[str, Any]:
    """The run record's ``preprocess`` entry, present only when an option changed the default steps.

    Outputs written before these options existed have no such entry, and still resume.
    """
    knobs = ("bands", "scale", "resize", "crop", "mean", "std", "transform")
    changed = any(getattr(config, name) is not None for name in knobs)
    changed = changed or config.interpolation != "bilinear" or not config.normalize
    return {"preprocess": spec.describe()} if changed else {}
