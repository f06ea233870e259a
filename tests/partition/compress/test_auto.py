"""``--compress auto``: the bound's grammar, the candidates per CPU, and the choice on the digits model.

The choice is checked against an independent plain-PyTorch fp32 forward: the agreement
auto records for each candidate must equal the top-1 agreement computed here, and the
kept recipe must be the fastest of those at or above the bound.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dask_infer.config import RunConfig
from dask_infer.io.samples import digits_images
from dask_infer.models.preprocess import Preprocess
from dask_infer.models.registry import build_model
from dask_infer.partition.compress import CompressionError, CompressionPlan
from dask_infer.partition.compress.auto import (
    DEFAULT_MIN_AGREEMENT,
    auto_bound,
    candidate_recipes,
    choose_recipe,
    is_auto,
)
from dask_infer.partition.compress.cpu import CpuFeatures


def test_auto_grammar() -> None:
    assert is_auto("auto") and is_auto(" AUTO = 0.99 ") and not is_auto("bf16") and not is_auto(None)
    assert auto_bound("auto") == DEFAULT_MIN_AGREEMENT == 0.995
    assert auto_bound("auto=0.9") == 0.9
    for bad in ("auto=1.5", "auto=0", "auto=high"):
        with pytest.raises(
            CompressionError, match=r"is not a top-1 agreement in \(0, 1\]; write e.g. auto=0.995"
        ):
            auto_bound(bad)
    assert RunConfig(input="a.zarr", output="b.zarr", compress="auto").compress == "auto=0.995"
    with pytest.raises(CompressionError, match="auto=2"):
        RunConfig(input="a.zarr", output="b.zarr", compress="auto=2")
    with pytest.raises(CompressionError, match="auto is chosen by `dask-infer run` on its workers"):
        CompressionPlan.coerce("auto")


def test_candidates_follow_the_cpu() -> None:
    epyc = CpuFeatures("EPYC", "AVX512", ("avx512f", "avx512_bf16", "avx512_vnni"))
    old = CpuFeatures("old", "AVX2", ("avx2", "fma"))
    spr = CpuFeatures("Xeon", "AVX512", ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8"))
    cpu = torch.device("cpu")
    assert candidate_recipes(cpu, old) == ("none", "fp32+channels_last+compile")
    assert candidate_recipes(cpu, epyc) == (
        "none",
        "fp32+channels_last+compile",
        "bf16+channels_last+compile",
        "int8+compile",
    )
    assert "fp16+channels_last+compile" in candidate_recipes(cpu, spr)


@pytest.fixture(scope="module")
def digits(digits_weights: Path) -> tuple[nn.Module, torch.Tensor]:
    loaded = build_model("resnet18", weights=digits_weights)
    images, _ = digits_images(loaded.input_size)
    with torch.no_grad():
        x = Preprocess(loaded.input_size, loaded.mean, loaded.std)(torch.from_numpy(images[:256]))
    return loaded.module, x


def test_the_fastest_recipe_within_the_bound_is_kept(digits: tuple[nn.Module, torch.Tensor]) -> None:
    module, x = digits
    # prune=0.9 is the fastest (a tenth of the channels) and far off fp32: the bound must refuse it.
    stage, choice = choose_recipe(module, x, batch_size=64, candidates=("none", "bf16", "prune=0.9"))
    with torch.no_grad():
        ref = module(x).argmax(1)
        bf16 = torch.cat([module.to(torch.bfloat16)(x[i : i + 64].bfloat16()) for i in range(0, 256, 64)])
        module.float()
    by_recipe = {c.recipe: c for c in choice.candidates}
    assert set(by_recipe) == {"none", "bf16", "prune=0.9"} and all(c.error is None for c in choice.candidates)
    assert by_recipe["none"].top1_agreement == 1.0
    assert by_recipe["bf16"].top1_agreement == pytest.approx(float((bf16.argmax(1) == ref).float().mean()))
    assert by_recipe["prune=0.9"].top1_agreement < DEFAULT_MIN_AGREEMENT
    allowed = [c for c in choice.candidates if c.top1_agreement >= DEFAULT_MIN_AGREEMENT]
    fastest = max(allowed, key=lambda c: c.images_per_s or 0.0)
    assert (
        choice.recipe == stage.recipe.to_string() == ("fp32" if fastest.recipe == "none" else fastest.recipe)
    )
    assert choice.images == 256 and choice.batch_size == 64 and "stage 0" in choice.describe()
    with torch.no_grad():
        out = stage(x)
    assert out.dtype == torch.float32
    assert float((out.argmax(1) == ref).float().mean()) >= DEFAULT_MIN_AGREEMENT


class _Branchy(nn.Module):
    """A stage torch.export cannot take (its path depends on the data), so int8 cannot be built."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = -y
        return self.head(y.mean((2, 3)))


def test_a_candidate_that_fails_is_recorded_and_skipped() -> None:
    torch.manual_seed(0)
    module, x = _Branchy().eval(), torch.randn(8, 3, 12, 12)
    stage, choice = choose_recipe(module, x, batch_size=8, candidates=("none", "int8"))
    none, int8 = choice.candidates
    assert int8.error is not None and "torch.export" in int8.error and int8.images_per_s is None
    assert none.error is None and choice.recipe == "fp32" == stage.recipe.to_string()
    assert "int8 failed" in choice.describe()
    with torch.no_grad():
        torch.testing.assert_close(stage(x), module(x))
