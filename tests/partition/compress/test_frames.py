"""A process that builds many compiled modules of one class compiles every one of them."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.utils import counters

from dask_infer.partition.compress import compress_module


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_the_ninth_compiled_module_of_a_class_is_compiled_too() -> None:
    """Dynamo compiles one code object at most 8 times; compiled as the class's ``forward``,
    the ninth instance would run eagerly. Each build must add a compiled graph, and match eager."""
    limit = torch._dynamo.config.recompile_limit
    x = torch.randn(2, 3, 8, 8)
    for _ in range(limit + 2):
        stage = compress_module(_Small().eval(), "fp32+compile")
        before = counters["stats"]["unique_graphs"]
        with torch.inference_mode():
            got = stage(x)
            want = stage.forward_eager(x)
        assert counters["stats"]["unique_graphs"] > before
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
