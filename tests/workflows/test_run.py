"""End to end on a real two-process LocalCluster: Zarr in, Dask graph, Zarr out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

import dask_infer
from dask_infer import DaskInferError, InputError, ModelError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.samples import write_sample
from dask_infer.workflows.cluster import scheduler_workers
from tests.conftest import random_images
from tests.reference import assert_close_logits, assert_held_out_mistakes, reference_logits, run_small


def test_matches_plain_pytorch(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    summary = run_small(
        client, small_dataset, out, small_weights, chunk_size=16, outputs=("logits", "probabilities", "top_k")
    )
    assert summary.images == 200
    ds = xr.open_zarr(out)
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    want = reference_logits(images, "resnet18", str(small_weights))
    assert ds["logits"].dtype == np.float32
    assert_close_logits(ds["logits"].values, want)
    probs = np.exp(want - want.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(ds["probabilities"].values, probs, atol=1e-5)
    top = np.argsort(-want, axis=1)[:, :5]
    assert (ds["top_k_class"].values[:, 0] == top[:, 0]).all()
    np.testing.assert_array_equal(ds["image"].values, np.arange(200))
    np.testing.assert_array_equal(ds["label"].values, np.arange(200) % 10)
    assert list(ds["class_name"].values) == [f"c{i}" for i in range(10)]
    assert ds.attrs["model"] == "resnet18" and ds.attrs["dask_infer_complete"] is True
    assert '"chunk_size": 16' in ds.attrs["config"]
    # tasks of both workers took part, and each loaded the model exactly once
    assert summary.workers == 2 and summary.model_loads == 2 and summary.chunks == 13


def test_layouts_and_dtypes(client: Client, small_weights: Path, tmp_path: Path) -> None:
    """(image, channel, y, x) float32 in Zarr v2, and grayscale (image, y, x) uint8."""
    rgb = random_images(24, seed=3)
    nchw = tmp_path / "nchw.zarr"
    z = zarr.create_array(
        str(nchw), shape=(24, 3, 32, 32), chunks=(8, 3, 32, 32), dtype="float32", zarr_format=2
    )
    z[:] = rgb.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    run_small(client, nchw, tmp_path / "o1.zarr", small_weights)
    got = xr.open_zarr(tmp_path / "o1.zarr")["logits"].values
    assert_close_logits(got, reference_logits(rgb, "resnet18", str(small_weights)))

    gray = random_images(20, channels=1, seed=4)
    flat = tmp_path / "gray.zarr"
    g = zarr.create_array(str(flat), shape=(20, 32, 32), chunks=(5, 32, 32), dtype="uint8")
    g[:] = gray[..., 0]
    run_small(client, flat, tmp_path / "o2.zarr", small_weights)
    got = xr.open_zarr(tmp_path / "o2.zarr")["logits"].values
    assert_close_logits(got, reference_logits(gray, "resnet18", str(small_weights)))


def test_resizes_inside_the_graph(client: Client, small_weights: Path, tmp_path: Path) -> None:
    """48x64 images become 32x32 (shorter side, centre crop) inside the tasks."""
    import torch
    from torchvision.transforms import v2

    from dask_infer.models.registry import build_model

    images = np.random.default_rng(5).integers(0, 256, (12, 48, 64, 3), dtype=np.uint8)
    src = tmp_path / "big.zarr"
    write_image_dataset(str(src), images, chunk=4)
    run_small(client, src, tmp_path / "o.zarr", small_weights)
    loaded = build_model("resnet18", weights=str(small_weights))
    prep = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(32, antialias=True),
            v2.CenterCrop(32),
            v2.Normalize(loaded.mean, loaded.std),
        ]
    )
    with torch.inference_mode():
        want = loaded.module(prep(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()
    assert_close_logits(xr.open_zarr(tmp_path / "o.zarr")["logits"].values, want)


class _ReadsInMemory(SchedulerPlugin):
    """Counts how many read results are held at once, from the scheduler's transitions."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def transition(self, key, start, finish, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not str(key).startswith("read-"):
            return
        if finish == "memory":
            self.now += 1
            self.peak = max(self.peak, self.now)
        elif start == "memory":
            self.now -= 1


def test_memory_is_bounded_by_threads_not_dataset(
    client: Client, small_weights: Path, tmp_path: Path
) -> None:
    """Reads stream: the chunks held at once depend on the threads, not on the dataset size."""
    src = tmp_path / "many.zarr"
    write_image_dataset(str(src), random_images(480, seed=6), chunk=8)
    client.register_plugin(_ReadsInMemory(), name="reads-in-memory")
    try:
        summary = run_small(client, src, tmp_path / "o.zarr", small_weights, chunk_size=8)
        peak = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["reads-in-memory"].peak)
    finally:
        client.unregister_scheduler_plugin("reads-in-memory")
    assert summary.chunks == 60
    threads = sum(w["nthreads"] for w in scheduler_workers(client).values())
    assert 1 <= peak <= 2 * threads + 2, f"{peak} chunks of images held at once"


def test_yaml_config(client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"input: {small_dataset}\noutput: {tmp_path / 'o.zarr'}\nmodel: resnet18\n"
        f"weights: {small_weights}\noutputs: [top_k]\ntop_k: 3\nprogress: false\n"
    )
    dask_infer.run(config=str(cfg), client=client, echo=None)
    ds = xr.open_zarr(tmp_path / "o.zarr")
    assert set(ds.data_vars) == {"top_k_class", "top_k_probability"} and ds.sizes["rank"] == 3


@pytest.mark.parametrize(
    ("setup", "kwargs", "error", "match"),
    [
        ("missing", {}, InputError, "does not exist"),
        ("same", {}, InputError, "would overwrite the input"),
        ("inside", {}, InputError, "would overwrite the input"),
        ("exists", {}, InputError, "exists; pass --overwrite"),
        ("ok", {"model": "resnet5"}, ModelError, "unknown model 'resnet5'"),
        ("ok", {"layout": "HWC"}, DaskInferError, "layout='HWC'"),
    ],
)
def test_bad_input_is_refused_before_work(
    small_dataset: Path, tmp_path: Path, setup: str, kwargs: dict, error: type, match: str
) -> None:
    src, out = str(small_dataset), str(tmp_path / "o.zarr")
    if setup == "missing":
        src = str(tmp_path / "nope.zarr")
    elif setup == "same":
        out = src
    elif setup == "inside":
        out = str(small_dataset / "predictions")
    elif setup == "exists":
        (tmp_path / "o.zarr").mkdir()
    before = sorted(p.stat().st_mtime_ns for p in small_dataset.rglob("*"))
    with pytest.raises(error, match=match):
        dask_infer.run(src, out, **{"model": "resnet18", "progress": False, "echo": None, **kwargs})
    assert sorted(p.stat().st_mtime_ns for p in small_dataset.rglob("*")) == before


def test_connects_to_an_existing_scheduler(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    address = client.scheduler_info()["address"]
    summary = dask_infer.run(
        str(small_dataset),
        str(tmp_path / "o.zarr"),
        model="resnet18",
        weights=str(small_weights),
        scheduler=address,
        progress=False,
        echo=None,
    )
    assert summary.cluster == f"scheduler {address}" and summary.workers == 2
    assert len(scheduler_workers(client)) == 2  # the cluster outlives the run
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(
        xr.open_zarr(tmp_path / "o.zarr")["logits"].values,
        reference_logits(images, "resnet18", str(small_weights)),
    )


def test_stages_give_the_whole_models_predictions(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    whole = run_small(client, small_dataset, tmp_path / "whole.zarr", small_weights, chunk_size=32)
    split = run_small(
        client,
        small_dataset,
        tmp_path / "split.zarr",
        small_weights,
        chunk_size=32,
        stages=3,
        balance="flops",
    )
    assert whole.images == split.images == 200
    a = xr.open_zarr(tmp_path / "whole.zarr")
    b = xr.open_zarr(tmp_path / "split.zarr")
    np.testing.assert_array_equal(a["logits"].values, b["logits"].values)
    import json

    plan = json.loads(b.attrs["stage_plan"])
    assert len(plan["cut_points"]) == 2 and plan["balance"] == "flops"


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 320 digits at 32x32 (gray), chunks of 32, with ``label`` and ``held_out``."""
    path = tmp_path_factory.mktemp("digits") / "digits.zarr"
    write_sample(str(path), kind="digits", size=32, count=320, chunk=32)
    return path


def test_compressed_run_matches_in_process_compression(
    client: Client, digits_store: Path, digits_weights: Path, tmp_path: Path
) -> None:
    """bf16 on the trained digits model: the workers' output equals the same recipe applied
    in-process, stays within bf16 rounding of fp32 PyTorch, and keeps its held-out accuracy."""
    import torch

    from dask_infer.models.preprocess import Preprocess
    from dask_infer.models.registry import build_model
    from dask_infer.partition.compress.apply import compress_stages

    run_small(client, digits_store, tmp_path / "o.zarr", digits_weights, compress="bf16", chunk_size=32)
    ds = xr.open_zarr(tmp_path / "o.zarr")
    assert '"precision": "bf16"' in ds.attrs["compression"]
    got = ds["logits"].values
    loaded = build_model("resnet18", weights=str(digits_weights))
    (stage,) = compress_stages([loaded.module], "bf16")
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    with torch.inference_mode():
        want = torch.cat(
            [stage(prep(torch.from_numpy(images[i : i + 32]))).float() for i in range(0, len(images), 32)]
        )
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)
    # bf16 keeps 8 bits of mantissa: 0.6% of the largest logit measured, 2% allowed.
    fp32 = reference_logits(images, "resnet18", str(digits_weights))
    assert_close_logits(got, fp32, rel=2e-2)
    # The fp32 model misses at most 3 of the 78 held-out digits; bf16 at most 2 more (none seen).
    assert_held_out_mistakes(ds, got, fp32, held_out=78)


@pytest.mark.parametrize("freezing", ["", "0"])
def test_compiled_bf16_run_agrees_with_fp32(
    digits_store: Path, digits_weights: Path, tmp_path: Path, freezing: str
) -> None:
    """bf16+channels_last+compile on a worker process, frozen (the default) or not (``0``),
    against fp32 plain PyTorch: top-1 agreement >= 99.5% of the 320 digits (at most one differs),
    relative logit error <= 2% (bf16's 8-bit mantissa), and the held-out accuracy kept."""
    from distributed import LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            env={"DASK_INFER_INDUCTOR_FREEZING": freezing},
        ) as cluster,
        Client(cluster) as client,
    ):
        run_small(
            client,
            digits_store,
            tmp_path / "o.zarr",
            digits_weights,
            compress="bf16+channels_last+compile",
            chunk_size=32,
            batch_size=32,
        )
    ds = xr.open_zarr(tmp_path / "o.zarr")
    got = ds["logits"].values
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    fp32 = reference_logits(images, "resnet18", str(digits_weights))
    agreement = float((got.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= 0.995, f"top-1 agreement with fp32 {agreement:.2%}"
    relative = float(np.linalg.norm(got - fp32) / np.linalg.norm(fp32))
    assert relative <= 2e-2, f"relative logit error {relative:.3g}"
    assert_held_out_mistakes(ds, got, fp32, held_out=78)


def test_auto_compression_records_its_choice(
    client: Client, digits_store: Path, digits_weights: Path, tmp_path: Path
) -> None:
    """--compress auto: every worker measures its candidates on the input's first 64 images and keeps
    the fastest with top-1 agreement >= 99.5% with fp32; the choice and the figures are in the
    summary and the attrs, and the output stays within 2% top-1 of fp32 plain PyTorch."""
    summary = run_small(
        client,
        digits_store,
        tmp_path / "o.zarr",
        digits_weights,
        compress="auto",
        chunk_size=32,
        batch_size=32,
    )
    assert set(summary.compression_choices) == set(summary.loaded_stages)
    for choices in summary.compression_choices.values():
        (choice,) = choices
        assert choice["stage"] == 0 and choice["images"] == 64 and choice["min_agreement"] == 0.995
        measured = {c["recipe"]: c for c in choice["candidates"] if c["error"] is None}
        assert "none" in measured and measured["none"]["top1_agreement"] == 1.0
        allowed = [c for c in measured.values() if c["top1_agreement"] >= 0.995]
        fastest = max(allowed, key=lambda c: c["images_per_s"])
        assert choice["recipe"] == ("fp32" if fastest["recipe"] == "none" else fastest["recipe"])
    assert "compress auto on" in summary.format()
    ds = xr.open_zarr(tmp_path / "o.zarr")
    assert json.loads(ds.attrs["compression"]) == {"auto": {"min_agreement": 0.995}}
    assert json.loads(ds.attrs["run_summary"])["compression_choices"] == summary.compression_choices
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    fp32 = reference_logits(images, "resnet18", str(digits_weights))
    got = ds["logits"].values
    assert float((got.argmax(1) == fp32.argmax(1)).mean()) >= 0.98
    assert_held_out_mistakes(ds, got, fp32, held_out=78)


def test_bad_compression_is_refused_before_work(small_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DaskInferError, match=r"names stage\(s\) \[3\]"):
        dask_infer.run(
            str(small_dataset), str(tmp_path / "o.zarr"), model="resnet18", compress="3:bf16", echo=None
        )
    with pytest.raises(DaskInferError, match="fp8"):
        dask_infer.run(
            str(small_dataset), str(tmp_path / "o.zarr"), model="resnet18", compress="fp8", echo=None
        )
    assert not (tmp_path / "o.zarr").exists()


def test_a_corrupt_chunk_fails_the_run_and_leaves_it_incomplete(
    client: Client, small_weights: Path, tmp_path: Path
) -> None:
    src = tmp_path / "corrupt.zarr"
    write_image_dataset(str(src), random_images(64, seed=5), chunk=8)
    metadata = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}
    chunk_files = sorted(p for p in (src / "images").rglob("*") if p.is_file() and p.name not in metadata)
    assert len(chunk_files) == 8
    assert [type(c).__name__ for c in zarr.open_array(str(src / "images")).compressors] == ["ZstdCodec"]
    chunk_files[5].write_bytes(b"not a compressed chunk" * 10)
    # The images are zstd-compressed (Zarr 3's default); numcodecs' decoder raises, on the
    # worker that reads chunk 5, and the run re-raises that error as it is.
    with pytest.raises(RuntimeError, match="^Zstd decompression error: invalid input data$") as info:
        run_small(client, src, tmp_path / "out.zarr", small_weights, chunk_size=8)
    assert type(info.value) is RuntimeError
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert out.attrs["dask_infer_complete"] is False
    # No task of the failed run is left running on the workers.
    deadline = time.monotonic() + 10
    while any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(client.processing().values())
