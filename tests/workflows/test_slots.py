"""One-thread workers read the next chunk while their model runs: model tasks give their thread back.

A worker runs at most as many tasks as it has threads, whichever executor runs them. The
model runs on the runtime's own compute executor; were its task counted against the
worker's one thread, no read could run beside it, and a chunk's read would wait for the
model task before it to end. Measured with ResNet-18 at 224 on a one-thread worker (chunks
of 8, 330 ms each): every other model task started 20-60 ms late, waiting for its read.
Data-parallel reads are root tasks the scheduler hands out by free thread slots, which
is where that showed; a pipeline's reads are pinned to stage 0's workers and fed in a
window, so there the test guards that stage tasks giving their thread back still read
ahead and compute the whole model's logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client, LocalCluster, get_task_stream

import dask_infer
from dask_infer.io import write_image_dataset
from tests.conftest import SMALL_SIZE, random_images
from tests.own_models import trained_like
from tests.reference import assert_close_logits, run_small

NUM_CLASSES = 5
CHUNK = 2
CHUNKS = 8
MODEL_SECONDS = 0.3


@pytest.fixture(scope="module")
def one_thread_workers() -> Iterator[Client]:
    """Two worker processes of one thread each."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slots") / "images.zarr"
    write_image_dataset(str(path), random_images(CHUNK * CHUNKS), chunk=CHUNK)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slots") / "slow.pt"
    model = trained_like(num_classes=NUM_CLASSES)
    torch.save({"state_dict": model.state_dict(), "meta": {"input_size": SMALL_SIZE}}, path)
    return path


def _plain_logits(pixels: np.ndarray) -> np.ndarray:
    """A plain forward of the same weights on the same images, ImageNet-normalised."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.inference_mode():
        return trained_like(num_classes=NUM_CLASSES)((x - mean) / std).numpy()


def _compute(task: dict[str, Any]) -> tuple[float, float]:
    return next((s["start"], s["stop"]) for s in task["startstops"] if s["action"] == "compute")


@pytest.mark.parametrize(
    "how", [pytest.param({}, id="data"), pytest.param({"stages": 2, "placement": "pipeline"}, id="pipeline")]
)
def test_a_one_thread_worker_reads_the_next_chunk_while_its_model_runs(
    one_thread_workers: Client, images: Path, weights: Path, tmp_path: Path, how: dict[str, Any]
) -> None:
    out = tmp_path / "out.zarr"
    with get_task_stream(one_thread_workers) as stream:
        dask_infer.run(
            str(images),
            str(out),
            model="tests.own_models:slow_cnn",
            model_kwargs={"num_classes": NUM_CLASSES, "seconds": MODEL_SECONDS},
            weights=str(weights),
            client=one_thread_workers,
            chunk_size=CHUNK,
            batch_size=CHUNK,
            balance="flops",
            rebalance=None,
            progress=False,
            echo=None,
            **how,
        )
    pixels = np.asarray(xr.open_zarr(images)["images"].values)
    assert_close_logits(xr.open_zarr(out)["logits"].values, _plain_logits(pixels))

    def chunk(task: dict[str, Any]) -> int:
        return int(str(task["key"]).rsplit("-", 1)[1])

    reads = {chunk(t): _compute(t) for t in stream.data if str(t["key"]).startswith("read-")}
    # The model tasks that take a chunk's pixels: the whole model's, or stage 0's.
    takes_pixels = ("infer_slow_cnn", "s0_slow_cnn")
    first_model = [t for t in stream.data if str(t["key"]).split("-", 1)[0] in takes_pixels]
    assert len(first_model) == CHUNKS and len(reads) == CHUNKS
    late = []
    for worker in {t["worker"] for t in first_model}:
        mine = sorted((t for t in first_model if t["worker"] == worker), key=lambda t: _compute(t)[1])
        for before, task in zip(mine, mine[1:], strict=False):
            # Read before the model task ahead of it on the same worker ended: no wait for it.
            if reads[chunk(task)][1] > _compute(before)[1]:
                late.append((chunk(task), round(reads[chunk(task)][1] - _compute(before)[1], 3)))
    assert not late, f"chunks whose read ended after the model task before them (s late): {late}"


def test_a_one_thread_stage_worker_goes_on_computing_while_it_profiles_a_recut(
    one_thread_workers: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """A re-cut is profiled on a stage-0 worker and takes a while; there, the stage-0 tasks of
    the chunks in flight keep running meanwhile. The re-cut task outranks the pipeline's
    tasks, so it starts at once rather than after the last chunk's stage 0, and leaves the
    worker's one thread slot (``distributed.secede``), as model tasks do, so stage 0 goes on."""
    with get_task_stream(one_thread_workers) as stream:
        summary = run_small(
            one_thread_workers,
            small_dataset,
            tmp_path / "pipe.zarr",
            small_weights,
            chunk_size=4,
            batch_size=4,
            stages=2,
            placement="pipeline",
            # Cut by parameters, which leaves most of ResNet-18's time in stage 0: re-cut.
            balance="params",
            rebalance=1.25,
        )
    assert summary.rebalance is not None and summary.rebalance["recut"], summary.rebalance
    (recut,) = [t for t in stream.data if str(t["key"]).startswith("recut_")]
    start, stop = _compute(recut)
    here = [t for t in stream.data if t["worker"] == recut["worker"]]
    beside = [t for t in here if str(t["key"]).startswith("s0_") and start < _compute(t)[0] < stop]
    assert beside, f"no stage-0 task started on {recut['worker']} during the re-cut's {stop - start:.2f} s"
