"""Compiled CPU stages: frozen where it pays, in agreement with fp32, unfrozen where a build refuses.

Model: ResNet-18 with random weights (seed 0) on 32x32 inputs, 8 images. Reference:
the same model run eagerly in fp32 by plain PyTorch. Tolerances on the relative logit
error ``||stage - ref|| / ||ref||``: fp32 1e-4 (same arithmetic, other kernel order),
bf16 0.05 (8-bit mantissa), int8 0.15 (per-tensor activations, calibrated on the inputs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torchvision
from torch import nn

from dask_infer.partition.compress import CompressionError, CompressionRecipe, compress_module
from dask_infer.partition.compress.freeze import FREEZING_ENV, freezes

_TOLERANCE = {"fp32+channels_last+compile": 1e-4, "bf16+channels_last+compile": 0.05, "int8+compile": 0.15}


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Freezing on, and compiling afresh: a cache hit would skip the freezing pass these tests watch."""
    monkeypatch.setenv(FREEZING_ENV, "1")
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield


@pytest.fixture
def freeze_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count inductor's freezing passes."""
    import torch._inductor.freezing as freezing

    calls: list[int] = []
    real = freezing.freeze

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(freezing, "freeze", spy)
    return calls


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("recipe", list(_TOLERANCE))
def test_compiled_cpu_stages_are_frozen_and_agree_with_fp32(
    resnet: tuple[nn.Module, torch.Tensor, torch.Tensor], freeze_calls: list[int], recipe: str
) -> None:
    model, x, ref = resnet
    stage = compress_module(model, recipe, calibration=x if "int8" in recipe else None)
    assert stage.frozen is None  # nothing compiled before the first call
    with torch.inference_mode():  # as workers call their stages
        out = stage(x)
        again = stage(x)
    assert stage.frozen is True
    assert freeze_calls, "the stage was compiled without inductor freezing"
    assert out.dtype == torch.float32 and out.shape == ref.shape
    error = _relative_error(out, ref)
    assert error <= _TOLERANCE[recipe], f"{recipe}: relative logit error {error:.3g}"
    torch.testing.assert_close(again, out)
    agreement = float((out.argmax(1) == ref.argmax(1)).float().mean())
    if "int8" not in recipe:  # 8 random-weight images: int8 may swap a near tie
        assert agreement == 1.0


def test_a_build_that_cannot_freeze_compiles_without_it(
    resnet: tuple[nn.Module, torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch._inductor.freezing as freezing

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no fake kernel for onednn.qconv_prepack\nmore detail")

    monkeypatch.setattr(freezing, "freeze", refuse)
    model, x, ref = resnet
    stage = compress_module(model, "compile")
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        out = stage(x)
        stage(x)
    assert stage.frozen is False
    warnings = [r.getMessage() for r in caplog.records if "without inductor freezing" in r.getMessage()]
    assert len(warnings) == 1 and "onednn.qconv_prepack" in warnings[0]
    assert "\n" not in warnings[0]
    assert _relative_error(out, ref) <= 1e-4


def test_gpu_and_eager_stages_are_not_frozen(resnet: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, _ = resnet
    stage = compress_module(model, "bf16+channels_last")
    with torch.inference_mode():
        stage(x)
    assert stage.frozen is None


def test_freezing_is_on_unless_the_environment_says_0(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16, int8 = (
        CompressionRecipe.parse("bf16+channels_last+compile"),
        CompressionRecipe.parse("int8+compile"),
    )
    monkeypatch.delenv(FREEZING_ENV)
    assert freezes(int8) and freezes(bf16)
    monkeypatch.setenv(FREEZING_ENV, "0")
    assert not freezes(int8) and not freezes(bf16)
    monkeypatch.setenv(FREEZING_ENV, "yes")
    with pytest.raises(CompressionError, match=r"DASK_INFER_INDUCTOR_FREEZING='yes' .* is not 1 or 0"):
        freezes(bf16)


def test_unfrozen_compiled_stage_agrees_with_fp32(
    resnet: tuple[nn.Module, torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    freeze_calls: list[int],
) -> None:
    monkeypatch.setenv(FREEZING_ENV, "0")
    model, x, ref = resnet
    stage = compress_module(model, "bf16+channels_last+compile")
    with torch.inference_mode():
        out = stage(x)
    assert stage.frozen is None and not freeze_calls
    assert _relative_error(out, ref) <= _TOLERANCE["bf16+channels_last+compile"]
