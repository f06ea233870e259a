"""What a forward costs: FLOPs as torch counts them, and the activations alive at once."""

from __future__ import annotations

import torch
from torch import nn

from dask_infer.partition.compress.measure import count_flops, forward_cost


def test_peak_activations_of_a_chain_are_the_two_largest_neighbours() -> None:
    """A chain of convolutions holds its input and output at once: the peak is the largest pair of
    neighbouring activations, not their sum over the whole forward."""
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # 16 x 32 x 32 floats = 64 KiB per image
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 64, 3, padding=1),  # 256 KiB
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 8, 3, padding=1),  # 32 KiB
    ).eval()
    x = torch.zeros(1, 3, 32, 32)
    flops, peak = forward_cost(net, x)
    assert flops == count_flops(net, x)
    pair = (16 + 64) * 32 * 32 * 4
    total = (16 + 64 + 8) * 32 * 32 * 4
    assert pair <= peak < total
    # It scales with the batch: what chunk sizing multiplies by the batch size.
    assert forward_cost(net, torch.zeros(4, 3, 32, 32))[1] == 4 * peak
