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


def test_a_weights_file_fills_the_model_without_drawing_weights(tmp_path: Path) -> None:
    """A file that fits the architecture exactly becomes the model's tensors (built on the meta
    device, nothing drawn at random); its outputs are those of the model it was saved from."""
    from dask_infer.models import registry

    src = build_model("resnet18", num_classes=5, seed=7)
    path = tmp_path / "r18.pt"
    torch.save(src.module.state_dict(), path)
    state = load_weights_file(path)[0]
    assigned = registry._assigned("resnet18", {"weights": None, "num_classes": 5}, state)
    assert assigned is not None
    assert all(p.data_ptr() == state[k].data_ptr() for k, p in assigned.named_parameters())
    loaded = build_model("resnet18", weights=path)
    assert not any(t.is_meta for t in (*loaded.module.parameters(), *loaded.module.buffers()))
    assert all(p.requires_grad for p in loaded.module.parameters()) and not loaded.module.training
    with torch.inference_mode():
        assert torch.equal(loaded.module(_x()), src.module.eval()(_x()))


def test_weights_saved_in_half_precision_still_give_an_fp32_model(tmp_path: Path) -> None:
    src = build_model("resnet18", num_classes=3, seed=1)
    path = tmp_path / "half.pt"
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in src.module.state_dict().items()}, path
    )
    from dask_infer.models import registry

    state = load_weights_file(path)[0]
    assert registry._assigned("resnet18", {"weights": None, "num_classes": 3}, state) is None
    loaded = build_model("resnet18", weights=path)
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    with torch.inference_mode():
        ref = src.module.half().float().eval()(_x())
        assert torch.allclose(loaded.module(_x()), ref, rtol=0, atol=0)


def test_a_weights_file_with_six_bands_builds_a_six_band_model(tmp_path: Path) -> None:
    import torchvision

    state = torchvision.models.resnet18(weights=None, num_classes=4).state_dict()
    state["conv1.weight"] = torch.randn(64, 6, 7, 7)
    path = tmp_path / "bands.pt"
    torch.save(state, path)
    loaded = build_model("resnet18", weights=path)
    assert loaded.module.conv1.in_channels == 6 and len(loaded.mean) == 6
    assert torch.equal(loaded.module.conv1.weight, state["conv1.weight"])
    with torch.inference_mode():
        assert loaded.module(torch.randn(1, 6, 64, 64)).shape == (1, 4)
