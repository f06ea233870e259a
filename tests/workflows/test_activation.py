"""Activations between stage tasks keep their dtype and memory format."""

from __future__ import annotations

import pickle

import pytest
import torch

from dask_infer.workflows.activation import Activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_activations_keep_dtype_and_memory_format_across_workers(
    dtype: torch.dtype, fmt: torch.memory_format
) -> None:
    """Stage k+1 must see the layout stage k produced, or its kernels (and results) change."""
    t = torch.randn(2, 3, 4, 5).to(dtype).contiguous(memory_format=fmt)
    back = pickle.loads(pickle.dumps(Activation.from_tensor(t))).to_tensor()
    assert torch.equal(back, t) and back.stride() == t.stride() and back.dtype == dtype
