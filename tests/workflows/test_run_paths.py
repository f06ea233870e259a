"""Paths of a run that the other end-to-end tests do not reach, each against plain PyTorch.

Compiled and compressed stages built on cluster workers, an interrupted run, fsspec
stores, overwriting, the default local cluster, ``placement="auto"`` choosing a
pipeline, upscaled images and task chunks smaller than the storage chunks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client

import dask_infer
from dask_infer import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.samples import write_sample
from dask_infer.models.preprocess import Preprocess
from dask_infer.models.registry import build_model
from dask_infer.partition.compress.apply import compress_stages
from dask_infer.partition.split import split_model
from tests.conftest import gpu_labelled, random_images
from tests.reference import assert_close_logits, reference_logits, run_small


def _images(path: Path | str) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["images"][:]


def _logits(path: Path | str) -> np.ndarray:
    return xr.open_zarr(path)["logits"].values


def _run_tasks(client: Client, known: frozenset[str] = frozenset()) -> list[str]:
    """Keys of runs' tasks (reads, stages, writes) the scheduler knows, other than ``known``.

    ``known``: those of earlier tests on the shared cluster (a failed chunk stays while its
    exception holds the future).
    """
    keys = client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
    prefixes = ("read-", "write-", "s0_resnet18-", "s1_resnet18-", "infer_resnet18-")
    return [k for k in keys if k.startswith(prefixes) and k not in known]


def _wait_until_idle(client: Client, known: frozenset[str], timeout: float = 10.0) -> None:
    """Wait until no worker processes a task and the scheduler has forgotten every new run task."""
    deadline = time.monotonic() + timeout
    while (any(client.processing().values()) or _run_tasks(client, known)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(client.processing().values()), client.processing()
    assert not _run_tasks(client, known), _run_tasks(client, known)


# --- compression built on the workers ----------------------------------------------------------


def _dynamo_graphs(client: Client) -> dict[str, int]:
    """Graphs torch.compile has compiled in each worker process so far."""

    def count() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    return client.run(count)


def test_a_compiled_stage_on_the_workers_matches_eager(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """``1:compile`` on two stages: each worker compiles stage 1, logits stay those of eager PyTorch.

    Cut by parameters, stage 1 is layer4's second block and the head, a small graph to
    compile. Chunks and batches are all 8 images, the size the workers warm up with, so
    each worker compiles once. Inductor reorders and fuses float32 arithmetic: 1.4e-6 of
    the largest logit measured, 1e-4 allowed.
    """
    before = _dynamo_graphs(client)
    summary = run_small(
        client,
        small_dataset,
        tmp_path / "o.zarr",
        small_weights,
        stages=2,
        balance="params",
        compress="1:compile",
        chunk_size=8,
        batch_size=8,
    )
    after = _dynamo_graphs(client)
    assert summary.placement["mode"] == "data" and summary.workers == 2
    assert all(after[w] > before[w] for w in before), (before, after)
    ds = xr.open_zarr(tmp_path / "o.zarr")
    plan = json.loads(ds.attrs["compression"])
    assert plan["stages"]["1"]["compile"] is True and plan["default"]["compile"] is False
    want = reference_logits(_images(small_dataset), "resnet18", str(small_weights))
    assert_close_logits(ds["logits"].values, want, rel=1e-4)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 640 digits at 32x32 (gray), chunks of 64, with ``label`` and ``held_out``."""
    path = tmp_path_factory.mktemp("digits") / "digits.zarr"
    write_sample(str(path), kind="digits", size=32, count=640, chunk=64)
    return path


@pytest.fixture(scope="module")
def digits_fp32(digits_store: Path, digits_weights: Path) -> np.ndarray:
    """Plain-PyTorch fp32 logits of the digits model on ``digits_store``."""
    return reference_logits(_images(digits_store), "resnet18", str(digits_weights))


def _held_out_mistakes(store: Path, logits: np.ndarray) -> int:
    """Held-out digits (177 of the 640) whose top-1 class is not their label."""
    ds = xr.open_zarr(store)
    held = ds["held_out"].values
    assert held.sum() == 177
    return int((logits[held].argmax(1) != ds["label"].values[held]).sum())


def _in_process(weights: Path, images: np.ndarray, recipe: str, calibration_images: int) -> np.ndarray:
    """``recipe`` applied here, calibrated on the first images as a worker reads them, in 32-image batches."""
    loaded = build_model("resnet18", weights=str(weights))
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    with torch.inference_mode():
        calibration = prep(torch.from_numpy(images[:calibration_images]))
    (stage,) = compress_stages([loaded.module], recipe, calibration=calibration)
    with torch.inference_mode():
        return torch.cat(
            [stage(prep(torch.from_numpy(images[i : i + 32]))).float() for i in range(0, len(images), 32)]
        ).numpy()


@pytest.mark.parametrize(
    ("recipe", "rel", "more_mistakes"),
    [
        # int8 of the same calibration is the same graph with the same scales; a float32
        # rounding on the boundary of a quantisation step can move one step: 1e-3.
        ("int8", 1e-3, 3),
        # Pruning is float32 throughout; the channels it removes depend on the calibration.
        ("prune=0.3", 1e-5, 9),
    ],
)
def test_compression_calibrated_on_the_workers(
    client: Client,
    digits_store: Path,
    digits_weights: Path,
    digits_fp32: np.ndarray,
    tmp_path: Path,
    recipe: str,
    rel: float,
    more_mistakes: int,
) -> None:
    """Workers read the calibration images themselves: their stages equal the recipe applied here.

    80 calibration images span two storage chunks. Of the 177 held-out digits, the
    compressed model may get ``more_mistakes`` more wrong than the fp32 model (int8: 3,
    none seen; 30% structured pruning, not retrained: 9, none seen in-process).
    """
    out = tmp_path / "o.zarr"
    dask_infer.run(
        str(digits_store),
        str(out),
        model="resnet18",
        weights=str(digits_weights),
        client=client,
        compress=recipe,
        calibration_images=80,
        chunk_size=64,
        batch_size=32,
        progress=False,
        echo=None,
    )
    got = _logits(out)
    assert json.loads(xr.open_zarr(out).attrs["config"])["calibration_images"] == 80
    assert_close_logits(got, _in_process(digits_weights, _images(digits_store), recipe, 80), rel=rel)
    fp32 = _held_out_mistakes(digits_store, digits_fp32)
    assert fp32 <= 5
    assert _held_out_mistakes(digits_store, got) <= fp32 + more_mistakes


def test_int8_stages_on_two_workers_pass_uint8_activations(
    client: Client, digits_store: Path, digits_weights: Path, digits_fp32: np.ndarray, tmp_path: Path
) -> None:
    """Two int8 stages on two workers: stage 0 passes one byte per activation value.

    The logits match the same stages compressed and chained here, calibrated on the same
    80 images (1e-3, as the whole int8 model above), and the held-out digits stay right.
    """
    out = tmp_path / "o.zarr"
    summary = dask_infer.run(
        str(digits_store),
        str(out),
        model="resnet18",
        weights=str(digits_weights),
        client=client,
        compress="int8",
        stages=2,
        placement="pipeline",
        balance="flops",
        rebalance=None,
        calibration_images=80,
        chunk_size=64,
        batch_size=32,
        progress=False,
        echo=None,
    )
    assert summary.placement["mode"] == "pipeline"
    cuts = json.loads(xr.open_zarr(out).attrs["stage_plan"])["cut_points"]
    loaded = build_model("resnet18", weights=str(digits_weights))
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    images = _images(digits_store)
    with torch.inference_mode():
        calibration = prep(torch.from_numpy(images[:80]))
        stages = compress_stages(
            split_model(loaded.module, cuts, copy_model=True), "int8", calibration=calibration
        )
        passed = stages[0](calibration[:1])
        want = torch.cat(
            [
                stages[1](stages[0](prep(torch.from_numpy(images[i : i + 32]))))
                for i in range(0, len(images), 32)
            ]
        ).numpy()
    assert passed.dtype == torch.uint8
    sent = summary.stage_stats[0]["sent_bytes_per_image"]
    assert sent == passed[0].numel(), (sent, passed.shape)
    assert summary.stage_stats[1]["sent_bytes"] == 0
    got = _logits(out)
    assert_close_logits(got, want, rel=1e-3)
    assert _held_out_mistakes(digits_store, got) <= _held_out_mistakes(digits_store, digits_fp32) + 3


# --- an interrupted run -------------------------------------------------------------------------


def test_an_interrupt_mid_run_cancels_the_rest(client: Client, small_weights: Path, tmp_path: Path) -> None:
    """Ctrl-C while chunks are in flight: the run stops, its output says incomplete, no task is left.

    The interrupt is raised by ``echo`` on the line a pipeline writes after its first
    wave of chunks (the re-cut judgement), i.e. from inside the wait for the chunks.
    """
    src = tmp_path / "fine.zarr"
    write_image_dataset(str(src), random_images(80, seed=9), chunk=4)
    lines: list[str] = []
    earlier = frozenset(_run_tasks(client))

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("rebalance:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_small(
            client,
            src,
            tmp_path / "o.zarr",
            small_weights,
            echo=echo,
            chunk_size=4,
            stages=2,
            balance="flops",
            placement="pipeline",
            rebalance=100.0,
        )
    assert lines[-1].startswith("rebalance:")
    out = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    assert out.attrs["dask_infer_complete"] is False
    # The cancelled run's tasks are gone from the workers and from the scheduler.
    _wait_until_idle(client, earlier)
    # Some chunks were written before the interrupt, and not all of them.
    written = out["logits"][:]
    done = np.abs(written).sum(1) > 0
    assert 0 < done.sum() < 80


# --- stores -------------------------------------------------------------------------------------


def test_fsspec_urls_with_storage_options(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """``file://`` URLs: the output is written only with ``auto_mkdir`` (fsspec's local files do
    not create a chunk's directory otherwise), so the run succeeds only if the workers' writes
    get the storage options too. The input is a copy of ``small_dataset`` written the same way.
    """
    options = {"auto_mkdir": True}
    src = f"file://{tmp_path}/in.zarr"
    write_image_dataset(
        src, _images(small_dataset), labels=np.arange(200) % 10, chunk=16, storage_options=options
    )
    with pytest.raises(FileNotFoundError):  # the same write without the option fails
        write_image_dataset(f"file://{tmp_path}/plain.zarr", random_images(2), chunk=2)
    run_small(client, small_dataset, tmp_path / "local.zarr", small_weights, chunk_size=16)
    run_small(
        client, src, f"file://{tmp_path}/out.zarr", small_weights, chunk_size=16, storage_options=options
    )
    got, local = xr.open_zarr(tmp_path / "out.zarr"), xr.open_zarr(tmp_path / "local.zarr")
    assert got.attrs["dask_infer_complete"] is True
    xr.testing.assert_identical(got.drop_attrs(), local.drop_attrs())
    want = reference_logits(_images(small_dataset), "resnet18", str(small_weights))
    assert_close_logits(got["logits"].values, want)


def test_overwrite_replaces_an_earlier_output(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """An output of another run (24 images, probabilities too) is refused, then replaced whole."""
    out, fresh = tmp_path / "o.zarr", tmp_path / "fresh.zarr"
    old = tmp_path / "old.zarr"
    write_image_dataset(str(old), random_images(24, seed=11), chunk=8)
    run_small(client, old, out, small_weights, outputs=("logits", "probabilities"))
    stamp = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(InputError) as info:
        run_small(client, small_dataset, out, small_weights)
    assert (
        str(info.value)
        == f"output {str(out)!r} exists; pass --overwrite to replace it, or --resume to finish it"
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == stamp
    run_small(client, small_dataset, out, small_weights, chunk_size=16, overwrite=True)
    run_small(client, small_dataset, fresh, small_weights, chunk_size=16)
    got = xr.open_zarr(out)
    assert set(got.data_vars) == {"logits", "top_k_class", "top_k_probability"} and got.sizes["image"] == 200
    xr.testing.assert_identical(got.drop_attrs(), xr.open_zarr(fresh).drop_attrs())
    want = reference_logits(_images(small_dataset), "resnet18", str(small_weights))
    assert_close_logits(got["logits"].values, want)


# --- clusters and placement ---------------------------------------------------------------------


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the default cluster on a GPU machine is LocalCUDACluster"
)
def test_the_default_local_cluster(small_weights: Path, tmp_path: Path) -> None:
    """No client, scheduler or worker count: one worker process, 3 threads, torch on every core."""
    src = tmp_path / "few.zarr"
    images = random_images(32, seed=12)
    write_image_dataset(str(src), images, chunk=16)
    summary = dask_infer.run(
        str(src),
        str(tmp_path / "o.zarr"),
        model="resnet18",
        weights=str(small_weights),
        progress=False,
        echo=None,
    )
    assert summary.cluster == f"LocalCluster: 1 worker(s) x 3 thread(s), torch threads {os.cpu_count()}"
    assert summary.workers == 1 and summary.model_loads == 1
    assert_close_logits(
        _logits(tmp_path / "o.zarr"), reference_logits(images, "resnet18", str(small_weights))
    )


# Stage memory of ResNet-18 (32x32 input) cut in two by parameters, for batch 16: weights
# plus activations, 33.4 MB and 19.1 MB (52.5 MB, 50.10 MiB, together). A 45 MB worker
# fits each stage but not the whole model.
_STAGE_LIMIT = 45_000_000


@pytest.fixture(scope="module")
def small_memory_client() -> Iterator[Client]:
    """Two one-thread workers labelled ``GPU: 1`` with a 45 MB memory_limit.

    The limit is what placement reads; Dask's own memory management (spill, pause,
    restart), which would act on the real size of a process with torch in it, is off.
    """
    off = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with dask.config.set(off), gpu_labelled(2, memory_limit=_STAGE_LIMIT) as client:
        yield client


def test_auto_pipelines_a_model_too_big_for_one_worker(
    small_memory_client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """``placement="auto"`` reads the workers' memory_limit and pipelines the two stages."""
    lines: list[str] = []
    summary = run_small(
        small_memory_client,
        small_dataset,
        tmp_path / "o.zarr",
        small_weights,
        echo=lines.append,
        stages=2,
        balance="params",
        batch_size=16,
        chunk_size=16,
        rebalance=False,
    )
    placement = summary.placement
    assert placement["mode"] == "pipeline", placement["reason"]
    assert "but the smallest worker has 42.92 MiB (memory_limit)" in placement["reason"]
    assert [len(group) for group in placement["groups"][0]] == [1, 1]
    assert any(line.startswith("placement: pipeline (resnet18 needs ") for line in lines), lines
    # each worker loaded only its own stage
    assert sorted(summary.loaded_stages.values()) == [[0], [1]]
    want = reference_logits(_images(small_dataset), "resnet18", str(small_weights))
    assert_close_logits(_logits(tmp_path / "o.zarr"), want)


# --- images and chunks --------------------------------------------------------------------------


def test_small_images_are_upscaled(client: Client, small_weights: Path, tmp_path: Path) -> None:
    """16x24 images for a 32x32 model: shorter side up to 32 (32x48), centre crop 32x32."""
    from torchvision.transforms.v2 import functional as TF

    images = np.random.default_rng(13).integers(0, 256, (20, 16, 24, 3), dtype=np.uint8)
    src = tmp_path / "small.zarr"
    write_image_dataset(str(src), images, chunk=5)
    run_small(client, src, tmp_path / "o.zarr", small_weights)
    loaded = build_model("resnet18", weights=str(small_weights))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    x = TF.center_crop(TF.resize(x, [32], antialias=True), [32, 32])
    assert x.shape == (20, 3, 32, 32)
    mean, std = torch.tensor(loaded.mean).view(1, 3, 1, 1), torch.tensor(loaded.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = loaded.module((x - mean) / std).numpy()
    assert_close_logits(_logits(tmp_path / "o.zarr"), want, rel=1e-5)


def test_chunks_smaller_than_the_storage_chunks(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """``chunk_size=8`` over storage chunks of 16: tasks of 8 images, and the run says why it costs."""
    lines: list[str] = []
    summary = run_small(
        client, small_dataset, tmp_path / "o.zarr", small_weights, chunk_size=8, echo=lines.append
    )
    assert summary.chunk_size == 8 and summary.chunks == 25
    assert any("chunk_size=8 splits the input's storage chunks of 16 images" in line for line in lines), lines
    ds = xr.open_zarr(tmp_path / "o.zarr")
    assert ds["logits"].encoding["chunks"] == (8, 10)
    want = reference_logits(_images(small_dataset), "resnet18", str(small_weights))
    assert_close_logits(ds["logits"].values, want)
