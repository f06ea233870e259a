"""Activations passed between a pipeline's stage tasks, as numpy bytes that keep dtype and layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Activation"]


@dataclass(frozen=True)
class Activation:
    """A tensor passed from one stage's task to the next, as raw bytes and a dtype name.

    numpy has no bfloat16, and distributed serialises tensors through numpy, so the
    bytes travel under an integer view of the same width. A channels-last tensor travels
    as its (N, H, W, C) bytes and comes back channels-last, so the next stage runs the
    same kernels it would inside the whole model.
    """

    data: np.ndarray
    dtype: str
    channels_last: bool = False

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Activation:
        """Copy ``tensor`` to host memory, keeping its memory format."""
        t = tensor.detach().to("cpu")
        channels_last = (
            t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        )
        t = t.permute(0, 2, 3, 1) if channels_last else t.contiguous()
        if t.dtype == torch.bfloat16:
            return cls(t.view(torch.int16).numpy(), "bfloat16", channels_last)
        return cls(t.numpy(), str(t.dtype).removeprefix("torch."), channels_last)

    def to_tensor(self) -> torch.Tensor:
        """The tensor again (host memory), in its original memory format."""
        data = self.data if self.data.flags.writeable else self.data.copy()
        t = torch.from_numpy(data)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.permute(0, 3, 1, 2) if self.channels_last else t
