"""``--weights ResNet18_Weights.IMAGENET1K_V1``: torchvision weights read from the local torch cache only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from dask_infer.errors import ModelError
from dask_infer.models.registry import build_model
from dask_infer.models.weights import cached_weights

ENUM = "ResNet18_Weights.IMAGENET1K_V1"


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def _cache(torch_home: Path, seed: int = 5) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised ResNet-18 saved where torchvision would have downloaded its weights."""
    url = torchvision.models.get_weight(ENUM).url
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(seed)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    return path, state


def test_enum_name_loads_the_cached_file_with_its_metadata(torch_home: Path) -> None:
    path, state = _cache(torch_home)
    loaded = build_model("resnet18", weights=ENUM)
    assert loaded.weights == str(path) and loaded.pretrained
    assert loaded.num_classes == 1000 and loaded.input_size == 224
    assert loaded.class_names is not None and loaded.class_names[0] == "tench"
    assert loaded.mean == (0.485, 0.456, 0.406)
    assert all(torch.equal(state[k], v) for k, v in loaded.module.state_dict().items())


def test_enum_name_not_in_the_cache_names_where_to_put_it(
    torch_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(ModelError) as info:
        build_model("resnet18", weights=ENUM)
    message = str(info.value)
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"weights {ENUM!r} are not in the local torch cache" in message
    assert repr(str(expected)) in message and "never downloaded" in message


def test_enum_name_of_another_model_or_unknown(torch_home: Path) -> None:
    _cache(torch_home)
    with pytest.raises(ModelError, match="was made for 'resnet18', not 'resnet34'"):
        build_model("resnet34", weights=ENUM)
    with pytest.raises(ModelError, match="'ResNet18_Weights.BOGUS' are not torchvision weights"):
        cached_weights("ResNet18_Weights.BOGUS")


def test_enum_name_into_an_import_path_model(torch_home: Path) -> None:
    """Torchvision weights fit a factory that builds the same architecture."""
    _cache(torch_home)
    loaded = build_model("torchvision.models:resnet18", weights=ENUM)
    assert loaded.num_classes == 1000 and loaded.name == "resnet18"
