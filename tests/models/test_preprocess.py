"""Preprocess against torchvision.transforms.v2 written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from dask_infer.models.preprocess import Preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _reference(x: torch.Tensor, size: int) -> torch.Tensor:
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if tuple(x.shape[-2:]) != (size, size):
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps.append(v2.Normalize(MEAN, STD))
    return v2.Compose(steps)(x)


@pytest.mark.parametrize("shape", [(4, 32, 32, 3), (4, 48, 40, 3), (2, 100, 60, 3)])
def test_uint8_rgb(shape: tuple[int, ...]) -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    got = Preprocess(32, MEAN, STD)(images)
    want = _reference(images.permute(0, 3, 1, 2), 32)
    assert got.shape == (shape[0], 3, 32, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gray_alpha_uint16_and_float() -> None:
    rng = np.random.default_rng(1)
    gray = torch.from_numpy(rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8))
    got = Preprocess(8, MEAN, STD)(gray)
    torch.testing.assert_close(got, _reference(gray.permute(0, 3, 1, 2).expand(-1, 3, -1, -1), 8))
    rgba = torch.from_numpy(rng.integers(0, 256, (2, 8, 8, 4), dtype=np.uint8))
    torch.testing.assert_close(Preprocess(8, MEAN, STD)(rgba), _reference(rgba.permute(0, 3, 1, 2)[:, :3], 8))
    deep = torch.from_numpy(rng.integers(0, 65536, (2, 8, 8, 3), dtype=np.uint16))
    as_float = deep.to(torch.float32) / 65535.0
    torch.testing.assert_close(Preprocess(8, MEAN, STD)(deep), Preprocess(8, MEAN, STD)(as_float))
    assert Preprocess(8, MEAN, STD, dtype=torch.bfloat16)(as_float).dtype == torch.bfloat16


def test_large_images_are_converted_a_few_at_a_time_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full-size float32 copies of a whole batch of big images would take hundreds of MB: the batch is
    converted in slices under the byte bound, and the result equals converting it at once."""
    import dask_infer.models.preprocess as preprocess_module

    images = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (7, 90, 120, 3), dtype=np.uint8))
    prep = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    whole = prep(images)
    sizes: list[int] = []
    convert = prep._convert

    def spy(x: torch.Tensor) -> torch.Tensor:
        sizes.append(len(x))
        return convert(x)

    monkeypatch.setattr(prep, "_convert", spy)
    monkeypatch.setattr(preprocess_module, "_FLOAT_BYTES", 3 * 90 * 120 * 4 * 2)  # two images' worth
    sliced = prep(images)
    assert sizes == [2, 2, 2, 1]
    torch.testing.assert_close(sliced, whole, rtol=0, atol=0)
    # Images already at the model's size are converted in one go.
    sizes.clear()
    prep(images[:, :32, :32])
    assert sizes == [7]
