"""Apply compression recipes to a model or to each of its stages.

Every compressed stage is a :class:`CompressedStage`: it takes a floating tensor of
any dtype, casts it to what the stage runs in (fp16, bf16, channels-last), and returns
a floating tensor, so stages with different recipes chain. Between two int8 stages the
tensor is uint8 instead (:mod:`~dask_infer.partition.compress.int8_boundary`). Recipes are checked for
every stage before any stage is compressed. See :mod:`dask_infer.partition.compress.recipe`
for the recipe grammar.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dask_infer.partition.compress.frames import compile_module
from dask_infer.partition.compress.freeze import FrozenCompile, compile_frozen, freezes
from dask_infer.partition.compress.int8_boundary import InputQuantization, join_int8_boundaries
from dask_infer.partition.compress.prune import check_structured, prune_structured, prune_unstructured
from dask_infer.partition.compress.quantize import (
    check_int8_device,
    compile_int8,
    int8_backend,
    quantize_int8,
)
from dask_infer.partition.compress.recipe import CompressionError, CompressionPlan, CompressionRecipe

__all__ = ["CompressedStage", "check_recipe", "compress_module", "compress_stages"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CompressedStage(nn.Module):
    """A compressed module that accepts and returns floating tensors of any dtype.

    Parameters
    ----------
    module
        The compressed module (eager, not compiled).
    recipe
        The recipe that made it.
    dtype
        Dtype the module computes in; inputs are cast to it.
    channels_last
        Convert 4-dim inputs to channels-last memory format.
    output_dtype
        Dtype of the output, or ``None`` to return the module's own dtype (cheaper
        to pass to the next stage).
    """

    def __init__(
        self,
        module: nn.Module,
        recipe: CompressionRecipe,
        *,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        output_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        # Inference only; set here, as eval() would reach an exported int8 graph, which refuses it.
        self.training = False
        self.module = module
        self.recipe = recipe
        self.dtype = dtype
        self.channels_last = channels_last
        self.output_dtype = output_dtype
        # Kept outside the module tree so the state_dict holds each weight once.
        self.__dict__["compiled"] = None
        self.__dict__["static_batch"] = None
        self.__dict__["auto_choice"] = None
        self.__dict__["input_step"] = None

    @property
    def auto_choice(self) -> Any:
        """The :class:`~dask_infer.partition.compress.auto.AutoChoice` that picked this stage's
        recipe under ``--compress auto``, else ``None``."""
        return self.__dict__["auto_choice"]

    def note_choice(self, choice: Any) -> None:
        """Record how ``--compress auto`` chose this stage's recipe."""
        self.__dict__["auto_choice"] = choice

    @property
    def input_step(self) -> InputQuantization | None:
        """The quantize step the previous int8 stage now applies for this one (its input is then
        uint8), else ``None``; see :mod:`~dask_infer.partition.compress.int8_boundary`."""
        return self.__dict__["input_step"]

    def take_quantized_input(self, step: InputQuantization) -> None:
        """Take uint8 input quantized by ``step`` (the module's graph no longer applies it)."""
        self.__dict__["input_step"] = step

    def set_compiled(self, compiled: Callable[..., Any] | None) -> None:
        """Run ``compiled`` (e.g. ``torch.compile(self.module)``) instead of the eager module."""
        self.__dict__["compiled"] = compiled

    @property
    def frozen(self) -> bool | None:
        """Whether the compiled stage runs with inductor freezing; ``None`` when not compiled for
        the CPU or not yet called."""
        compiled = self.__dict__["compiled"]
        return compiled.frozen if isinstance(compiled, FrozenCompile) else None

    def pad_batches_to(self, batch: int | None) -> None:
        """Run the compiled stage on batches of exactly ``batch`` images, padding smaller ones.

        A compiled stage is specialised to the batch size it was warmed up with; a chunk's
        last, smaller batch would otherwise compile it again, mid-run, for seconds. Padded
        images are zeros, and only the real images' outputs are returned (images do not
        interact in eval mode).
        """
        self.__dict__["static_batch"] = batch

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the dtype and memory format the module computes in (``x`` itself if it is)."""
        step = self.input_step
        if step is not None:
            # Quantized by the previous stage already, or float input quantized here the same way.
            x = x if x.dtype == step.dtype else step.apply(x.float())
        elif x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif self.recipe.quantize is not None:
            x = x.contiguous()  # the exported int8 graph is specialised to contiguous inputs
        return x

    def _run(self, x: torch.Tensor, fn: Callable[..., Any]) -> Any:
        out = fn(self.prepare_input(x))
        if self.output_dtype is not None and isinstance(out, torch.Tensor) and out.dtype != self.output_dtype:
            out = out.to(self.output_dtype)
        return out

    def forward(self, x: torch.Tensor) -> Any:
        compiled = self.__dict__["compiled"]
        if compiled is None:
            return self._run(x, self.module)
        batch, n = self.__dict__["static_batch"], x.shape[0]
        if batch is not None and 0 < n < batch:
            padded = torch.cat([x, x.new_zeros((batch - n, *x.shape[1:]))])
            return _first(self._run_compiled(padded, compiled), n)
        return self._run_compiled(x, compiled)

    def _run_compiled(self, x: torch.Tensor, compiled: Callable[..., Any]) -> Any:
        if not (self.recipe.cuda_graphs and x.is_cuda):
            return self._run(x, compiled)
        # A replay overwrites the previous replay's outputs: start a new step and keep a copy.
        torch.compiler.cudagraph_mark_step_begin()
        return _map_tensors(self._run(x, compiled), torch.Tensor.clone)

    def forward_eager(self, x: torch.Tensor) -> Any:
        """Forward without ``torch.compile`` (to count FLOPs, or before compiling pays off)."""
        return self._run(x, self.module)


def _map_tensors(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``out`` with ``fn`` applied to each tensor in it (a tensor, or a tuple, list or dict of them)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple | list):
        return type(out)(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


def _first(out: Any, n: int) -> Any:
    """The first ``n`` images of every tensor in a stage's output."""
    return _map_tensors(out, lambda t: t[:n])


def _check_calibration(calibration: torch.Tensor | None, label: str) -> None:
    if calibration is None:
        return
    if (
        not isinstance(calibration, torch.Tensor)
        or not calibration.is_floating_point()
        or calibration.ndim < 2
    ):
        raise CompressionError(
            f"calibration for {label} must be a float tensor batch (N, C, H, W) of preprocessed "
            f"images, not {type(calibration).__name__} "
            f"{tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else ''}"
        )
    if len(calibration) == 0:
        raise CompressionError(f"calibration for {label} holds no images; give at least one")


def check_recipe(
    module: nn.Module,
    recipe: CompressionRecipe,
    *,
    device: torch.device,
    has_calibration: bool,
    label: str = "the model",
) -> None:
    """Raise if ``recipe`` cannot be applied to ``module`` on ``device``; does no work.

    Raises
    ------
    CompressionError
        For int8 without calibration data, int8 off the CPU or without PT2E, bf16 or fp16 on a
        GPU that lacks it, or structured pruning of a model with nothing to prune.
    """
    if recipe.quantize == "int8":
        if not has_calibration:
            raise CompressionError(
                f"int8 for {label} needs calibration images and none were given; pass calibration= "
                "(by default a sample of the input dataset is used)"
            )
        check_int8_device(device)
        int8_backend()
    if device.type == "cuda" and recipe.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise CompressionError(f"bf16 for {label}: this GPU does not support bfloat16; use fp16")
    if recipe.prune == "structured":
        check_structured(module, label)


def compress_module(
    module: nn.Module,
    recipe: CompressionRecipe | str,
    *,
    calibration: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    output_dtype: torch.dtype | None = torch.float32,
    label: str = "the model",
) -> CompressedStage:
    """Compress a copy of ``module`` by ``recipe``; ``module`` itself is never modified.

    Steps run in this order: prune, then int8 or precision and memory format, then
    ``torch.compile`` (which compiles on first call; on a CPU with inductor freezing, see
    :mod:`dask_infer.partition.compress.freeze`).

    Parameters
    ----------
    module
        A model or stage in eval mode.
    recipe
        A :class:`CompressionRecipe` or its short form, e.g. ``"bf16"``.
    calibration
        Preprocessed float batch of what enters ``module`` (images for a whole model,
        the previous stage's activations for a later stage). Needed for int8; used by
        structured pruning to rank channels and keep their mean.
    device
        Where the compressed module runs.
    output_dtype
        Dtype of the output, or ``None`` to keep the stage's own.
    label
        How error messages name the module.

    Returns
    -------
    CompressedStage

    Raises
    ------
    CompressionError
        Before any work, if the recipe cannot be applied (see :func:`check_recipe`).
    """
    if isinstance(recipe, str):
        recipe = CompressionRecipe.parse(recipe)
    dev = torch.device(device)
    _check_calibration(calibration, label)
    check_recipe(module, recipe, device=dev, has_calibration=calibration is not None, label=label)
    work = copy.deepcopy(module).eval().to(dev)
    data = calibration.detach().to(dev, torch.float32) if calibration is not None else None
    if recipe.prune == "structured":
        prune_structured(work, recipe.prune_amount, calibration=data)
    elif recipe.prune == "unstructured":
        prune_unstructured(work, recipe.prune_amount)
    dtype = _DTYPES[recipe.precision]
    if recipe.quantize == "int8":
        assert data is not None
        work = quantize_int8(work, data)
    else:
        work = work.to(dtype)
        if recipe.channels_last:
            work = work.to(memory_format=torch.channels_last)
    stage = CompressedStage(
        work, recipe, dtype=dtype, channels_last=recipe.channels_last, output_dtype=output_dtype
    )
    if recipe.compile:
        if recipe.quantize == "int8":
            stage.set_compiled(compile_int8(work))
        else:
            mode = "reduce-overhead" if recipe.cuda_graphs else None
            frozen = dev.type == "cpu" and freezes(recipe)
            stage.set_compiled(compile_frozen(work, mode=mode) if frozen else compile_module(work, mode=mode))
    return stage


def compress_stages(
    stages: Sequence[nn.Module],
    plan: CompressionPlan | CompressionRecipe | str,
    *,
    calibration: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    int8_boundaries: bool = True,
) -> list[CompressedStage]:
    """Compress each stage by its recipe, calibrating each on its own input activations.

    ``calibration`` enters stage 0; each compressed stage's output on it becomes the
    next stage's calibration, so later stages see the inputs they will get. Given the
    same stages, plan and calibration the result is the same.

    Parameters
    ----------
    stages
        The stage modules in order (e.g. from ``partition_model``), or ``[model]``.
    plan
        A :class:`CompressionPlan`, one recipe for all stages, or the ``--compress`` string.
    calibration
        Preprocessed float NCHW images for stage 0; needed when a recipe has int8.
    device
        Where the stages run.
    batch_size
        Images per forward pass when passing calibration data through the stages.
    int8_boundaries
        Pass uint8 activations between consecutive int8 stages (the later stage's own
        quantize step, moved into the earlier one): the same numbers in a quarter of the
        bytes. ``False`` keeps fp32 between them.

    Returns
    -------
    list of CompressedStage
        All but the last return their own dtype (uint8 before an int8 stage they were
        joined to); the last returns float32.

    Raises
    ------
    CompressionError
        Before any stage is compressed: a plan naming a missing stage, int8 without
        calibration or off the CPU, structured pruning of a stage with nothing to prune.
    """
    plan = CompressionPlan.coerce(plan)
    dev = torch.device(device)
    plan.validate(len(stages))
    _check_calibration(calibration, "stage 0")
    for index, stage in enumerate(stages):
        check_recipe(
            stage,
            plan.recipe_for(index),
            device=dev,
            has_calibration=calibration is not None,
            label=f"stage {index}",
        )
    out: list[CompressedStage] = []
    data = calibration
    last = len(stages) - 1
    for index, stage in enumerate(stages):
        compressed = compress_module(
            stage,
            plan.recipe_for(index),
            calibration=data,
            device=dev,
            output_dtype=torch.float32 if index == last else None,
            label=f"stage {index}",
        )
        out.append(compressed)
        if data is not None and index < last:
            with torch.no_grad():
                data = torch.cat(
                    [
                        compressed.forward_eager(data[i : i + batch_size].to(dev)).float()
                        for i in range(0, len(data), batch_size)
                    ]
                )
    if int8_boundaries:
        joined = join_int8_boundaries(out)
        # Compiled lazily: compile the changed graphs, not the ones traced before.
        for index in sorted({k for j in joined for k in (j, j + 1)}):
            if out[index].recipe.compile:
                out[index].set_compiled(compile_int8(out[index].module))
    return out
