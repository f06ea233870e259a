"""How many channels a model's first layer takes, and fitting that layer to a weights file's.

A torchvision architecture is built for RGB; a state_dict trained on N-band images
(multispectral, gray) has a first convolution of N input channels. The layer is rebuilt
with N input channels before the state_dict is loaded, so ``resnet18`` with such weights
runs N-band stores without code.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["adapt_input_channels", "first_conv", "input_channels"]


def first_conv(module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first ``Conv2d`` of ``module`` in definition order (torchvision's is the input layer)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return name, sub
    return None


def input_channels(module: nn.Module) -> int | None:
    """Channels the first convolution of ``module`` takes; ``None`` when it has none."""
    found = first_conv(module)
    return None if found is None else int(found[1].in_channels)


def adapt_input_channels(module: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """Rebuild the first convolution of ``module`` with the input channels ``state`` gives it.

    Nothing changes when ``state`` has no weight for that layer or it already fits; the
    rebuilt layer keeps every other setting (kernel, stride, padding, groups, bias). A
    mismatch other than in input channels is left for ``load_state_dict`` to report.

    Returns
    -------
    int or None
        The input channels the module takes afterwards (``None``: no convolution).
    """
    found = first_conv(module)
    if found is None:
        return None
    name, conv = found
    weight = state.get(f"{name}.weight")
    if weight is None or weight.ndim != 4 or conv.groups != 1:
        return int(conv.in_channels)
    channels = int(weight.shape[1])
    if channels == conv.in_channels or tuple(weight.shape[2:]) != tuple(conv.kernel_size):
        return int(conv.in_channels)
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, new)
    return channels
