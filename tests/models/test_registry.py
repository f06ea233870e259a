"""Model registry: names, defaults, seeded random models, errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dask_infer import ModelError
from dask_infer.models import build_model, model_defaults


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_random_model_is_seeded_and_in_eval_mode() -> None:
    a, b = build_model("resnet18", num_classes=7), build_model("resnet18", num_classes=7)
    assert not a.module.training and a.num_classes == 7 and not a.pretrained
    with torch.inference_mode():
        assert torch.equal(a.module(_x()), b.module(_x()))


def test_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="did you mean resnet50"):
        build_model("resnet5O")
    with pytest.raises(ModelError, match="does not exist"):
        build_model("resnet18", weights=tmp_path / "none.pt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        build_model("resnet18", weights=bad)
    other = tmp_path / "vgg.pt"
    torch.save(build_model("squeezenet1_0", num_classes=3).module.state_dict(), other)
    with pytest.raises(ModelError, match="does not fit model 'resnet18'"):
        build_model("resnet18", weights=other)


def test_defaults_come_from_torchvision_metadata() -> None:
    assert model_defaults("inception_v3").input_size == 299
    assert model_defaults("resnet50").input_size == 224
