"""Tracing, cut points and stage modules on small hand-written models."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from dask_infer.errors import ModelError
from dask_infer.partition import candidate_cuts, run_stages, split_model


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)) + x)


class Net(nn.Module):
    """Not an nn.Sequential: residual blocks, a learned token, a functional head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = Residual(8)
        self.block2 = Residual(8)
        self.bias = nn.Parameter(torch.randn(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        x = x.mean((2, 3)) + self.bias
        return self.fc(x)


def test_cuts_only_where_one_tensor_crosses() -> None:
    cuts = candidate_cuts(Net())
    # Inside a residual block both the skip and the branch are live, so no cut there.
    assert not any("conv" in c or "norm" in c for c in cuts)
    assert cuts == ("stem", "block1_add", "block1_relu", "block2_add", "block2_relu", "mean", "add")


@pytest.mark.parametrize(
    "cut_points",
    [(), ("stem",), ("block1_relu", "mean"), ("stem", "block1_relu", "block2_relu", "mean", "add")],
)
def test_stages_reproduce_the_model_exactly(cut_points: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 9, 9)
    stages = split_model(model, cut_points)
    assert len(stages) == len(cut_points) + 1
    with torch.no_grad():
        assert torch.equal(run_stages(stages, x), model(x))


def test_stages_do_not_share_weights_with_the_model_by_default() -> None:
    model = Net().eval()
    stages = split_model(model, ("block1_relu",))
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not model_ptrs & {p.data_ptr() for s in stages for p in s.parameters()}
    shared = split_model(model, ("block1_relu",), copy_model=False)
    assert {p.data_ptr() for s in shared for p in s.parameters()} <= model_ptrs


def test_weights_read_by_get_attr_go_to_the_stage_that_reads_them() -> None:
    stages = split_model(Net(), ("mean",))
    assert [name for name, _ in stages[1].named_parameters()] == ["bias", "fc.weight", "fc.bias"]
    assert not any(name == "bias" for name, _ in stages[0].named_parameters())


def test_stages_pickle() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 5, 5)
    stages = [pickle.loads(pickle.dumps(s)) for s in split_model(model, ("block1_relu",))]
    with torch.no_grad():
        assert torch.equal(run_stages(stages, x), model(x))


def test_split_model_leaves_the_model_in_training_mode() -> None:
    model = Net().train()
    split_model(model, ("stem",))
    assert model.training and model.block1.norm.training


@pytest.mark.parametrize(
    ("cut_points", "match"),
    [
        (
            ("block1_conv",),
            "'block1_conv' is not a cut point of Net; valid cut points are stem, block1_add, block1_relu",
        ),
        (("nowhere",), "'nowhere' is not a cut point"),
        (("mean", "stem"), "not in execution order"),
        (("stem", "stem"), "not in execution order or repeat a node"),
        ("stem", "must be a sequence of node names, not one string"),
    ],
)
def test_bad_cut_points(cut_points: tuple[str, ...], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        split_model(Net(), cut_points)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def test_untraceable_model_is_named_with_the_reason() -> None:
    with pytest.raises(ModelError, match="DataDependent cannot be split: torch.fx cannot trace it"):
        candidate_cuts(DataDependent())


def test_multi_input_model_is_refused() -> None:
    with pytest.raises(ModelError, match=r"forward takes 2 inputs \(x, y\); only single-input models"):
        candidate_cuts(TwoInputs())
