"""Building a worker's stages: the model from its source and weights file, cut, compressed, warmed up.

What a worker builds is described by a :class:`RuntimeSpec`: names, import paths and files;
only a model given as an ``nn.Module`` instance travels pickled, once per worker. Building
happens once per worker and runtime (in
:meth:`~dask_infer.workflows.runtime.ModelRuntime.setup`); running the stages on the
worker's device is :mod:`dask_infer.workflows.runtime`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dask_infer.io.images import ImageSource, non_finite_pixels, read_chunk
from dask_infer.models import Preprocess, build_model
from dask_infer.models.features import tap_layer
from dask_infer.models.preprocess import PreprocessSpec
from dask_infer.models.sources import ModelSource
from dask_infer.models.tracing import running_modules
from dask_infer.partition import split_model
from dask_infer.partition.compress import CompressedStage, CompressionError, CompressionPlan, compress_stages
from dask_infer.partition.compress.auto import auto_bound, choose_recipe, is_auto
from dask_infer.partition.tail import ResizeTail

__all__ = ["RuntimeSpec", "build_stages"]


@dataclass(frozen=True)
class RuntimeSpec:
    """What a worker needs to rebuild the model: a name, an import path or a ``.pt2`` file.

    An ``nn.Module`` instance travels pickled once inside ``model`` (a
    :class:`~dask_infer.models.sources.ModelSource`), with this spec: once per worker.
    """

    model: str | ModelSource
    weights: str | None
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    outputs: tuple[str, ...]
    top_k: int
    activation: str = "softmax"
    """What makes probabilities from the output: ``softmax``, ``sigmoid`` or ``none``."""
    feature_layer: str | None = None
    """Module whose output (flattened per image) is written as ``features``."""
    batch_size: int | None = None
    device: str = "auto"
    torch_threads: int | None = None
    cut_points: tuple[str, ...] = ()
    compress: str | None = None
    calibration: ImageSource | None = None
    calibration_images: int = 64
    stage_map: tuple[tuple[str, tuple[int, ...]], ...] = ()
    """Worker address -> the stages it holds (pipelines); empty: every eligible worker holds every
    stage, so a worker that joins or is restarted (a new address) loads them like the others."""
    device_resource: str | None = None
    """Only workers with this resource hold stages (clusters that label their device workers)."""
    warmup_images: int = 0
    """Images of a blank batch run through the stages at load, so first-call costs stay out of timings."""
    preprocess: PreprocessSpec | None = None
    """What turns stored images into the model's input; ``None``: the defaults from ``input_size``,
    ``mean`` and ``std``. A ``transform`` in it travels pickled with this spec, once per worker."""
    resize_tail: ResizeTail | None = None
    """A dense model's final resize to its input's size, split off its stages (with ``cut_points``):
    applied to the last stage's output (:mod:`dask_infer.partition.tail`)."""

    @property
    def preprocessing(self) -> PreprocessSpec:
        """The preprocessing workers apply."""
        return self.preprocess or PreprocessSpec(self.input_size, self.mean, self.std)

    @property
    def model_input(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image as the model receives it."""
        return self.preprocessing.input_shape

    @property
    def label(self) -> str:
        """The model's short name, for task keys and messages."""
        return str(self.model)

    @property
    def num_stages(self) -> int:
        """Stages the model is cut into."""
        return len(self.cut_points) + 1

    def stages_for(
        self, address: str | None, resources: Mapping[str, float] | None = None
    ) -> tuple[int, ...]:
        """The stage indices the worker at ``address``, with ``resources``, loads."""
        if self.device_resource is not None and not (resources or {}).get(self.device_resource, 0):
            return ()
        if not self.stage_map:
            return tuple(range(self.num_stages))
        return dict(self.stage_map).get(address or "", ())


def _eager(stage: nn.Module) -> Callable[[torch.Tensor], Any]:
    """The stage's forward without torch.compile."""
    return stage.forward_eager if isinstance(stage, CompressedStage) else stage


@torch.inference_mode()
def _warm_up(
    stages: Sequence[nn.Module],
    held: tuple[int, ...],
    images: int,
    shape: tuple[int, int, int],
    device: torch.device,
) -> None:
    """Run a blank batch of model inputs of ``shape`` through stages ``0..max(held)``.

    Later stages need their real input shapes. Stages this worker does not hold only make
    the input of those it does: compressed ones run eagerly, so a worker never compiles a
    stage it will not run.
    """
    blank = torch.zeros((images, *shape), device=device)
    x = blank.contiguous(memory_format=torch.channels_last)
    for index, stage in enumerate(stages[: max(held) + 1]):
        x = stage(x) if index in held else _eager(stage)(x)


def _calibration(spec: RuntimeSpec, preprocess: Preprocess, device: torch.device) -> torch.Tensor | None:
    """The input's first images with finite pixels, preprocessed: what int8 recipes calibrate on.

    Read on this worker; ``None`` when there are none.
    """
    if spec.calibration is None:
        return None
    count = min(spec.calibration_images, spec.calibration.n_images)
    images = read_chunk(spec.calibration, 0, count, pooled=False)
    # An image with NaN or inf pixels would set int8 ranges and pruning scores to NaN.
    images = images[non_finite_pixels(images) == 0]
    if not len(images):
        return None
    with torch.inference_mode():
        return preprocess(torch.from_numpy(images).to(device))


def build_stages(
    spec: RuntimeSpec,
    held: tuple[int, ...],
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int,
    *,
    address: str | None = None,
) -> dict[int, nn.Module]:
    """The stages ``held`` of ``spec``'s model, on ``device``, in eval mode, ready to run.

    Compressed stages are built from all stages before them (int8 calibrates stage k on
    the outputs of stages < k), and the compiled ones among ``held`` are run once here, so
    compilation is not part of the first chunk's time. Uncompressed stages on a CPU run a blank batch
    of ``spec.warmup_images`` for the same reason. ``address`` names the worker in errors.
    """
    if not held:
        return {}
    where = f"worker {address}" if address else None
    module = build_model(spec.model, weights=spec.weights, num_classes=spec.num_classes, where=where).module
    stages = (
        list(
            split_model(
                module, list(spec.cut_points), copy_model=False, strip_tail=spec.resize_tail is not None
            )
        )
        if spec.cut_points
        else [module]
    )
    if spec.feature_layer is not None:
        # After tracing, which would call the hook with proxies; the stages share the layer's module.
        tap_layer(module, spec.feature_layer)
    shape = spec.model_input
    if spec.compress is None:
        if spec.warmup_images and device.type == "cpu":
            with running_modules():
                _warm_up(stages, held, min(spec.warmup_images, batch_size), shape, device)
        return {i: stages[i].to(device).eval() for i in held}
    if is_auto(spec.compress):
        return _build_auto(spec, stages, held, preprocess, device, batch_size)
    plan = CompressionPlan.coerce(spec.compress)
    calibration = _calibration(spec, preprocess, device) if plan.uses_calibration else None
    ordered = [s.to(device).eval() for s in stages]
    compressed = compress_stages(ordered, plan, calibration=calibration, device=device)
    compiled = [i for i in held if plan.recipe_for(i).compile]
    for i in compiled:
        stage = compressed[i]
        if isinstance(stage, CompressedStage):
            stage.pad_batches_to(batch_size)
    # CUDA graphs are recorded on the second call and replayed from the third.
    for _ in range(3 if any(plan.recipe_for(i).cuda_graphs for i in held) else 1 if compiled else 0):
        _warm_up(compressed, held, batch_size, shape, device)
    return {i: compressed[i] for i in held}


def _build_auto(
    spec: RuntimeSpec,
    stages: Sequence[nn.Module],
    held: tuple[int, ...],
    preprocess: Preprocess,
    device: torch.device,
    batch_size: int,
) -> dict[int, nn.Module]:
    """``--compress auto``: measure candidate recipes for each held stage here, keep the fastest
    accurate one (see :mod:`dask_infer.partition.compress.auto`)."""
    assert spec.compress is not None
    bound = auto_bound(spec.compress)
    data = _calibration(spec, preprocess, device)
    if data is None:
        raise CompressionError(
            "--compress auto measures agreement on the input's first images, and none has finite "
            "pixels; give a recipe such as bf16 instead"
        )
    ordered = [s.to(device).eval() for s in stages]
    out: dict[int, nn.Module] = {}
    last = len(ordered) - 1
    for index in range(max(held) + 1):
        stage: nn.Module = ordered[index]
        if index in held:
            chosen, choice = choose_recipe(
                stage,
                data,
                device=device,
                batch_size=batch_size,
                min_agreement=bound,
                stage=index,
                output_dtype=torch.float32 if index == last else None,
            )
            chosen.note_choice(choice)
            out[index] = stage = chosen
        if index < max(held):
            with torch.inference_mode():
                data = torch.cat(
                    [_eager(stage)(data[i : i + batch_size]).float() for i in range(0, len(data), batch_size)]
                )
    return out
