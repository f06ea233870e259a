"""Building a worker's stages from a RuntimeSpec, compared with the whole model run in one piece."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.images import describe_source
from dask_infer.models import Preprocess, build_model
from dask_infer.partition import partition_model
from dask_infer.partition.compress import compress_stages
from dask_infer.workflows.runtime import StageStats
from dask_infer.workflows.stages import RuntimeSpec, _calibration, build_stages
from tests.conftest import random_images


def _spec(weights: Path, **kw: object) -> RuntimeSpec:
    loaded = build_model("resnet18", weights=str(weights))
    base = {
        "model": "resnet18",
        "weights": str(weights),
        "num_classes": loaded.num_classes,
        "input_size": loaded.input_size,
        "mean": loaded.mean,
        "std": loaded.std,
        "outputs": ("logits",),
        "top_k": 5,
    }
    return RuntimeSpec(**{**base, **kw})  # type: ignore[arg-type]


def test_a_worker_builds_only_its_stages_and_they_chain_to_the_whole_model(small_weights: Path) -> None:
    loaded = build_model("resnet18", weights=str(small_weights))
    cuts = tuple(partition_model(loaded.module, 3, balance="flops", sample=(1, 3, 32, 32)).plan.cut_points)
    spec = _spec(small_weights, cut_points=cuts, stage_map=(("tcp://a", (0, 1)), ("tcp://b", (2,))))
    assert spec.num_stages == 3 and spec.stages_for("tcp://b") == (2,) and spec.stages_for("tcp://c") == ()
    prep = Preprocess(spec.input_size, spec.mean, spec.std)
    cpu = torch.device("cpu")
    first = build_stages(spec, spec.stages_for("tcp://a"), prep, cpu, batch_size=4)
    last = build_stages(spec, spec.stages_for("tcp://b"), prep, cpu, batch_size=4)
    assert sorted(first) == [0, 1] and sorted(last) == [2]
    assert all(not m.training for m in [*first.values(), *last.values()])
    x = prep(torch.from_numpy(random_images(6)))
    with torch.inference_mode():
        chained = last[2](first[1](first[0](x)))
        whole = loaded.module(x)
    assert torch.equal(chained, whole)
    assert build_stages(spec, (), prep, cpu, batch_size=4) == {}


def test_int8_calibrates_on_the_input_read_where_it_is_built(small_weights: Path, tmp_path: Path) -> None:
    """The worker reads the input's first images itself; the result equals compressing in process on them."""
    images = random_images(24, seed=5)
    write_image_dataset(str(tmp_path / "in.zarr"), images, chunk=8)
    source = describe_source(str(tmp_path / "in.zarr"))
    spec = _spec(small_weights, compress="int8", calibration=source, calibration_images=16)
    prep = Preprocess(spec.input_size, spec.mean, spec.std)
    built = build_stages(spec, (0,), prep, torch.device("cpu"), batch_size=8)
    reference = compress_stages(
        [build_model("resnet18", weights=str(small_weights)).module],
        "int8",
        calibration=prep(torch.from_numpy(images[:16])),
    )
    x = prep(torch.from_numpy(random_images(8, seed=6)))
    with torch.inference_mode():
        np.testing.assert_array_equal(built[0](x).numpy(), reference[0](x).numpy())


def test_calibration_leaves_out_images_with_nan_or_inf_pixels(small_weights: Path, tmp_path: Path) -> None:
    """int8 ranges from an image holding NaN would be NaN: calibration reads only the finite images."""
    images = random_images(16, seed=7).astype(np.float32) / 255
    images[3, 0, 0, 0] = np.nan
    images[9, 5, 5, 1] = np.inf
    write_image_dataset(str(tmp_path / "f.zarr"), images, chunk=8)
    spec = _spec(small_weights, compress="int8", calibration=describe_source(str(tmp_path / "f.zarr")))
    prep = Preprocess(spec.input_size, spec.mean, spec.std)
    got = _calibration(spec, prep, torch.device("cpu"))
    assert got is not None and len(got) == 14 and bool(torch.isfinite(got).all())
    finite = np.delete(images, [3, 9], axis=0)
    torch.testing.assert_close(got, prep(torch.from_numpy(finite)), rtol=0, atol=0)


def test_stage_stats_count_chunks_only_with_images() -> None:
    stats = StageStats()
    stats.add(busy_s=0.5, work_s=0.25)
    stats.add(images=8, busy_s=1.0, work_s=0.75)
    assert stats == StageStats(chunks=1, images=8, busy_s=1.5, work_s=1.0)


def test_a_worker_compiles_only_the_stages_it_holds(small_weights: Path) -> None:
    """A pipeline's stage-0 worker runs stage 0 only: it must not pay for compiling stage 1."""
    from torch._dynamo.utils import counters

    loaded = build_model("resnet18", weights=str(small_weights))
    cuts = tuple(partition_model(loaded.module, 2, balance="flops", sample=(1, 3, 32, 32)).plan.cut_points)
    spec = _spec(small_weights, cut_points=cuts, compress="1:compile")
    prep = Preprocess(spec.input_size, spec.mean, spec.std)
    before = counters["stats"]["unique_graphs"]
    first = build_stages(spec, (0,), prep, torch.device("cpu"), batch_size=2)
    assert sorted(first) == [0] and counters["stats"]["unique_graphs"] == before
    second = build_stages(spec, (1,), prep, torch.device("cpu"), batch_size=2)
    assert counters["stats"]["unique_graphs"] > before
    x = prep(torch.from_numpy(random_images(2, seed=9)))
    with torch.inference_mode():
        got, want = second[1](first[0](x)), loaded.module(x)
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_data_parallel_specs_hold_by_resource_not_address(small_weights: Path) -> None:
    """Without a stage map any worker (one restarted or added mid-run, at a new address) holds
    every stage; on a cluster that labels its device workers, only those do."""
    spec = _spec(small_weights, cut_points=("layer2",))
    assert spec.stages_for("tcp://new:1") == (0, 1)
    labelled = _spec(small_weights, cut_points=("layer2",), device_resource="GPU")
    assert labelled.stages_for("tcp://new:1", {"GPU": 1.0}) == (0, 1)
    assert labelled.stages_for("tcp://cpu-only:1", {}) == () and labelled.stages_for("tcp://x:1") == ()
