"""Compression recipes, and what each recipe does to the digits ResNet-18 on held-out digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dask_infer.io.samples import digits_images, digits_split
from dask_infer.models.preprocess import Preprocess
from dask_infer.models.registry import build_model
from dask_infer.partition import partition_model
from dask_infer.partition.compress import CompressedStage, CompressionError, compress_module, compress_stages
from dask_infer.partition.compress.measure import count_flops, serialized_size
from dask_infer.partition.compress.prune import find_prune_groups


def test_errors_come_before_any_work() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stages = [model]
    with pytest.raises(CompressionError, match="int8 for stage 0 needs calibration images"):
        compress_stages(stages, "int8", calibration=None)
    with pytest.raises(CompressionError, match="int8 runs on CPU only"):
        compress_stages(stages, "int8", calibration=torch.zeros(2, 3, 32, 32), device="cuda")
    with pytest.raises(CompressionError, match=r"names stage\(s\) \[1\]"):
        compress_stages(stages, "1:bf16", calibration=None)
    with pytest.raises(CompressionError, match="structured pruning found nothing to prune"):
        compress_module(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)), "prune=0.3")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_structured_pruning_respects_residuals() -> None:
    model = torchvision.models.resnet50(num_classes=10).eval()
    groups = find_prune_groups(model)
    producers = {g.producer for g in groups}
    # Inner convs of each Bottleneck are pruned, block outputs (conv3, downsample, stem) are not.
    assert "layer1.0.conv1" in producers and "layer1.0.conv2" in producers
    assert not producers & {"conv1", "layer1.0.conv3", "layer1.0.downsample.0"}
    pruned = compress_module(model, "prune=0.5", calibration=None)
    x = torch.randn(2, 3, 64, 64)
    assert pruned(x).shape == (2, 10)
    assert pruned.module.get_submodule("layer1.0.conv2").in_channels == 32
    assert pruned.module.get_submodule("layer1.0.conv3").out_channels == 256
    assert model.layer1[0].conv1.out_channels == 64


def test_structured_pruning_follows_depthwise_chains() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    groups = {g.producer: g for g in find_prune_groups(model)}
    expand = groups["features.2.conv.0.0"]  # expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> project 1x1
    assert expand.channelwise == ("features.2.conv.0.1", "features.2.conv.1.0", "features.2.conv.1.1")
    assert expand.consumer == "features.2.conv.2"
    x = torch.randn(4, 3, 32, 32)
    pruned = compress_module(model, "prune=0.25", calibration=x)
    assert pruned.module.get_submodule("features.2.conv.1.0").groups == 72
    assert pruned(x).shape == (4, 10)


# --- the digits model on held-out digits ---------------------------------------------------------


@pytest.fixture(scope="module")
def digits(digits_weights: Path) -> dict[str, torch.Tensor | nn.Module]:
    loaded = build_model("resnet18", weights=digits_weights)
    images, labels = digits_images(loaded.input_size)
    held_out = torch.from_numpy(digits_split(len(labels)))
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    with torch.no_grad():
        x = prep(torch.from_numpy(images))
        reference = loaded.module(x[held_out])
    return {
        "module": loaded.module,
        "x": x[held_out],
        "y": torch.from_numpy(labels)[held_out],
        "calibration": x[~held_out][::8],
        "reference": reference,
    }


def _logits(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([stage(x[i : i + 128]) for i in range(0, len(x), 128)]).float()


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def test_digits_model_is_accurate(digits: dict) -> None:
    assert _accuracy(digits["reference"], digits["y"]) >= 0.97


def _cpu_runs(dtype: torch.dtype) -> bool:
    try:
        nn.Conv2d(3, 4, 3).to(dtype)(torch.zeros(1, 3, 8, 8, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_agree_with_fp32(digits: dict, precision: str) -> None:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if not _cpu_runs(dtype):
        pytest.skip(f"this torch build cannot run {precision} convolutions on CPU")
    stage = compress_module(digits["module"], precision)
    assert next(stage.module.parameters()).dtype == dtype
    logits = _logits(stage, digits["x"])
    assert logits.dtype == torch.float32
    agreement = float((logits.argmax(1) == digits["reference"].argmax(1)).float().mean())
    assert agreement >= 0.995, f"{precision} agrees with fp32 on {agreement:.2%} of held-out digits"


def test_int8_keeps_accuracy_and_is_smaller(digits: dict) -> None:
    stage = compress_module(digits["module"], "int8", calibration=digits["calibration"])
    fp32_acc = _accuracy(digits["reference"], digits["y"])
    int8_acc = _accuracy(_logits(stage, digits["x"]), digits["y"])
    print(f"held-out accuracy fp32 {fp32_acc:.2%} int8 {int8_acc:.2%}")
    assert fp32_acc - int8_acc <= 0.005
    size_fp32, _ = serialized_size(digits["module"])
    size_int8, _ = serialized_size(stage.module)
    assert size_int8 < 0.4 * size_fp32
    assert any(t.dtype == torch.int8 for t in stage.module.state_dict().values())


def test_structured_pruning_cuts_flops(digits: dict) -> None:
    stage = compress_module(digits["module"], "prune=0.3", calibration=digits["calibration"])
    sample = digits["x"][:1]
    reduction = 1 - count_flops(stage.forward_eager, sample) / count_flops(digits["module"], sample)
    assert reduction >= 0.25
    assert stage.module.get_submodule("layer1.0.conv1").out_channels == 45
    logits = _logits(stage, digits["x"])
    change = _accuracy(logits, digits["y"]) - _accuracy(digits["reference"], digits["y"])
    print(f"30% structured pruning: FLOPs -{reduction:.1%}, accuracy change {100 * change:+.2f} points")
    assert torch.isfinite(logits).all()
    # Refitting the next convs on calibration data keeps the pruned net close to the original.
    assert _accuracy(logits, digits["y"]) >= 0.9


def test_unstructured_pruning_is_for_size_only(digits: dict) -> None:
    stage = compress_module(digits["module"], "prune-unstructured=0.5")
    sample = digits["x"][:1]
    assert count_flops(stage.forward_eager, sample) == count_flops(digits["module"], sample)
    weight: torch.Tensor = stage.module.get_submodule("layer2.0.conv1").weight  # type: ignore[assignment]
    assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01
    (raw, packed), (raw_ref, packed_ref) = serialized_size(stage.module), serialized_size(digits["module"])
    assert raw == pytest.approx(raw_ref, rel=0.01)
    assert packed < 0.8 * packed_ref


def test_stages_chain_and_are_deterministic(digits: dict) -> None:
    stages = partition_model(digits["module"], 2, balance="flops", sample=(1, 3, 32, 32)).modules
    x = digits["x"][:64]
    runs = []
    for _ in range(2):
        compressed = compress_stages(stages, "0:int8,1:bf16", calibration=digits["calibration"])
        assert isinstance(compressed[0], CompressedStage) and compressed[1].dtype == torch.bfloat16
        with torch.no_grad():
            runs.append(compressed[1](compressed[0](x)))
    assert runs[0].dtype == torch.float32
    assert torch.equal(runs[0], runs[1])
    agreement = float((runs[0].argmax(1) == digits["reference"][:64].argmax(1)).float().mean())
    assert agreement >= 0.98


def test_consecutive_int8_stages_pass_uint8_and_compute_the_same_numbers(digits: dict) -> None:
    """Three int8 stages: each boundary carries the next stage's own quantize step's uint8 output.

    Eager, the step is the same op on the same values, so the logits are bit-identical to
    stages that pass fp32 and quantize on receipt. A joined stage still takes fp32.
    """
    stages = partition_model(digits["module"], 3, balance="flops", sample=(1, 3, 32, 32)).modules
    x = digits["x"][:64]
    joined = compress_stages(stages, "int8", calibration=digits["calibration"])
    apart = compress_stages(stages, "int8", calibration=digits["calibration"], int8_boundaries=False)
    assert [s.input_step is not None for s in joined] == [False, True, True]
    assert all(s.input_step is None for s in apart)
    with torch.no_grad():
        a0, b0 = joined[0](x), apart[0](x)
        a1, b1 = joined[1](a0), apart[1](b0)
        assert (a0.dtype, a1.dtype, b0.dtype, b1.dtype) == (
            torch.uint8,
            torch.uint8,
            torch.float32,
            torch.float32,
        )
        assert a0.shape == b0.shape and a0.nbytes * 4 == b0.nbytes
        got, want = joined[2](a1), apart[2](b1)
        assert torch.equal(got, want)
        # fp32 in: the joined stage quantizes it by the step its graph gave up.
        assert torch.equal(joined[2](joined[1](b0)), want)
    assert _accuracy(got, digits["y"][:64]) >= _accuracy(digits["reference"][:64], digits["y"][:64]) - 0.02


def test_an_int8_stage_before_another_recipe_passes_fp32(digits: dict) -> None:
    stages = partition_model(digits["module"], 2, balance="flops", sample=(1, 3, 32, 32)).modules
    compressed = compress_stages(stages, "0:int8,1:fp32", calibration=digits["calibration"])
    assert compressed[1].input_step is None
    with torch.no_grad():
        assert compressed[0](digits["x"][:4]).dtype == torch.float32
