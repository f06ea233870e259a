"""Every torchvision classifier splits into 4 exact stages (slow: builds all of them)."""

from __future__ import annotations

import pytest
import torch

from dask_infer.errors import ModelError
from dask_infer.models import available_models, build_model
from dask_infer.partition import partition_model, run_stages


@pytest.mark.slow
@pytest.mark.parametrize("name", available_models())
def test_every_torchvision_classifier_splits_into_four_exact_stages(name: str) -> None:
    model = build_model(name).module
    for size in (64, 224):
        x = torch.randn(1, 3, size, size)
        try:
            stages, plan = partition_model(model, 4, balance="flops", sample=x, name=name, repeats=1)
        except ModelError as exc:
            if "does not fit" in str(exc) and size != 224:
                continue
            raise
        break
    assert plan.num_stages == 4
    with torch.no_grad():
        assert torch.equal(run_stages(stages, x), model(x))
