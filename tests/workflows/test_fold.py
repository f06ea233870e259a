"""Preprocessing folded into one compiled pass with stage 0's input conversion, on CPU workers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dask_infer.models import Preprocess
from dask_infer.partition.compress import CompressedStage
from dask_infer.partition.compress.recipe import CompressionRecipe
from dask_infer.workflows.fold import FOLD_ENV, FoldedPreprocess, fold_preprocessing

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _stage(recipe: str) -> CompressedStage:
    parsed = CompressionRecipe.parse(recipe)
    dtype = torch.bfloat16 if parsed.precision == "bf16" else torch.float32
    return CompressedStage(nn.Identity(), parsed, dtype=dtype, channels_last=parsed.channels_last)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, 40, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("recipe", "dtype", "channels_last", "tolerance"),
    [
        # bf16 keeps 8 bits: one unit in the last place where fused and eager round apart.
        ("bf16+channels_last+compile", torch.bfloat16, True, 1e-2),
        # int8 stages take contiguous fp32: only float reassociation separates the two.
        ("int8+compile", torch.float32, False, 1e-5),
    ],
)
def test_a_folded_pass_equals_the_eager_steps(
    recipe: str, dtype: torch.dtype, channels_last: bool, tolerance: float
) -> None:
    """Resized and cropped to 32, normalised, in stage 0's dtype and layout: a full batch and a
    smaller last one (padded, then cut back) give what the eager steps give."""
    preprocess = Preprocess(32, MEAN, STD)
    stage = _stage(recipe)
    folded = FoldedPreprocess(preprocess, stage, batch=8)
    images = _images(8)
    with torch.inference_mode():
        for n in (8, 3):
            got = folded(images[:n])
            want = stage.prepare_input(preprocess(images[:n]))
            assert got.shape == (n, 3, 32, 32) and got.dtype == dtype
            layout = torch.channels_last if channels_last else torch.contiguous_format
            assert got.is_contiguous(memory_format=layout)
            scale = float(want.float().abs().max())
            assert float((got.float() - want.float()).abs().max()) <= tolerance * scale


def _spec(transform: Any = None, source: Any = True) -> Any:
    image = SimpleNamespace(image_shape=(40, 48, 3), dtype="uint8")
    return SimpleNamespace(
        calibration=image if source else None, preprocessing=SimpleNamespace(transform=transform)
    )


def test_folded_where_stage_0_is_compiled_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    preprocess = Preprocess(32, MEAN, STD)
    cpu = torch.device("cpu")
    compiled = {0: _stage("bf16+channels_last+compile")}
    assert isinstance(fold_preprocessing(_spec(), compiled, preprocess, cpu, 4), FoldedPreprocess)
    # Kept eager: stage 0 not compiled, not held, CUDA graphs, a user's transform, an unknown
    # image shape (nothing to compile on before the run), or switched off.
    assert fold_preprocessing(_spec(), {0: _stage("bf16+channels_last")}, preprocess, cpu, 4) is preprocess
    assert fold_preprocessing(_spec(), {1: compiled[0]}, preprocess, cpu, 4) is preprocess
    graphs = {0: _stage("bf16+compile+cudagraphs")}
    assert fold_preprocessing(_spec(), graphs, preprocess, cpu, 4) is preprocess
    assert fold_preprocessing(_spec(transform=lambda x: x), compiled, preprocess, cpu, 4) is preprocess
    assert fold_preprocessing(_spec(source=False), compiled, preprocess, cpu, 4) is preprocess
    # A GPU keeps it eager unless asked (nothing touches the device on the way out).
    assert fold_preprocessing(_spec(), compiled, preprocess, torch.device("cuda"), 4) is preprocess
    monkeypatch.setenv(FOLD_ENV, " 0 ")  # read as the run's check reads it: stripped
    assert fold_preprocessing(_spec(), compiled, preprocess, cpu, 4) is preprocess
    monkeypatch.setenv(FOLD_ENV, "1")
    assert isinstance(fold_preprocessing(_spec(), compiled, preprocess, cpu, 4), FoldedPreprocess)


def test_the_first_chunk_runs_the_code_compiled_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up batch is made as the runtime makes each chunk's (from numpy, in inference
    mode), so a chunk's batch meets the compiled code's guards: no compilation inside the run."""
    import torch._dynamo.config as dynamo_config

    folded = fold_preprocessing(
        _spec(), {0: _stage("bf16+channels_last+compile")}, Preprocess(32, MEAN, STD), torch.device("cpu"), 4
    )
    assert isinstance(folded, FoldedPreprocess)
    monkeypatch.setattr(dynamo_config, "error_on_recompile", True)
    chunk = _images(6).numpy()
    with torch.inference_mode():
        for start in (0, 4):  # a full batch, then the padded last one
            batch = torch.from_numpy(chunk[start : start + 4])
            assert folded(batch).shape == (len(batch), 3, 32, 32)


@pytest.mark.gpu
def test_a_folded_pass_on_the_gpu_equals_the_eager_steps() -> None:
    """On the card, with DASK_INFER_COMPILE_PREPROCESS=1: uint8 batches in, bf16 channels-last out."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cuda = torch.device("cuda")
    preprocess = Preprocess(32, MEAN, STD).to(cuda)
    stage = _stage("bf16+channels_last+compile")
    folded = FoldedPreprocess(preprocess, stage, batch=8)
    images = _images(8).to(cuda)
    with torch.inference_mode():
        for n in (8, 5):
            got, want = folded(images[:n]), stage.prepare_input(preprocess(images[:n]))
            assert got.is_cuda and got.dtype == torch.bfloat16
            assert got.is_contiguous(memory_format=torch.channels_last)
            scale = float(want.float().abs().max())
            assert float((got.float() - want.float()).abs().max()) <= 1e-2 * scale
