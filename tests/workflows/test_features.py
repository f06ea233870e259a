"""Feature layers: a named module's output written as ``features`` (image, feature), on a real cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client
from torch import nn

import dask_infer
from dask_infer import DaskInferError, ModelError
from dask_infer.models.features import take_features, tap_layer
from dask_infer.models.heads import probe_outputs
from dask_infer.models.registry import build_model
from tests.reference import assert_close_logits, reference_logits, run_small

CLI = [sys.executable, "-m", "dask_infer.cli"]


def _plain_features(images: np.ndarray, weights: Path, layer: str) -> np.ndarray:
    """``torch.flatten(<layer>(its input), 1)`` from a plain forward of the small ResNet-18.

    The layer's input is caught by a pre-hook and the layer called again by hand, so the
    reference does not rest on the forward hook the code under test uses.
    """
    loaded = build_model("resnet18", weights=str(weights))
    module = loaded.module.eval()
    target = module.get_submodule(layer)
    inputs: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        module((x - mean) / std)
        handle.remove()
        return torch.flatten(target(inputs[0]), 1).numpy()


def _images(src: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(src), mode="r")["images"][:])


def test_avgpool_features_equal_a_plain_forward(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.zarr"
    run_small(
        client,
        small_dataset,
        out,
        small_weights,
        chunk_size=16,
        outputs=("logits", "features"),
        feature_layer="avgpool",
    )
    ds = dask_infer.open_results(str(out))
    images = _images(small_dataset)
    assert ds["features"].dims == ("image", "feature") and ds["features"].shape == (200, 512)
    assert ds["features"].dtype == np.float32
    assert_close_logits(ds["features"].values, _plain_features(images, small_weights, "avgpool"))
    assert_close_logits(ds["logits"].values, reference_logits(images, "resnet18", str(small_weights)))
    np.testing.assert_array_equal(ds["feature"].values, np.arange(512))


def test_features_only_in_a_pipeline_from_either_stage(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """Two stages cut by parameters: ``layer1.0.conv1`` runs in stage 0, ``avgpool`` in stage 1."""
    pipe = {"stages": 2, "balance": "params", "placement": "pipeline", "chunk_size": 32, "rebalance": None}
    images = _images(small_dataset)
    for layer, size in (("layer1.0.conv1", 64 * 8 * 8), ("avgpool", 512)):
        out = tmp_path / f"{layer}.zarr"
        summary = run_small(
            client, small_dataset, out, small_weights, outputs=("features",), feature_layer=layer, **pipe
        )
        assert summary.placement["mode"] == "pipeline"
        ds = xr.open_zarr(out)
        assert set(ds.data_vars) == {"features"} and ds["features"].shape == (200, size)
        assert_close_logits(ds["features"].values, _plain_features(images, small_weights, layer))
        (cut,) = json.loads(ds.attrs["stage_plan"])["cut_points"]
        assert cut.startswith("layer4"), cut  # so layer1 is in stage 0 and avgpool in stage 1


def test_unknown_layer_is_one_line_naming_valid_ones_before_any_cluster(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    args = ["run", "--input", str(small_dataset), "--output", str(tmp_path / "o.zarr"), "--model", "resnet18"]
    args += ["--weights", str(small_weights), "--outputs", "features", "--feature-layer", "avgpol"]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: feature_layer='avgpol'"), done.stderr
    assert "avgpool" in lines[0] and "fc" in lines[0]
    assert "dashboard" not in done.stdout and not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"outputs": ("features",)}, "no feature_layer is given"),
        ({"feature_layer": "avgpool"}, "lack 'features'"),
        ({"outputs": ("features",), "feature_layer": ""}, "must name a module"),
        ({"activation": "none"}, "need softmax or sigmoid"),
        ({"activation": "tanh"}, "activation='tanh' is not one of softmax, sigmoid, none"),
    ],
)
def test_inconsistent_feature_and_activation_options_are_refused(options: dict, match: str) -> None:
    with pytest.raises(DaskInferError, match=match):
        dask_infer.RunConfig(input="a.zarr", output="b.zarr", **options)


def test_a_container_a_split_model_traces_through_is_refused() -> None:
    module = build_model("resnet18", num_classes=10).module
    shapes = probe_outputs(module, (1, 3, 32, 32), activation="softmax", feature_layer="layer4")
    assert shapes.result == (10,) and shapes.features == 512 * 1 * 1
    with pytest.raises(ModelError, match="runs 0 times per forward once cut into 2 stages"):
        probe_outputs(
            module,
            (1, 3, 32, 32),
            activation="softmax",
            feature_layer="layer4",
            cut_points=["layer2_1_relu_1"],
        )
    with pytest.raises(ModelError, match="runs 2 times per forward"):
        probe_outputs(module, (1, 3, 32, 32), activation="softmax", feature_layer="layer1.0.relu")


def test_int8_and_compile_with_features_are_refused(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    for recipe in ("int8", "fp32+compile", "prune=0.3"):
        with pytest.raises(ModelError, match="cannot be read from stage 0 compressed with"):
            dask_infer.run(
                str(small_dataset),
                str(tmp_path / "o.zarr"),
                model="resnet18",
                weights=str(small_weights),
                outputs=("features",),
                feature_layer="avgpool",
                compress=recipe,
                echo=None,
            )


def test_the_tap_survives_a_deep_copy_and_takes_each_batch_once() -> None:
    import copy

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)
    )
    tap_layer(model, "2")
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8)
    with torch.inference_mode():
        model(x[:4])
        model(x[4:])
        twin(x[:1])
        want = torch.flatten(model[2](model[1](model[0](x))), 1)
        take_features([model], None)
        model(x[:4])
        model(x[4:])
    got = take_features([model], 6)
    assert got is not None and torch.equal(got, want)
    assert take_features([model], 6) is None
    assert take_features([twin], 1) is not None
    with pytest.raises(RuntimeError, match="gave 6 rows for 5 images"):
        model(x)
        take_features([model], 5)
