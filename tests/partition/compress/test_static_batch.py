"""A compiled stage keeps one batch size: a smaller last batch is padded, not compiled again."""

from __future__ import annotations

import torch
from torch import nn

from dask_infer.partition.compress import compress_module


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def test_smaller_batches_are_padded_to_the_compiled_one() -> None:
    from torch._dynamo.utils import counters

    module = _net()
    stage = compress_module(module, "compile")
    stage.pad_batches_to(8)
    with torch.inference_mode():  # as a runtime calls its stages
        x = torch.randn(8, 3, 12, 12)
        stage(x)
        compiled = counters["stats"]["unique_graphs"]
        got = stage(x[:3])
        whole = stage(x)
        want = module(x)
    # No new graph for the batch of 3, and its outputs are those of its 3 images.
    assert counters["stats"]["unique_graphs"] == compiled
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want[:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-5)


def test_without_a_static_batch_other_sizes_run_as_given() -> None:
    module = _net()
    stage = compress_module(module, "bf16")
    stage.pad_batches_to(8)  # eager stages are never padded
    x = torch.randn(3, 3, 12, 12)
    with torch.inference_mode():
        got = stage(x)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, module(x), rtol=2e-2, atol=2e-2)
