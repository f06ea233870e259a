"""Receptive field and output stride, measured on models whose answer is known; stitching exactness."""

from __future__ import annotations

import torch
from torch import nn

from dask_infer.tiles.field import Field, auto_halo, field_cap, measure_field
from dask_infer.tiles.grid import dense_grid
from dask_infer.tiles.stitch import tiled_forward
from tests.tiles.nets import TinyFCN


def test_one_conv_reaches_its_kernel_radius() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 5, padding=2).eval()
    assert measure_field(conv, 3, cap=16) == Field(radius=2, stride=1, capped=False)


def test_strided_net_stride_and_finite_reach() -> None:
    field = measure_field(TinyFCN().eval(), 3, cap=32)
    assert field.stride == 2 and not field.capped and 4 <= field.radius <= 12


def test_auto_halo_rounds_up_to_stride_and_caps() -> None:
    assert auto_halo(Field(radius=5, stride=4, capped=False), 64) == 8
    assert auto_halo(Field(radius=500, stride=8, capped=True), 256) == 128
    assert field_cap(1024) == 256 and field_cap(100) == 50


def test_stitched_map_equals_whole_image_with_auto_halo_and_not_without() -> None:
    net = TinyFCN().eval()
    image = torch.randn(1, 3, 96, 80)
    with torch.inference_mode():
        whole = net(image)[0]
    halo = auto_halo(measure_field(net, 3, cap=16), 32)
    stitched = tiled_forward(net, image, dense_grid(96, 80, 32, halo))
    scale = float(whole.abs().max())
    assert float((stitched - whole).abs().max()) <= 1e-5 * scale
    seams = tiled_forward(net, image, dense_grid(96, 80, 32, 0))
    assert float((seams - whole).abs().max()) > 1e-3 * scale
