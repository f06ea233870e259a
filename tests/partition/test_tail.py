"""Dense models that end by resizing their map to the input's size: cut without that resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dask_infer.errors import ModelError
from dask_infer.models import build_model
from dask_infer.partition import partition_model
from dask_infer.partition.split import candidate_cuts, resize_tail, run_stages, split_model
from dask_infer.partition.tail import ResizeTail
from tests.tiles.nets import TinyFCN


class _ScaledUp(nn.Module):
    """Resizes by a factor, not to the input's size: nothing to take out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.b(torch.relu(self.a(x))), scale_factor=2.0, mode="nearest")


def test_a_map_resized_to_the_input_has_no_cut_point_until_the_resize_is_taken_out() -> None:
    model = TinyFCN().eval()
    assert candidate_cuts(model) == ()
    assert candidate_cuts(model, strip_tail=True) == ("body_0", "body_1", "body_2", "body_3")
    assert resize_tail(model) == ResizeTail(mode="bilinear", align_corners=False)
    with pytest.raises(ModelError, match="has only 0 cut points"):
        partition_model(model, 2, sample=(1, 3, 40, 36), repeats=1)


@pytest.mark.parametrize("side", [(40, 36), (33, 47)])
def test_stages_and_the_resize_give_the_models_bits(side: tuple[int, int]) -> None:
    """Odd sizes too, where the map's size times the output stride is not the input's."""
    model = TinyFCN().eval()
    x = torch.randn(2, 3, *side)
    stages = split_model(model, ["body_1", "body_3"], strip_tail=True)
    with torch.no_grad():
        want = model(x)
        assert stages[-1](stages[1](stages[0](x))).shape[-2:] != want.shape[-2:]
        assert torch.equal(run_stages(stages, x, resize_tail(model)), want)


@pytest.mark.parametrize("name", ["fcn_resnet50", "lraspp_mobilenet_v3_large"])
def test_torchvision_segmentation_models_cut_in_two(name: str) -> None:
    model = build_model(name, num_classes=3).module.eval()
    partition = partition_model(model, 2, sample=(1, 3, 64, 48), repeats=1, strip_tail=True, balance="flops")
    assert len(partition.plan.cut_points) == 1  # the check inside compares with the whole model, bit for bit
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(run_stages(partition.modules, x, resize_tail(model)), model(x))


def test_other_endings_are_left_alone() -> None:
    model = _ScaledUp().eval()
    assert resize_tail(model) is None
    assert candidate_cuts(model, strip_tail=True) == candidate_cuts(model)
