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


def test_bands_scale_and_n_channels_pass_through() -> None:
    """Six uint16 bands: 1-based --bands 4,3,2 are indices 3,2,1; --scale divides; N channels stay N."""
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 10001, (3, 8, 8, 6), dtype=np.uint16))
    picked = Preprocess(8, MEAN, STD, bands=(3, 2, 1), scale=10000.0)(pixels)
    as_float = pixels.permute(0, 3, 1, 2)[:, [3, 2, 1]].to(torch.float32) / 10000.0
    torch.testing.assert_close(picked, v2.Normalize(MEAN, STD)(as_float), atol=1e-6, rtol=0)
    six = Preprocess(8, (0.0,) * 6, (1.0,) * 6, channels=6, scale=10000.0)(pixels)
    assert six.shape == (3, 6, 8, 8)
    torch.testing.assert_close(six, pixels.permute(0, 3, 1, 2).to(torch.float32) / 10000.0, atol=0, rtol=0)
    assert Preprocess(8, (0.0,), (1.0,), bands=(0,), channels=1)(pixels).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resize_then_crop_and_no_normalize(interpolation: str) -> None:
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8))
    got = Preprocess(32, MEAN, STD, resize=40, interpolation=interpolation, normalize=False)(images)
    mode = getattr(v2.InterpolationMode, interpolation.upper())
    want = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(40, interpolation=mode, antialias=interpolation != "nearest"),
            v2.CenterCrop(32),
        ]
    )(images.permute(0, 3, 1, 2))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_transform_gets_stored_dtype_nchw_after_bands() -> None:
    seen: list[tuple[tuple[int, ...], torch.dtype, bool]] = []

    def transform(x: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(x.shape), x.dtype, x.is_contiguous()))
        return x.to(torch.float64)[:, :, :4, :4]

    pixels = torch.from_numpy(np.random.default_rng(4).integers(0, 65536, (2, 8, 8, 5), dtype=np.uint16))
    out = Preprocess(8, MEAN, STD, bands=(4, 0), transform=transform)(pixels)
    assert seen == [((2, 2, 8, 8), torch.uint16, True)]
    assert out.dtype == torch.float32 and out.shape == (2, 2, 4, 4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, pixels.permute(0, 3, 1, 2)[:, [4, 0], :4, :4].to(torch.float32))
