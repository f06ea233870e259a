"""Weights files: .pt/.pth state_dicts and .safetensors, read with weights_only, with their metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dask_infer import ModelError
from dask_infer.models import build_model, load_weights_file, weights_metadata_key


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_weights_round_trip(tmp_path: Path, suffix: str) -> None:
    src = build_model("mobilenet_v3_small", num_classes=4, seed=3)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.module.state_dict().items()}
    if suffix == ".safetensors":
        save_file(
            state, str(path), metadata={weights_metadata_key: json.dumps({"class_names": list("abcd")})}
        )
    else:
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    loaded = build_model("mobilenet_v3_small", weights=path)
    assert loaded.num_classes == 4 and loaded.pretrained
    if suffix == ".safetensors":
        assert loaded.class_names == tuple("abcd")
    with torch.inference_mode():
        assert torch.equal(loaded.module(_x()), src.module(_x()))


def test_imagenet_sized_weights_get_imagenet_names(tmp_path: Path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(build_model("resnet18").module.state_dict(), path)
    loaded = build_model("resnet18", weights=path)
    assert loaded.class_names is not None and loaded.class_names[0] == "tench"


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(build_model("resnet18", num_classes=2).module, path)  # a whole pickled module
    with pytest.raises(ModelError, match="weights_only=True"):
        load_weights_file(path)


def test_head_size_passes_over_a_first_layer_with_other_channels() -> None:
    """A 1000-class ResNet-18 whose conv1 takes 6 bands: the head says 1000, not conv1's 64 filters."""
    import torchvision

    from dask_infer.models.weights import head_size

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 6, 7, 7)
    assert head_size("resnet18", state) is None  # the default head: nothing to change
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    assert head_size("resnet18", state) == 10
