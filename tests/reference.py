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


def assert_held_out_mistakes(
    ds: Any, got: np.ndarray, fp32: np.ndarray, *, held_out: int, fp32_misses: int = 3, more: int = 2
) -> None:
    """On the dataset's held-out digits: fp32 misses at most ``fp32_misses``, ``got`` at most ``more`` more.

    A trained model's top-1 depends on its input, so a compressed model that computes
    something else shows here, where top-1 agreement of a random model on noise would not.
    """
    held, labels = ds["held_out"].values, ds["label"].values
    assert held.sum() == held_out
    wrong_fp32 = int((fp32[held].argmax(1) != labels[held]).sum())
    wrong = int((got[held].argmax(1) != labels[held]).sum())
    assert wrong_fp32 <= fp32_misses and wrong <= wrong_fp32 + more, (wrong_fp32, wrong)
