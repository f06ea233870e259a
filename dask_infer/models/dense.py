"""torchvision's segmentation models (FCN, DeepLabV3, LR-ASPP) as modules returning one map.

torchvision's segmentation models return a dict (``out``, and ``aux`` when trained with
an auxiliary head); a run writes one tensor, so the model is wrapped to return ``out``:
(N, class, H, W) scores at the input's height and width. They are built without any
download (``weights_backbone=None``), seeded, with an auxiliary head only when the
weights file has one.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torchvision
from torch import nn

__all__ = ["DEFAULT_DENSE_CLASSES", "MapOutput", "dense_classes", "dense_models", "make_dense_model"]

DEFAULT_DENSE_CLASSES = 21
"""Classes of torchvision's segmentation weights (the Pascal VOC categories and background)."""

_HEADS = ("classifier.4.weight", "classifier.low_classifier.weight")
"""State keys whose first dim is the number of classes (FCN and DeepLabV3, LR-ASPP)."""


@lru_cache(maxsize=1)
def dense_models() -> tuple[str, ...]:
    """Names of torchvision's segmentation models, sorted."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models.segmentation)))


class MapOutput(nn.Module):
    """A model returning a dict of maps, reduced to its ``out`` map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def dense_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Classes a segmentation state_dict scores, from its head's weight; ``None`` if it has none."""
    for key in _HEADS:
        if key in state:
            return int(state[key].shape[0])
    return None


def make_dense_model(name: str, num_classes: int, *, aux: bool = False, seed: int = 0) -> nn.Module:
    """torchvision segmentation model ``name``, randomly initialised (seeded), not yet wrapped."""
    kwargs: dict[str, object] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if aux and not name.startswith("lraspp"):
        kwargs["aux_loss"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, **kwargs)
