"""Resume: an interrupted run is finished by computing only the chunks its manifest lacks."""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client

import dask_infer
from dask_infer import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.outputs import MANIFEST
from dask_infer.models import build_model
from tests.conftest import random_images
from tests.faults import after_chunks_written
from tests.reference import assert_close_logits, reference_logits, run_small

PIPELINE = {"chunk_size": 4, "stages": 2, "balance": "flops", "placement": "pipeline", "rebalance": 100.0}


def _written(path: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[MANIFEST][:])


def _interrupted(client: Client, src: Path, out: Path, weights: Path) -> int:
    """A pipeline run stopped by Ctrl-C after its first wave of chunks; the chunks it wrote."""

    def echo(line: str) -> None:
        if line.startswith("rebalance:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_small(client, src, out, weights, echo=echo, **PIPELINE)
    # Cancelling cannot stop a task already running: a write under way still lands (and is
    # recorded, after its region). Wait for those, so the manifest read below is final.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        client.run(lambda dask_worker: len(dask_worker.state.executing)).values()
    ):
        time.sleep(0.05)
    assert zarr.open_group(str(out), mode="r").attrs["dask_infer_complete"] is False
    return int(_written(out).sum())


def test_resume_computes_only_what_is_missing_and_matches_an_uninterrupted_run(
    client: Client, small_weights: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.zarr"
    images = random_images(80, seed=21)
    write_image_dataset(str(src), images, chunk=4)
    calm = run_small(client, src, tmp_path / "calm.zarr", small_weights, **PIPELINE)
    assert calm.skipped_chunks == 0 and _written(tmp_path / "calm.zarr").all()

    out = tmp_path / "out.zarr"
    done = _interrupted(client, src, out, small_weights)
    assert 0 < done < 20
    with pytest.raises(InputError, match="exists; pass --overwrite to replace it, or --resume to finish it"):
        run_small(client, src, out, small_weights, **PIPELINE)
    resumed = run_small(client, src, out, small_weights, resume=True, **PIPELINE)
    # Not one written chunk was computed again: the resume ran exactly the missing images.
    assert resumed.skipped_chunks == done and resumed.images == 80 - 4 * done
    assert _computed(resumed) == 80 - 4 * done
    got = xr.open_zarr(out)
    assert got.attrs["dask_infer_complete"] is True and _written(out).all()
    np.testing.assert_array_equal(got["logits"].values, xr.open_zarr(tmp_path / "calm.zarr")["logits"].values)
    np.testing.assert_array_equal(
        got["top_k_class"].values, xr.open_zarr(tmp_path / "calm.zarr")["top_k_class"].values
    )
    assert_close_logits(got["logits"].values, reference_logits(images, "resnet18", str(small_weights)))

    again = run_small(client, src, out, small_weights, resume=True, **PIPELINE)
    assert again.images == 0 and again.skipped_chunks == 20


def _computed(summary: dask_infer.RunSummary) -> int:
    """Images the workers' first stage really ran, by their own counts."""
    return int(summary.stage_stats[0]["images"])


def test_a_data_parallel_resume_computes_only_the_missing_chunks(
    client: Client, small_weights: Path, tmp_path: Path
) -> None:
    """Interrupt a data-parallel run after a few chunks (Ctrl-C in the main thread), resume it: the
    workers run exactly the images of the chunks the manifest lacks, and the logits equal a calm run's."""
    src = tmp_path / "in.zarr"
    write_image_dataset(str(src), random_images(160, seed=24), chunk=4)
    calm = run_small(client, src, tmp_path / "calm.zarr", small_weights, chunk_size=4)
    assert _computed(calm) == 160
    out = tmp_path / "out.zarr"
    with pytest.raises(KeyboardInterrupt), after_chunks_written(out, 4, _thread.interrupt_main):
        run_small(client, src, out, small_weights, chunk_size=4)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        client.run(lambda dask_worker: len(dask_worker.state.executing)).values()
    ):
        time.sleep(0.05)
    done = int(_written(out).sum())
    assert 4 <= done < 40
    resumed = run_small(client, src, out, small_weights, resume=True, chunk_size=4)
    assert resumed.skipped_chunks == done and _computed(resumed) == 160 - 4 * done
    np.testing.assert_array_equal(
        xr.open_zarr(out)["logits"].values, xr.open_zarr(tmp_path / "calm.zarr")["logits"].values
    )


def test_a_resume_with_other_weights_or_chunks_is_refused(
    client: Client, small_weights: Path, tmp_path: Path
) -> None:
    src = tmp_path / "in.zarr"
    write_image_dataset(str(src), random_images(80, seed=22), chunk=4)
    out = tmp_path / "out.zarr"
    _interrupted(client, src, out, small_weights)
    before = _written(out).copy()
    other = tmp_path / "other.pt"
    module = build_model("resnet18", num_classes=10, seed=7).module
    torch.save({"state_dict": module.state_dict(), "meta": {"model": "resnet18", "input_size": 32}}, other)
    with pytest.raises(
        InputError, match=r"cannot resume .* other weights_sha256 .*start again with --overwrite"
    ):
        run_small(client, src, out, other, resume=True, **PIPELINE)
    with pytest.raises(InputError, match=r"other top_k"):
        run_small(client, src, out, small_weights, resume=True, top_k=3, **PIPELINE)
    with pytest.raises(InputError, match="written in chunks of 4; leave chunk_size out"):
        run_small(client, src, out, small_weights, resume=True, **{**PIPELINE, "chunk_size": 8})
    with pytest.raises(InputError, match="holds no run to resume"):
        run_small(client, src, tmp_path / "never.zarr", small_weights, resume=True, **PIPELINE)
    np.testing.assert_array_equal(_written(out), before)


def test_the_cli_killed_mid_run_then_resumed(small_weights: Path, tmp_path: Path) -> None:
    """SIGKILL the command, its cluster and workers; `--resume` finishes with the same logits."""
    src = tmp_path / "in.zarr"
    images = random_images(480, seed=23)
    write_image_dataset(str(src), images, chunk=4)
    cli = [sys.executable, "-m", "dask_infer.cli", "run", "--input", str(src), "--model", "resnet18"]
    common = ["--weights", str(small_weights), "--workers", "1", "--threads", "1", "--chunk-size", "4"]
    calm = subprocess.run(
        [*cli, "--output", str(tmp_path / "calm.zarr"), *common], capture_output=True, text=True
    )
    assert calm.returncode == 0, calm.stderr
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen(
        [*cli, "--output", str(out), *common, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "dask_infer").exists() and _written(out).sum() >= 10:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = int(_written(out).sum())
    assert 10 <= done < 120
    resumed = subprocess.run(
        [*cli, "--output", str(out), *common, "--resume"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{480 - 4 * done} images in" in resumed.stdout
    assert f"resumed: {done} chunks were already written" in resumed.stdout
    got = xr.open_zarr(out)["logits"].values
    np.testing.assert_array_equal(got, xr.open_zarr(tmp_path / "calm.zarr")["logits"].values)
    assert_close_logits(got, reference_logits(images, "resnet18", str(small_weights)))


def test_ctrl_c_exits_130_saying_how_to_resume(small_weights: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.zarr"
    write_image_dataset(str(src), random_images(480, seed=24), chunk=4)
    out = tmp_path / "out.zarr"
    cli = [sys.executable, "-m", "dask_infer.cli", "run", "--input", str(src), "--output", str(out)]
    args = ["--model", "resnet18", "--weights", str(small_weights), "--workers", "1", "--chunk-size", "4"]
    proc = subprocess.Popen(
        [*cli, *args, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "dask_infer").exists() and _written(out).sum() >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: the output is incomplete; run the same command with --resume to finish it"
    )
    assert zarr.open_group(str(out), mode="r").attrs["dask_infer_complete"] is False
