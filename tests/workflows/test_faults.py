"""Trust: outputs that are not ours, the input named two ways, relative paths, a worker restarted mid-run."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import dask_infer
from dask_infer import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.workflows.cluster import scheduler_workers
from tests.conftest import random_images
from tests.faults import WriteCounter, after_chunks_written
from tests.reference import assert_close_logits, reference_logits, run_small


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def test_overwrite_refuses_a_folder_dask_infer_did_not_write(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """A project folder given as --output with --overwrite is refused before any work, untouched."""
    project = tmp_path / "project"
    (project / "chapters").mkdir(parents=True)
    (project / "chapters" / "thesis.tex").write_text("years of work")
    before = _digest(project)
    with pytest.raises(InputError, match="is a folder of 1 entry that is not a Zarr store; --overwrite"):
        dask_infer.run(
            str(small_dataset), str(project), model="resnet18", weights=str(small_weights), overwrite=True
        )
    assert _digest(project) == before


def test_the_input_named_as_a_file_url_is_still_the_input(small_weights: Path, tmp_path: Path) -> None:
    src = tmp_path / "v.zarr"
    write_image_dataset(str(src), random_images(8), chunk=4)
    before = _digest(src)
    with pytest.raises(InputError, match="would overwrite the input"):
        dask_infer.run(
            f"file://{src}", str(src), model="resnet18", weights=str(small_weights), overwrite=True
        )
    assert _digest(src) == before


def test_relative_paths_are_the_users_not_the_workers(
    client: Client, small_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers started elsewhere (their own working directory); they read what the user named."""
    images = random_images(24, seed=4)
    write_image_dataset(str(tmp_path / "here.zarr"), images, chunk=8)
    monkeypatch.chdir(tmp_path)
    run_small(client, "here.zarr", Path("out.zarr"), small_weights)
    ds = xr.open_zarr(tmp_path / "out.zarr")
    assert_close_logits(ds["logits"].values, reference_logits(images, "resnet18", str(small_weights)))
    assert ds.attrs["source"] == str(tmp_path / "here.zarr")


def test_a_worker_killed_mid_run_is_restarted_and_loads_the_model(
    small_weights: Path, tmp_path: Path
) -> None:
    """SIGKILL one worker process after a few chunks: its nanny restarts it under a new address,
    the new worker loads the model like the others, and the logits equal an undisturbed run."""
    src = tmp_path / "long.zarr"
    images = random_images(240, seed=11)
    write_image_dataset(str(src), images, chunk=4)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        undisturbed = run_small(client, src, tmp_path / "calm.zarr", small_weights, chunk_size=4)
        pids = client.run(os.getpid)
        victim = sorted(pids)[0]
        counter = WriteCounter()
        cluster.scheduler.add_plugin(counter)
        with after_chunks_written(
            tmp_path / "hit.zarr", 16, lambda: os.kill(pids[victim], signal.SIGKILL)
        ) as killed:
            summary = run_small(client, src, tmp_path / "hit.zarr", small_weights, chunk_size=4)
        assert killed.is_set(), "the run ended before a worker could be killed"
        # The chunks written before the kill (about 8 by the victim) are not computed again.
        # Only a write the victim finished in the milliseconds before the scheduler heard
        # that the run had seen it may be: at most one per thread of the victim.
        assert len(set(counter.writes)) == 60, counter.writes
        assert len(counter.writes) - 60 == len(counter.rewritten()) <= 2, counter.rewritten()
        # The restarted worker (a new address) holds the model, as every worker does.
        assert victim not in summary.loaded_stages
        assert all(held == [0] for held in summary.loaded_stages.values())
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "hit.zarr")["logits"].values,
        xr.open_zarr(tmp_path / "calm.zarr")["logits"].values,
    )
    assert undisturbed.images == summary.images == 240


def test_a_worker_added_mid_run_loads_the_model(small_weights: Path, tmp_path: Path) -> None:
    """Scale a one-worker cluster to two after a few chunks: the newcomer loads the model and may
    take work; the logits equal the reference."""
    src = tmp_path / "long.zarr"
    images = random_images(720, seed=12)
    write_image_dataset(str(src), images, chunk=4)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        first = set(scheduler_workers(client))
        with after_chunks_written(tmp_path / "o.zarr", 4, lambda: cluster.scale(2)) as scaled:
            summary = run_small(client, src, tmp_path / "o.zarr", small_weights, chunk_size=4)
        assert scaled.is_set(), "the run ended before the cluster could grow"
    # The newcomer joined while the run went on, and holds the model as the first worker does.
    assert len(summary.loaded_stages) == 2 and set(summary.loaded_stages) - first, summary.loaded_stages
    assert all(held == [0] for held in summary.loaded_stages.values()), summary.loaded_stages
    assert summary.images == 720
    assert_close_logits(
        xr.open_zarr(tmp_path / "o.zarr")["logits"].values,
        reference_logits(images, "resnet18", str(small_weights)),
    )
