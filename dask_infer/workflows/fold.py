"""Preprocessing compiled with stage 0's input conversion, where stage 0 is compiled on a CPU.

Eager preprocessing makes several passes over each batch (channels to the front, to
float, scaled, normalised, then stage 0's dtype and memory format), each a separate
kernel: on two CPU cores that is about 1.7 ms per 224x224 image, as much as a third of
what a compiled int8 ResNet-50 spends per image. Compiled, the same steps are one
fused pass (about 0.5 ms). The result is stage 0's input as stage 0 would convert it, so
the stage's own conversion is then a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from dask_infer.models import Preprocess
from dask_infer.partition.compress import CompressedStage
from dask_infer.workflows.stages import RuntimeSpec

__all__ = ["FOLD_ENV", "FoldedPreprocess", "fold_preprocessing", "fold_setting"]

FOLD_ENV = "DASK_INFER_COMPILE_PREPROCESS"
"""In the workers' environment: ``0`` keeps preprocessing eager; ``1`` folds it on GPUs too."""

logger = logging.getLogger(__name__)


class FoldedPreprocess:
    """``preprocess`` then ``stage``'s input conversion, compiled for batches of ``batch`` images.

    A smaller batch (a chunk's last) is padded with blank images to ``batch`` and cut back,
    so the compiled code never meets a new shape mid-run.
    """

    def __init__(self, preprocess: Preprocess, stage: CompressedStage, batch: int) -> None:
        self.preprocess, self.stage, self.batch = preprocess, stage, batch

        def prepare(images: torch.Tensor) -> torch.Tensor:
            return stage.prepare_input(preprocess(images))

        self._compiled = torch.compile(prepare, dynamic=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if 0 < n < self.batch:
            padded = torch.cat([images, images.new_zeros((self.batch - n, *images.shape[1:]))])
            return self._compiled(padded)[:n]
        return self._compiled(images)


def fold_setting() -> str:
    """``DASK_INFER_COMPILE_PREPROCESS`` stripped: ``"1"``, ``"0"`` or ``""`` (the default).

    Raises
    ------
    RuntimeError
        The variable holds anything else.
    """
    text = os.environ.get(FOLD_ENV, "").strip()
    if text not in ("", "0", "1"):
        raise RuntimeError(
            f"{FOLD_ENV}={text!r} is not 1 or 0; set 1 to compile the preprocessing with stage 0 "
            "on every device, 0 to keep it eager, or unset it for the default"
        )
    return text


def fold_preprocessing(
    spec: RuntimeSpec,
    stages: Mapping[int, nn.Module],
    preprocess: Preprocess,
    device: torch.device,
    batch: int,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The preprocessing a worker runs before stage 0: folded and compiled where it pays, else ``preprocess``.

    Folded for a worker holding stage 0 whose recipe compiles (without CUDA graphs), with
    the built-in preprocessing (a user's ``transform`` stays as written), and when the
    stored images' shape is known, so it compiles here, before the run's clock starts, on a
    blank batch. On a CPU by default; on a GPU only with ``DASK_INFER_COMPILE_PREPROCESS=1``
    (a GPU's eager preprocessing is a few kernel launches per batch, and what folding
    changes there is measured by ``benchmarks/gpu_throughput.py`` before it becomes the
    default). ``0`` keeps it eager everywhere. A build that cannot compile it keeps it
    eager and says so in one warning line.
    """
    stage = stages.get(0)
    source = spec.calibration
    setting = fold_setting()
    if (
        setting == "0"
        or (device.type != "cpu" and setting != "1")
        or not isinstance(stage, CompressedStage)
        or not stage.recipe.compile
        or stage.recipe.cuda_graphs
        or spec.preprocessing.transform is not None
        or source is None
    ):
        return preprocess
    folded = FoldedPreprocess(preprocess, stage, batch)
    try:
        with torch.inference_mode():
            # Made inside inference mode, as the runtime makes each chunk's batch: a tensor made
            # outside it carries another dispatch key, and the first real chunk would compile again.
            blank = torch.from_numpy(np.zeros((batch, *source.image_shape), dtype=source.dtype)).to(device)
            folded(blank)
    except Exception as exc:  # an inductor that cannot build it here: eager is still right
        logger.warning("preprocessing stays eager: compiling it failed (%s: %s)", type(exc).__name__, exc)
        return preprocess
    return folded
