"""Shared fixtures: a real two-process LocalCluster, small Zarr datasets, model weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import Client, LocalCluster

from dask_infer.io.dataset import write_image_dataset
from dask_infer.models.registry import build_model

SMALL_SIZE = 32


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per test session (the digits model trains once)."""
    path = Path(os.environ.get("DASK_INFER_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    os.environ["DASK_INFER_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def digits_weights(cache_dir: Path) -> Path:
    """The trained digits ResNet-18 (.safetensors), trained once per session."""
    from dask_infer.models.zoo import digits_model

    return digits_model(cache_dir)


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ResNet-18 (10 classes) saved as a .pt state_dict whose metadata says 32x32 input."""
    path = tmp_path_factory.mktemp("weights") / "resnet18-small.pt"
    module = build_model("resnet18", num_classes=10, seed=1).module
    meta = {"model": "resnet18", "input_size": SMALL_SIZE, "class_names": [f"c{i}" for i in range(10)]}
    torch.save({"state_dict": module.state_dict(), "meta": meta}, path)
    return path


def random_images(n: int, size: int = SMALL_SIZE, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Deterministic random uint8 images (n, y, x, channel)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 random RGB 32x32 uint8 images in chunks of 16, with labels."""
    path = tmp_path_factory.mktemp("data") / "small.zarr"
    images = random_images(200)
    labels = np.arange(200) % 10
    write_image_dataset(
        str(path), images, labels=labels, chunk=16, attrs={"class_names": [f"k{i}" for i in range(10)]}
    )
    return path


@contextlib.contextmanager
def gpu_labelled(n_workers: int, **cluster: Any) -> Iterator[Client]:
    """A client of a LocalCluster of ``n_workers`` single-thread processes, each labelled with one GPU.

    Pipelined placements place stages on GPU-labelled workers; on a CPU machine the
    label is all a test needs. ``cluster`` passes more LocalCluster options.
    """
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            resources={"GPU": 1},
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
            **cluster,
        ) as local,
        Client(local) as c,
    ):
        yield c


@pytest.fixture(scope="session")
def client() -> Iterator[Client]:
    """A real LocalCluster: two worker processes, two threads each."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="session")
def browser() -> str:
    """Chromium on PATH, or installed with apt-get where the tests run as root."""
    from tests.browser import INSTALL, install_browser

    found = install_browser()
    if found is None:
        pytest.skip(
            f"no Chromium or Chrome on PATH and none could be installed here; install it with `{INSTALL}`"
        )
    return found
