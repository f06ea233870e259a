"""partition_model on torchvision classifiers: exactness, balance, bad input, plans."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from dask_infer.errors import DaskInferError, ModelError
from dask_infer.models import build_model
from dask_infer.partition import (
    StagePlan,
    build_stage,
    format_plan,
    partition_model,
    run_stages,
    split_model,
)
from dask_infer.partition.profile import profile_graph
from dask_infer.partition.split import ModelGraph
from dask_infer.partition.stage_plan import PlanError

# (name, builder kwargs, input size): small inputs where the model allows; ViT is built
# for that size, Swin pads its windows.
REPRESENTATIVE = [
    ("resnet50", {}, 64),
    ("mobilenet_v3_large", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("densenet121", {}, 64),
    ("convnext_tiny", {}, 64),
    ("vit_b_16", {"image_size": 64}, 64),
    ("swin_t", {}, 64),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), REPRESENTATIVE, ids=[c[0] for c in REPRESENTATIVE])
def test_stages_are_bit_identical_to_the_whole_model(name: str, kwargs: dict, size: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    stages, plan = partition_model(model, 4, balance="flops", sample=x, name=name, repeats=1, verify=False)
    assert len(stages) == 4 and len(plan.cut_points) == 3
    with torch.no_grad():
        expected = model(x)
        got = run_stages(stages, x)
    assert torch.equal(got, expected)
    # Each stage consumes exactly the tensor the plan says crosses the cut.
    out = x
    with torch.no_grad():
        for stage, shape in zip(stages[:-1], plan.cut_shapes, strict=True):
            out = stage(out)
            assert tuple(out.shape) == shape
    assert sum(s.flops for s in plan.stages) > 0


def test_resnet50_five_stages_by_time_is_balanced() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    # Timed as each stage runs in a CPU pipeline: a batch of 4 at 224 on one thread. With
    # every core per stage, late layers use the threads worse than early ones, and a busy
    # second core makes multi-threaded node times erratic.
    before = torch.get_num_threads()
    stages, plan = partition_model(
        model, 5, balance="time", sample=(4, 3, 224, 224), name="resnet50", repeats=5, threads=1
    )
    assert torch.get_num_threads() == before
    print(format_plan(plan))
    assert len(stages) == 5 and plan.threads == 1
    assert "1 thread," in format_plan(plan)
    assert plan.imbalance <= 1.15, format_plan(plan)
    assert StagePlan.from_json(plan.to_json()) == plan


def test_resnet50_five_stages_by_flops_is_balanced() -> None:
    model = torchvision.models.resnet50(weights=None).eval()
    _, plan = partition_model(model, 5, balance="flops", sample=(1, 3, 224, 224), repeats=1, verify=False)
    assert plan.imbalance <= 1.10
    assert sum(s.flops for s in plan.stages) == pytest.approx(8.2e9, rel=0.02)
    assert sum(s.params for s in plan.stages) == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_the_users_model_is_not_modified(small: nn.Module) -> None:
    model = torchvision.models.resnet18(weights=None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    partition_model(model, 3, balance="time", sample=(2, 3, 32, 32), repeats=1)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes


def test_plan_records_costs_and_shapes(small: nn.Module) -> None:
    stages, plan = partition_model(
        small, 3, balance="params", sample=(2, 3, 32, 32), name="resnet18", repeats=1
    )
    assert plan.model == "resnet18" and plan.balance == "params" and plan.input_shape == (2, 3, 32, 32)
    assert plan.output_shape == (2, 1000) and plan.num_stages == 3
    assert all(len(shape) == 4 and shape[0] == 2 for shape in plan.cut_shapes)
    assert list(plan.cut_bytes) == [4 * torch.Size(s).numel() for s in plan.cut_shapes]
    assert [s.params for s in plan.stages] == [sum(p.numel() for p in m.parameters()) for m in stages]
    assert all(s.time_s > 0 and s.memory_bytes > s.weight_bytes for s in plan.stages)
    assert plan.imbalance == max(plan.stage_costs) / (sum(plan.stage_costs) / 3)
    assert "imbalance (max/mean params)" in format_plan(plan)


def test_worker_rebuilds_stages_from_the_plan_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = build_model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    _, plan = partition_model(loaded.module, 3, balance="flops", sample=x, name="resnet18", repeats=1)
    plan = StagePlan.from_json(plan.to_json())
    weights = tmp_path / "resnet18.pt"
    torch.save(loaded.module.state_dict(), weights)
    rebuilt = [build_stage(plan, i, weights=weights) for i in range(plan.num_stages)]
    by_names = split_model(loaded.module, plan.cut_points)
    with torch.no_grad():
        expected = loaded.module(x)
        assert torch.equal(run_stages(rebuilt, x), expected)
        assert torch.equal(run_stages(by_names, x), expected)


def test_plans_without_threads_still_load(small: nn.Module) -> None:
    _, plan = partition_model(small, 2, balance="flops", sample=(1, 3, 32, 32), repeats=1, verify=False)
    data = plan.to_dict()
    assert data["threads"] is None
    del data["threads"]
    assert StagePlan.from_dict(data) == plan
    assert " thread" not in format_plan(plan)


def test_build_stage_needs_a_model_name_and_a_valid_index(small: nn.Module) -> None:
    _, plan = partition_model(small, 2, balance="flops", sample=(1, 3, 32, 32), repeats=1)
    with pytest.raises(PlanError, match="no model name"):
        build_stage(plan, 0)
    named = StagePlan.from_dict({**plan.to_dict(), "model": "resnet18"})
    with pytest.raises(PlanError, match="stage index 2 is out of range; the plan has stages 0..1"):
        build_stage(named, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": 0}, "stages=0 must be a whole number >= 1"),
        ({"stages": -2}, "stages=-2 must be a whole number >= 1"),
        ({"stages": 2.0}, "stages=2.0 must be a whole number >= 1"),
        (
            {"stages": 99, "name": "resnet18"},
            r"stages=99 but resnet18 has only \d+ cut points; use stages <= \d+",
        ),
        (
            {"stages": 2, "balance": "speed"},
            "balance='speed' is not one of time, flops, params, memory",
        ),
        (
            {"stages": 2, "sample": (3, 32, 32)},
            r"sample of shape \(3, 32, 32\) must be a batch .*add a batch dimension",
        ),
        ({"stages": 2, "sample": (1, 1, 32, 32)}, r"sample of shape \(1, 1, 32, 32\) does not fit ResNet"),
        ({"stages": 2, "sample": (1, 3, 0, 32)}, "must be positive integers"),
        ({"stages": 2, "repeats": 0}, "repeats=0 must be a whole number >= 1"),
        ({"stages": 2, "threads": 0}, "threads=0 must be a whole number >= 1 or None"),
    ],
)
def test_bad_input_gets_one_clear_error(small: nn.Module, kwargs: dict, match: str) -> None:
    kwargs = {"sample": (1, 3, 32, 32), "repeats": 1, **kwargs}
    with pytest.raises(DaskInferError, match=match):
        partition_model(small, **kwargs)


def test_vit_sample_of_the_wrong_size_is_named() -> None:
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=32, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    with pytest.raises(
        ModelError, match=r"sample of shape \(1, 3, 32, 32\) does not fit vit .*Wrong image height"
    ):
        partition_model(model, 2, sample=(1, 3, 32, 32), name="vit", repeats=1)


class Counting(nn.Module):
    """Its forward reads Python state that tracing freezes: stages would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.calls = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.b(self.a(x) * self.calls)


def test_stages_that_differ_from_the_model_are_refused() -> None:
    with pytest.raises(ModelError, match="do not reproduce its output bit for bit"):
        partition_model(Counting(), 2, sample=(1, 3, 4, 4), repeats=1)


class NoCut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_model_without_cut_points_is_explained() -> None:
    with pytest.raises(
        ModelError, match=r"stages=2 but NoCut has only 0 cut points \(it has no point where a single"
    ):
        partition_model(NoCut(), 2, sample=(1, 3, 4, 4), repeats=1)
    stages, plan = partition_model(NoCut(), 1, sample=(1, 3, 4, 4), repeats=1)
    assert len(stages) == 1 and plan.cut_points == () and plan.imbalance == 1.0


def test_a_costly_transfer_moves_the_time_balanced_cut_to_a_smaller_activation() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    free = partition_model(model, 2, sample=(2, 3, 64, 64), repeats=1)
    # A second per byte: moving any activation dwarfs every layer's time.
    costly = partition_model(model, 2, sample=(2, 3, 64, 64), repeats=1, transfer_s_per_byte=1.0)
    assert costly.plan.cut_bytes[0] <= free.plan.cut_bytes[0]
    graph = ModelGraph.trace(copy.deepcopy(model))
    costs = profile_graph(graph, torch.randn(2, 3, 64, 64), repeats=1)
    smallest = min(costs[i].nbytes for i in graph.candidates if costs[i].shape is not None)
    assert costly.plan.cut_bytes[0] == smallest
    with pytest.raises(ModelError, match="transfer_s_per_byte=-1.0 must be a finite number >= 0"):
        partition_model(model, 2, sample=(2, 3, 64, 64), repeats=1, transfer_s_per_byte=-1.0)


def test_a_fused_profile_prices_compiled_stages_and_keeps_pointwise_ops_with_their_producer() -> None:
    """``fused=True``: batch norms, ReLUs and residual adds cost nothing, no cut separates one
    from the node it reads, and the stages still reproduce the model bit for bit."""
    model = torchvision.models.resnet18(num_classes=10).eval()
    graph = ModelGraph.trace(copy.deepcopy(model))
    costs = profile_graph(graph, torch.randn(2, 3, 64, 64), repeats=1)
    module = graph.module
    kinds = {
        n.name: type(module.get_submodule(str(n.target))).__name__ if n.op == "call_module" else n.name
        for n in graph.order
    }
    pointwise = {c.name for c in costs if c.pointwise}
    assert {"bn1", "relu", "layer1_0_add", "layer4_1_relu_1"} <= pointwise
    assert not any(kinds[name] in ("Conv2d", "Linear", "MaxPool2d") for name in pointwise)

    for stages in (2, 3, 4):
        eager = partition_model(model, stages, sample=(2, 3, 64, 64), repeats=1)
        fused = partition_model(model, stages, sample=(2, 3, 64, 64), repeats=1, fused=True)
        assert fused.plan.fused and not eager.plan.fused
        assert eager.plan.num_candidates > fused.plan.num_candidates
        # After a residual add comes its ReLU: a fused cut never falls between them.
        assert not any(cut.endswith("_add") for cut in fused.plan.cut_points)
        assert all(s.time_s > 0 for s in fused.plan.stages)
    assert "as compiled, pointwise ops fused" in format_plan(fused.plan)
    assert StagePlan.from_dict(fused.plan.to_dict()) == fused.plan
    # What fusing takes out of a profile: the pointwise nodes' time, part of the whole.
    heavy = sum(c.time_s for c in costs if not c.pointwise)
    assert 0 < heavy < sum(c.time_s for c in costs)
    again = profile_graph(graph, torch.randn(2, 3, 64, 64), repeats=1)
    assert [c.pointwise for c in again] == [c.pointwise for c in costs]
