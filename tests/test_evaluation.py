"""evaluate(): compressed vs uncompressed answers on a Zarr dataset, and the stored report.

Every agreement figure of a report is recomputed here from plain PyTorch forwards of the
same images, read from the store with xarray: the reference model straight from the
weights file, the compressed one either cast by hand (bf16) or, where the recipe needs
calibration (structured pruning), rebuilt with ``compress_stages`` on the same images.
"""

from __future__ import annotations

import copy
import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dask_infer.evaluation import REPORT_ATTR, EvaluationReport, evaluate, read_report, write_report
from dask_infer.io import write_sample
from dask_infer.models import Preprocess, build_model
from dask_infer.partition import partition_model
from dask_infer.partition.compress import CompressionError, compress_stages

FRACTION_TOL = 1e-6  # fractions of images, computed from the same logits
ERROR_REL = 1e-4  # relative logit error, float32 in the package vs float64 here


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("evaluation") / "digits.zarr")
    write_sample(path, kind="digits", size=32)
    return path


def _spread(pool: np.ndarray, n: int) -> np.ndarray:
    """``n`` entries of ``pool`` evenly spread from its first to its last (as evaluate() calibrates)."""
    return pool[np.unique(np.linspace(0, len(pool) - 1, num=min(n, len(pool))).round().astype(int))]


def _inputs(
    store: str, index: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The preprocessed images ``index`` of ``store``, checked against preprocessing written out by hand."""
    images = np.asarray(xr.open_zarr(store)["images"].values[index])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64) / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    want = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        got = Preprocess(size, tuple(mean), tuple(std))(torch.from_numpy(images))
    assert got.shape == (len(index), 3, size, size)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    return got  # the same bits evaluate() feeds, so the compressed outputs reproduce exactly


def _logits(stages: Sequence[nn.Module], x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Float64 logits of ``stages`` run in order on ``x``, ``batch_size`` images at a time."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            y = x[i : i + batch_size]
            for stage in stages:
                y = stage(y)
            out.append(y.float())
    return torch.cat(out).numpy().astype(np.float64)


def _bf16_logits(module: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Logits of ``module`` cast to bfloat16 by hand, its input cast likewise."""
    cast = copy.deepcopy(module).to(torch.bfloat16).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(cast(x[i : i + batch_size].to(torch.bfloat16)).float())
    return torch.cat(out).numpy().astype(np.float64)


def _flops(module: nn.Module, sample: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(sample)
    return int(counter.get_total_flops())


def _saved_size(module: nn.Module) -> tuple[int, int]:
    """Bytes of ``torch.save`` of the module's state_dict, raw and zlib level 1."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in module.state_dict().items()}, buffer)
    raw = buffer.getvalue()
    return len(raw), len(zlib.compress(raw, 1))


def _check_agreement(
    report: EvaluationReport, ref: np.ndarray, new: np.ndarray, labels: np.ndarray | None
) -> None:
    """Each agreement figure of ``report`` against the same figure of ``ref`` and ``new`` logits."""
    assert ref.shape == new.shape and ref.shape[0] == report.n_images
    k = min(5, ref.shape[1])
    top1_ref, top1_new = ref.argmax(1), new.argmax(1)
    top1 = float(np.mean(top1_ref == top1_new))
    # bf16 logits tie often enough that the order of equal logits matters at the k-th
    # place: take top-k as torch.topk orders them (argmax above: first maximum, as torch).
    top_ref = torch.from_numpy(ref).float().topk(k, dim=1).indices.numpy()
    top_new = torch.from_numpy(new).float().topk(k, dim=1).indices.numpy()
    top5 = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_new, strict=True)]))
    error = float(np.linalg.norm(new - ref) / np.linalg.norm(ref))
    assert report.top1_agreement == pytest.approx(top1, abs=FRACTION_TOL)
    assert report.top5_overlap == pytest.approx(top5, abs=FRACTION_TOL)
    assert report.relative_logit_error == pytest.approx(error, rel=ERROR_REL)
    if labels is None:
        assert report.accuracy_ref is None and report.accuracy is None
    else:
        assert report.accuracy_ref == pytest.approx(float(np.mean(top1_ref == labels)), abs=FRACTION_TOL)
        assert report.accuracy == pytest.approx(float(np.mean(top1_new == labels)), abs=FRACTION_TOL)


def test_evaluate_staged_plan_on_held_out_digits(digits_store: str, digits_weights: Path) -> None:
    report = evaluate(
        digits_store,
        model="resnet18",
        weights=digits_weights,
        compress="0:prune=0.3,1:bf16",
        stages=2,
        balance="flops",  # deterministic cut, so the test can rebuild the same stages
        n_images=128,
        calibration_images=64,
        batch_size=64,
    )
    assert report.selection == "held_out" and not report.calibration_overlaps
    assert (report.n_images, report.n_calibration, report.n_stages) == (128, 64, 2)

    # The first 128 held-out digits are evaluated; 64 of the others, evenly spread, calibrate.
    coords = xr.open_zarr(digits_store)
    held = coords["held_out"].values.astype(bool)
    labels = coords["label"].values.astype(np.int64)
    eval_idx = np.flatnonzero(held)[:128]
    calib_idx = _spread(np.flatnonzero(~held), 64)
    assert len(calib_idx) == 64 and not set(eval_idx) & set(calib_idx)
    loaded = build_model("resnet18", weights=digits_weights)
    assert loaded.input_size == 32
    x_eval = _inputs(digits_store, eval_idx, 32, loaded.mean, loaded.std)
    x_calib = _inputs(digits_store, calib_idx, 32, loaded.mean, loaded.std)

    ref = _logits([loaded.module], x_eval, 64)
    modules, _ = partition_model(loaded.module, 2, balance="flops", sample=(1, 3, 32, 32), repeats=1)
    parts = list(modules)
    np.testing.assert_allclose(_logits(parts, x_eval, 64), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    compressed = compress_stages(parts, "0:prune=0.3,1:bf16", calibration=x_calib, batch_size=64)
    new = _logits(compressed, x_eval, 64)
    # Only the pruning comes from the package: the bf16 stage is the fp32 stage cast by hand.
    with torch.no_grad():
        pruned = torch.cat([compressed[0](x_eval[i : i + 64]) for i in range(0, 128, 64)])
    np.testing.assert_array_equal(_bf16_logits(parts[1], pruned, 64), new)
    _check_agreement(report, ref, new, labels[eval_idx])
    assert report.accuracy_ref is not None and report.accuracy_ref >= 0.97
    assert report.accuracy is not None and 0.0 <= report.accuracy <= 1.0
    # Pruning without fine-tuning moves the answers: the figures are not trivially perfect.
    assert report.relative_logit_error > 0 and report.top5_overlap < 1.0

    first, second = report.stages
    assert first.recipe == "fp32+prune=0.3" and second.recipe == "bf16"
    # Per-stage FLOPs (one image) and saved sizes, stage by stage.
    h = x_eval[:1]
    with torch.no_grad():
        h1 = parts[0](h)
    assert first.flops_ref == _flops(parts[0], h) and second.flops_ref == _flops(parts[1], h1)
    assert first.flops_ref + second.flops_ref == _flops(loaded.module, h)
    assert first.flops == _flops(compressed[0].module, h) < first.flops_ref
    assert second.flops == second.flops_ref
    for stage, ref_stage, new_stage in zip(report.stages, parts, compressed, strict=True):
        assert (stage.size_ref, stage.size_zlib_ref) == _saved_size(ref_stage)
        assert (stage.size, stage.size_zlib) == _saved_size(new_stage.module)
    weights_bytes = sum(t.numel() * t.element_size() for t in parts[1].state_dict().values())
    assert second.size_ref >= weights_bytes and second.size < 0.6 * second.size_ref
    assert report.flops_reduction == pytest.approx(
        1 - (first.flops + second.flops) / _flops(loaded.module, h), abs=1e-12
    )
    assert report.flops_reduction > 0 and all(s.time_s > 0 and s.time_ref_s > 0 for s in report.stages)

    table = report.format()
    assert "top-1 agreement" in table and "bf16" in table
    assert f"{100 * report.top1_agreement:.2f}%" in table
    assert f"{report.relative_logit_error:.4g}" in table
    write_report(report, digits_store)
    assert read_report(digits_store) == report
    assert REPORT_ATTR in xr.open_zarr(digits_store).attrs
    assert EvaluationReport.from_dict(report.to_dict()) == report


def test_bf16_report_agrees(digits_store: str, digits_weights: Path) -> None:
    report = evaluate(digits_store, model="resnet18", weights=digits_weights, compress="bf16", n_images=256)
    assert report.selection == "held_out" and report.n_images == 256 and report.n_stages == 1

    coords = xr.open_zarr(digits_store)
    eval_idx = np.flatnonzero(coords["held_out"].values.astype(bool))[:256]
    labels = coords["label"].values.astype(np.int64)[eval_idx]
    loaded = build_model("resnet18", weights=digits_weights)
    x = _inputs(digits_store, eval_idx, loaded.input_size, loaded.mean, loaded.std)
    ref = _logits([loaded.module], x, 64)
    new = _bf16_logits(loaded.module, x, 64)
    assert len(np.unique(ref.argmax(1))) == 10  # top-1 depends on the image
    _check_agreement(report, ref, new, labels)

    assert report.top1_agreement >= 0.995
    assert 0 < report.relative_logit_error < 0.05
    assert abs(report.accuracy - report.accuracy_ref) <= 0.01  # type: ignore[operator]
    (stage,) = report.stages
    assert stage.recipe == "bf16" and stage.flops == stage.flops_ref == _flops(loaded.module, x[:1])
    assert (stage.size_ref, stage.size_zlib_ref) == _saved_size(loaded.module)
    assert (stage.size, stage.size_zlib) == _saved_size(copy.deepcopy(loaded.module).to(torch.bfloat16))
    # Speed against fp32 from the same run, and the CPU it ran on, as /proc/cpuinfo and torch see it.
    ref_rate, new_rate = report.images_per_s
    assert ref_rate == pytest.approx(report.batch_size / stage.time_ref_s)
    assert new_rate / ref_rate == pytest.approx(report.speedup)
    assert report.cpu_capability == torch.backends.cpu.get_cpu_capability()
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].splitlines()[0].split())
    assert set(report.cpu_flags) <= flags and ("avx2" in report.cpu_flags) == ("avx2" in flags)
    table = report.format()
    assert f"speed-up x{report.speedup:.2f} over fp32" in table and report.cpu_capability in table
    assert EvaluationReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_heavy_pruning_report_counts_disagreements(digits_store: str, digits_weights: Path) -> None:
    # Pruned hard enough that some answers change, so top-1 agreement and the two
    # accuracies are checked where they differ, not only where they are all equal.
    report = evaluate(
        digits_store,
        model="resnet18",
        weights=digits_weights,
        compress="prune=0.7",
        n_images=128,
        calibration_images=64,
        repeats=1,
    )
    assert report.selection == "held_out" and (report.n_images, report.n_calibration) == (128, 64)
    coords = xr.open_zarr(digits_store)
    held = coords["held_out"].values.astype(bool)
    eval_idx = np.flatnonzero(held)[:128]
    calib_idx = _spread(np.flatnonzero(~held), 64)
    loaded = build_model("resnet18", weights=digits_weights)
    x_eval = _inputs(digits_store, eval_idx, 32, loaded.mean, loaded.std)
    x_calib = _inputs(digits_store, calib_idx, 32, loaded.mean, loaded.std)
    (pruned,) = compress_stages([loaded.module], "prune=0.7", calibration=x_calib, batch_size=64)
    ref, new = _logits([loaded.module], x_eval, 64), _logits([pruned], x_eval, 64)
    _check_agreement(report, ref, new, coords["label"].values.astype(np.int64)[eval_idx])
    assert report.top1_agreement < 1.0, "pruning changed no answer: this test no longer checks disagreement"

    (stage,) = report.stages
    assert stage.recipe == "fp32+prune=0.7"
    assert stage.flops_ref == _flops(loaded.module, x_eval[:1])
    assert stage.flops == _flops(pruned.module, x_eval[:1]) < stage.flops_ref
    assert (stage.size_ref, stage.size_zlib_ref) == _saved_size(loaded.module)
    assert (stage.size, stage.size_zlib) == _saved_size(pruned.module) and stage.size < stage.size_ref


def test_unlabelled_selection_keeps_calibration_apart(small_dataset: Path, small_weights: Path) -> None:
    report = evaluate(
        str(small_dataset),
        model="resnet18",
        weights=small_weights,
        compress="bf16",
        n_images=32,
        calibration_images=16,
        batch_size=16,
    )
    assert report.selection == "first" and not report.calibration_overlaps
    assert report.n_images == 32 and report.n_calibration == 16

    # No held_out flag: the first 32 images are evaluated (the others calibrate).
    loaded = build_model("resnet18", weights=small_weights)
    x = _inputs(str(small_dataset), np.arange(32), loaded.input_size, loaded.mean, loaded.std)
    labels = xr.open_zarr(str(small_dataset))["label"].values.astype(np.int64)[:32]
    ref = _logits([loaded.module], x, 16)
    _check_agreement(report, ref, _bf16_logits(loaded.module, x, 16), labels)


def test_plan_errors_before_reading_anything(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.zarr")
    with pytest.raises(CompressionError, match=r"names stage\(s\) \[2\] but the model has 2"):
        evaluate(missing, model="resnet18", compress="0:int8,2:bf16", stages=2)
    with pytest.raises(CompressionError, match="unknown recipe term"):
        evaluate(missing, model="resnet18", compress="int4")
    with pytest.raises(CompressionError, match="int8 runs on CPU only"):
        evaluate(missing, model="resnet18", compress="1:int8", stages=2, device="cuda")


def test_evaluate_compares_several_recipes_in_one_call(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """`dask-infer evaluate --compress A --compress B`: each recipe on the same images, fp32 timed
    beside each, one table comparing them, and every report in the output's attrs."""
    from click.testing import CliRunner

    from dask_infer.cli import main
    from dask_infer.evaluation import REPORTS_ATTR, read_reports

    base = ["evaluate", "--input", str(small_dataset), "--model", "resnet18", "--weights", str(small_weights)]
    base += ["--images", "32", "--calibration-images", "16"]
    report = tmp_path / "report.zarr"
    result = CliRunner().invoke(
        main, [*base, "--compress", "fp32", "--compress", "bf16", "--output", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "recipes compared on the same 32 images:" in result.output
    table = result.output.split("recipes compared on the same 32 images:")[1]
    assert "fp32" in table and "bf16" in table and f"({REPORTS_ATTR})" in result.output
    reports = read_reports(str(report))
    assert [r.compress for r in reports] == ["fp32", "bf16"]
    fp32, bf16 = reports
    # fp32 "compressed" is the model itself: every answer the same.
    assert fp32.top1_agreement == 1.0 and fp32.relative_logit_error == 0.0
    assert bf16.relative_logit_error > 0.0 and all(r.n_images == 32 for r in reports)
    assert all(r.images_per_s[0] > 0 and r.images_per_s[1] > 0 for r in reports)
    # A bad plan among them stops the call before any recipe is evaluated.
    bad = CliRunner().invoke(main, [*base, "--compress", "bf16", "--compress", "prune=1.5"])
    assert bad.exit_code == 2 and "prune" in bad.output and "top-1 agreement" not in bad.output
