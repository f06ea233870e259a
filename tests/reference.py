"""Independent reference: a plain PyTorch forward, preprocessing written out by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import Client

import dask_infer
from dask_infer.models.registry import build_model


def reference_logits(images: np.ndarray, model: str, weights: str | None, **kwargs: object) -> np.ndarray:
    """Logits of ``model`` on uint8 NHWC images already at the model's input size."""
    loaded = build_model(model, weights=weights, **kwargs)  # type: ignore[arg-type]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return loaded.module((x - mean) / std).numpy()


def assert_close_logits(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    """Max abs difference <= ``rel`` of the largest reference logit."""
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x {scale:.3g}"


def run_small(client: Client, src: Path | str, out: Path, weights: Path, **kw: Any) -> dask_infer.RunSummary:
    """``dask_infer.run`` of the small ResNet-18 on ``client``, quietly unless ``kw`` says otherwise."""
    options: dict[str, Any] = {"progress": False, "echo": None, **kw}
    return dask_infer.run(
        str(src), str(out), model="resnet18", weights=str(weights), client=client, **options
    )
