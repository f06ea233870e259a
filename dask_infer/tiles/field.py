"""How far one input pixel reaches in a dense model's output, and the output's stride, measured.

A model that returns a map is run on a blank and on a textured (seeded noise) input, and on
copies with one pixel changed: the output pixels whose change exceeds ``threshold`` of the
largest change are those the pixel reaches (its receptive field seen from the output), and
the smallest shift of the changed pixel on the blank input that shifts the response by as
much, exactly, is the output stride. Both
are measured, not derived from the layers, so any fully convolutional model works; what
lies beyond ``cap`` is reported as the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dask_infer.models.tracing import running_modules

__all__ = ["Field", "auto_halo", "field_cap", "measure_field"]

_STRIDES = (1, 2, 4, 8, 16, 32)
_MARGIN = 32


@dataclass(frozen=True)
class Field:
    """What :func:`measure_field` found.

    Attributes
    ----------
    radius
        Output pixels, from the changed input pixel, that change by more than the threshold
        (Chebyshev distance); at most the cap.
    stride
        Output stride: shifting the input by a multiple of it shifts the output exactly
        (1 when no shift up to 32 does, as with global pooling).
    capped
        Whether the reach met the cap, so it may be larger.
    """

    radius: int
    stride: int
    capped: bool


@torch.inference_mode()
def measure_field(module: nn.Module, channels: int, *, cap: int = 128, threshold: float = 1e-6) -> Field:
    """The receptive field radius and output stride of ``module``, a model returning (N, C, H, W) maps.

    Parameters
    ----------
    module
        The model, in eval mode, taking (N, ``channels``, H, W) and returning maps of the
        input's height and width.
    channels
        Input channels.
    cap
        Largest radius measured; the input is ``2 * (cap + 32)`` pixels a side.
    threshold
        Share of the largest change below which an output pixel counts as unchanged: by
        default any change counts, so the halo holds the whole field and tiles stitch exactly.
    """
    size = 2 * (cap + _MARGIN)
    centre = size // 2
    shifts = (0, *_STRIDES)
    blank = torch.zeros((1 + len(shifts), channels, size, size))
    for i, d in enumerate(shifts, start=1):
        blank[i, :, centre + d, centre + d] = 1.0
    # A textured background too: a model may pass nothing of one pixel on a blank input.
    noise = torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(0))
    textured = torch.cat([noise, noise])
    textured[1, :, centre, centre] += 1.0
    with running_modules():
        out = module(torch.cat([blank, textured]).contiguous(memory_format=torch.channels_last)).float()
    responses = out[1 : 1 + len(shifts)] - out[:1]
    changed = torch.maximum(responses[0].abs().amax(dim=0), (out[-1] - out[-2]).abs().amax(dim=0))
    peak = float(changed.max())
    if peak == 0.0:
        return Field(0, 1, False)
    ys, xs = torch.nonzero(changed > threshold * peak, as_tuple=True)
    reach = int(torch.maximum((ys - centre).abs(), (xs - centre).abs()).max())
    capped = reach >= cap
    # Far from the borders, whose zero padding a shifted response meets at other places.
    lo, hi = centre - cap // 2, centre + cap // 2
    still = responses[0][:, lo:hi, lo:hi]
    scale = float(still.abs().max())
    # No shift up to 32 moves the response exactly (global pooling): no stride to align to.
    stride = 1
    for i, d in enumerate(_STRIDES, start=1):
        if scale == 0:
            break
        moved = responses[i][:, lo + d : hi + d, lo + d : hi + d]
        if float((moved - still).abs().max()) <= 1e-4 * scale:
            stride = d
            break
    return Field(min(reach, cap), stride, capped)


def field_cap(tile: int) -> int:
    """The largest halo ``--halo auto`` gives tiles of ``tile``: half the tile, at most 256 pixels.

    A halo of half the tile already computes four pixels per pixel kept.
    """
    return max(1, min(tile // 2, 256))


def auto_halo(field: Field, tile: int) -> int:
    """The halo ``--halo auto`` uses: the reach rounded up to the stride, at most :func:`field_cap`."""
    step = max(1, field.stride)
    halo = -(-field.radius // step) * step
    cap = field_cap(tile)
    return min(halo, cap - cap % step if cap >= step else cap)
