"""profile_graph: per-node costs, shared estimates for repeated work, thread settings."""

from __future__ import annotations

import torch
from torch import nn

from dask_infer.partition.profile import profile_graph, torch_threads
from dask_infer.partition.split import ModelGraph


def _repeated_blocks() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
    ).eval()


def test_nodes_doing_the_same_work_share_one_time() -> None:
    graph = ModelGraph.trace(_repeated_blocks(), "blocks")
    costs = {c.name: c for c in profile_graph(graph, torch.randn(2, 3, 32, 32), repeats=2)}
    # The two middle convolutions are the same op on the same shapes; the first and the
    # strided last one are not.
    assert costs["_2"].time_s == costs["_4"].time_s > 0
    assert costs["_2"].flops == costs["_4"].flops
    assert costs["_6"].flops != costs["_4"].flops
    assert costs["_1"].time_s == costs["_3"].time_s == costs["_5"].time_s
    assert costs["_7"].shape == (2, 16, 16, 16)


def test_torch_threads_sets_and_restores() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
