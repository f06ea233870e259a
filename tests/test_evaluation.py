"""evaluate(): compressed vs uncompressed answers on a Zarr dataset, and the stored report."""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray as xr

from dask_infer.evaluation import REPORT_ATTR, EvaluationReport, evaluate, read_report, write_report
from dask_infer.io.samples import write_sample
from dask_infer.partition.compress import CompressionError


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("evaluation") / "digits.zarr")
    write_sample(path, kind="digits", size=32)
    return path


def test_evaluate_staged_plan_on_held_out_digits(digits_store: str, digits_weights: Path) -> None:
    report = evaluate(
        digits_store,
        model="resnet18",
        weights=digits_weights,
        compress="0:prune=0.3,1:bf16",
        stages=2,
        n_images=128,
        calibration_images=64,
        batch_size=64,
    )
    assert report.selection == "held_out" and not report.calibration_overlaps
    assert (report.n_images, report.n_calibration, report.n_stages) == (128, 64, 2)
    assert report.accuracy_ref is not None and report.accuracy_ref >= 0.97
    assert report.accuracy is not None and 0.0 <= report.accuracy <= 1.0
    assert 0.0 <= report.top1_agreement <= 1.0 and 0.0 <= report.top5_overlap <= 1.0
    assert report.relative_logit_error > 0
    first, second = report.stages
    assert first.recipe == "fp32+prune=0.3" and second.recipe == "bf16"
    assert first.flops < first.flops_ref and second.flops == second.flops_ref
    assert second.size < 0.6 * second.size_ref
    assert report.flops_reduction > 0 and all(s.time_s > 0 for s in report.stages)
    table = report.format()
    assert "top-1 agreement" in table and "bf16" in table
    write_report(report, digits_store)
    assert read_report(digits_store) == report
    assert REPORT_ATTR in xr.open_zarr(digits_store).attrs
    assert EvaluationReport.from_dict(report.to_dict()) == report


def test_bf16_report_agrees(digits_store: str, digits_weights: Path) -> None:
    report = evaluate(digits_store, model="resnet18", weights=digits_weights, compress="bf16", n_images=256)
    assert report.top1_agreement >= 0.995
    assert report.relative_logit_error < 0.05
    assert abs(report.accuracy - report.accuracy_ref) <= 0.01  # type: ignore[operator]


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


def test_plan_errors_before_reading_anything(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.zarr")
    with pytest.raises(CompressionError, match=r"names stage\(s\) \[2\] but the model has 2"):
        evaluate(missing, model="resnet18", compress="0:int8,2:bf16", stages=2)
    with pytest.raises(CompressionError, match="unknown recipe term"):
        evaluate(missing, model="resnet18", compress="int4")
    with pytest.raises(CompressionError, match="int8 runs on CPU only"):
        evaluate(missing, model="resnet18", compress="1:int8", stages=2, device="cuda")
