"""Models of one's own, four ways (import path, instance, .pt2 program, torchvision name), on a real cluster.

Each run's logits are compared with a plain PyTorch forward of the same model, weights and
images, and each worker is counted to load the model once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client

import dask_infer
from dask_infer.errors import InputError, ModelError
from dask_infer.workflows.cluster import scheduler_workers
from tests.conftest import SMALL_SIZE
from tests.own_models import TinyNet, dense_map, trained_like
from tests.reference import assert_close_logits

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 7


def plain_logits(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """A plain forward of ``module`` on uint8 NHWC images at its input size, ImageNet-normalised."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        return module.eval()(x).numpy()


@pytest.fixture(scope="module")
def tiny_model() -> TinyNet:
    return trained_like(num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyNet) -> Path:
    """The tiny model's state_dict, with metadata saying its input is 32x32."""
    path = tmp_path_factory.mktemp("own") / "tiny.pt"
    torch.save({"state_dict": tiny_model.state_dict(), "meta": {"input_size": SMALL_SIZE}}, path)
    return path


@pytest.fixture(scope="module")
def tiny_program(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyNet) -> Path:
    """The tiny model exported with a dynamic batch and saved as a .pt2 program."""
    path = tmp_path_factory.mktemp("own") / "tiny.pt2"
    example = torch.zeros(2, 3, SMALL_SIZE, SMALL_SIZE)
    program = torch.export.export(tiny_model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def _run(client: Client, src: Path, out: Path, **kw: Any) -> dask_infer.RunSummary:
    options: dict[str, Any] = {"progress": False, "echo": None, "rebalance": None, **kw}
    return dask_infer.run(str(src), str(out), client=client, **options)


def _attr(ds: xr.Dataset, name: str) -> Any:
    value = ds.attrs[name]
    return json.loads(value) if isinstance(value, str) else value


def _images(src: Path) -> np.ndarray:
    return np.asarray(xr.open_zarr(src)["images"].values)


PLACEMENTS = [
    pytest.param({}, id="data"),
    pytest.param({"stages": 2, "placement": "pipeline"}, id="pipeline"),
    pytest.param({"stages": 2, "placement": "hybrid", "replicas": 1}, id="hybrid"),
]


def test_workers_import_the_tests_package(client: Client) -> None:
    """The cluster's worker processes inherit the client's sys.path, so ``tests.`` modules import there."""
    found = client.run(lambda: __import__("tests.own_models").own_models.__name__)
    assert set(found.values()) == {"tests.own_models"}


@pytest.mark.parametrize("how", PLACEMENTS)
def test_import_path_model_matches_plain_pytorch(
    client: Client, small_dataset: Path, tiny_model: TinyNet, tiny_weights: Path, tmp_path: Path, how: dict
) -> None:
    out = tmp_path / "o.zarr"
    summary = _run(
        client,
        small_dataset,
        out,
        model="tests.own_models:tiny_cnn",
        model_kwargs={"num_classes": NUM_CLASSES},
        weights=str(tiny_weights),
        **how,
    )
    ds = xr.open_zarr(out)
    assert ds.sizes["category"] == NUM_CLASSES
    assert_close_logits(ds["logits"].values, plain_logits(tiny_model, _images(small_dataset)))
    assert summary.model == "tiny_cnn" and summary.pretrained
    assert summary.model_loads == len(scheduler_workers(client))
    assert _attr(ds, "model_source")["ref"] == "tests.own_models:tiny_cnn"
    assert _attr(ds, "model_source")["kwargs"] == {"num_classes": NUM_CLASSES}


@pytest.mark.parametrize("how", PLACEMENTS)
def test_exported_program_matches_plain_pytorch(
    client: Client, small_dataset: Path, tiny_model: TinyNet, tiny_program: Path, tmp_path: Path, how: dict
) -> None:
    out = tmp_path / "o.zarr"
    summary = _run(client, small_dataset, out, model=str(tiny_program), **how)
    ds = xr.open_zarr(out)
    assert_close_logits(ds["logits"].values, plain_logits(tiny_model, _images(small_dataset)))
    assert summary.model == "tiny" and summary.pretrained
    assert summary.model_loads == len(scheduler_workers(client))
    assert ds.attrs["input_size"] == SMALL_SIZE  # read from the program's input shape


@pytest.mark.parametrize("how", PLACEMENTS[:2])
def test_module_instance_is_shipped_once_per_worker(
    client: Client, small_dataset: Path, tiny_weights: Path, tmp_path: Path, how: dict
) -> None:
    """An instance defined where the workers cannot import it (a local class) is pickled by value."""

    class LocalNet(TinyNet):
        pass

    model = LocalNet(num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(tiny_weights, weights_only=True)["state_dict"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "o.zarr"
    summary = _run(client, small_dataset, out, model=model, weights=str(tiny_weights), **how)
    ds = xr.open_zarr(out)
    assert_close_logits(ds["logits"].values, plain_logits(trained_like(NUM_CLASSES), _images(small_dataset)))
    assert summary.model == "LocalNet"
    # One load per worker: the plugin carrying the pickled model reached each worker once.
    assert summary.model_loads == len(scheduler_workers(client))
    # The caller's model is left as it was (mode and weights).
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _attr(ds, "config")["model"].endswith("<locals>.LocalNet")
    assert len(_attr(ds, "model_source")["digest"]) == 64


def test_module_instance_resume_checks_its_weights(
    client: Client, small_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.zarr"
    _run(client, small_dataset, out, model=trained_like(NUM_CLASSES), chunk_size=32)
    again = _run(client, small_dataset, out, model=trained_like(NUM_CLASSES), resume=True)
    assert again.skipped_chunks == again.chunks
    other = trained_like(NUM_CLASSES, seed=4)
    with pytest.raises(InputError, match="model_sha256"):
        _run(client, small_dataset, out, model=other, resume=True)


def test_compression_of_own_models(
    client: Client, small_dataset: Path, tiny_model: TinyNet, tiny_program: Path, tmp_path: Path
) -> None:
    """bf16 on a split .pt2 program and on an instance: close to fp32, as for torchvision models."""
    images = _images(small_dataset)
    for i, model in enumerate([str(tiny_program), trained_like(NUM_CLASSES)]):
        out = tmp_path / f"o{i}.zarr"
        _run(client, small_dataset, out, model=model, stages=2, compress="bf16")
        ds = xr.open_zarr(out)
        assert ds.attrs["compression"]
        # The instance runs at the default 224x224 input (no metadata says otherwise): compare top-1 only.
        want = plain_logits(tiny_model, images) if i == 0 else None
        if want is not None:
            assert_close_logits(ds["logits"].values, want, rel=5e-2)
        else:
            assert np.isfinite(ds["logits"].values).all()


def test_evaluate_own_models(small_dataset: Path, tiny_program: Path, tiny_weights: Path) -> None:
    for model, kw in [
        (str(tiny_program), {}),
        ("tests.own_models:tiny_cnn", {"weights": tiny_weights, "model_kwargs": {"num_classes": 7}}),
        (trained_like(NUM_CLASSES), {"weights": tiny_weights}),
    ]:
        report = dask_infer.evaluate(
            str(small_dataset), model=model, compress="bf16", stages=2, n_images=64, batch_size=32, **kw
        )
        assert report.n_stages == 2 and report.relative_logit_error < 0.05
        assert report.top1_agreement > 0.8


def test_worker_that_cannot_import_the_model_says_so(
    client: Client, small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code on the client's path only: the client imports it, the workers cannot, and say so in one line."""
    package = tmp_path / "client_only"
    package.mkdir()
    (package / "only_here_models.py").write_text(
        "from tests.own_models import TinyNet\n\ndef make():\n    return TinyNet(num_classes=3)\n"
    )
    monkeypatch.syspath_prepend(str(package))
    with pytest.raises(ModelError) as info:
        _run(client, small_dataset, tmp_path / "o.zarr", model="only_here_models:make", weights=None)
    message = str(info.value)
    assert "cannot import 'only_here_models:make' on worker tcp://127.0.0.1:" in message
    assert "importable" in message and "\n" not in message
    sys.modules.pop("only_here_models", None)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        ("no_such_package_xyz:make", {}, "cannot import 'no_such_package_xyz:make': No module named"),
        ("tests.own_models:missing", {}, "module 'tests.own_models' has no 'missing'"),
        ("tests.own_models:not_a_module", {}, "returned a dict, not a torch.nn.Module"),
        ("tests.own_models:tiny_cnn", {"depth": 3}, "failed with model_kwargs={'depth': 3}"),
        ("resnet18", {"num_classes": 3}, "model_kwargs={'num_classes': 3} given for torchvision model"),
        ("tests.own_models:branchy", {"stages": 2}, "Branchy cannot be split: torch.fx cannot trace it"),
        ("{tmp}/bad.pt2", {}, "is not a saved torch.export program"),
        ("{tmp}/none.pt2", {}, "none.pt2' does not exist"),
    ],
)
def test_bad_models_fail_before_any_cluster(
    small_dataset: Path, tmp_path: Path, model: str, kwargs: dict, match: str
) -> None:
    (tmp_path / "bad.pt2").write_text("not a program")
    kwargs = dict(kwargs)
    options = {"stages": kwargs.pop("stages")} if "stages" in kwargs else {}
    with pytest.raises(ModelError) as info:
        dask_infer.run(
            str(small_dataset),
            str(tmp_path / "o.zarr"),
            model=model.replace("{tmp}", str(tmp_path)),
            model_kwargs=kwargs,
            echo=None,
            **options,
        )
    assert match in str(info.value)
    assert "\n" not in str(info.value)


def test_a_dense_map_model_writes_its_map_with_the_images_dims(
    client: Client, small_dataset: Path, tmp_path: Path
) -> None:
    """An import-path model whose output is a map per image, run with ``activation="none"``: the
    logits are written as (image, output_0, output_1, output_2) and equal a plain forward."""
    out = tmp_path / "map.zarr"
    _run(
        client,
        small_dataset,
        out,
        model="tests.own_models:dense_map",
        activation="none",
        outputs=("logits",),
        crop=SMALL_SIZE,
        chunk_size=32,
    )
    ds = xr.open_zarr(out)
    want = plain_logits(dense_map(), _images(small_dataset))
    assert ds["logits"].dims == ("image", "output_0", "output_1", "output_2")
    assert ds["logits"].shape == want.shape == (200, 4, 16, 16)
    assert_close_logits(ds["logits"].values, want)
