"""Small real models trained on data that ships with installed packages.

The digits model is a torchvision ResNet-18 (10 classes) trained on scikit-learn's
handwritten digits, upscaled. It gives the demo, the tests and the compression
reports a model with real, checkable accuracy without downloading anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from dask_infer.io.samples import digits_images, digits_split
from dask_infer.models import weights_metadata_key
from dask_infer.models.preprocess import Preprocess

__all__ = ["DIGITS_INPUT_SIZE", "default_cache_dir", "digits_model", "train_digits_model"]

DIGITS_INPUT_SIZE = 32
_MEAN = (0.5, 0.5, 0.5)
_STD = (0.5, 0.5, 0.5)


def default_cache_dir() -> Path:
    """``$DASK_INFER_CACHE``, else ``~/.cache/dask-infer``."""
    return Path(os.environ.get("DASK_INFER_CACHE", Path.home() / ".cache" / "dask-infer"))


def train_digits_model(path: str | Path, *, epochs: int = 12, seed: int = 0) -> dict[str, float]:
    """Train ResNet-18 on the digits not held out and save it as ``.safetensors``.

    The file's metadata carries the model name, class names, input size and
    normalisation, so ``--weights`` needs nothing else.

    Returns
    -------
    dict
        ``train_accuracy`` and ``held_out_accuracy`` (fractions).
    """
    import torchvision
    from safetensors.torch import save_file

    images, labels = digits_images(DIGITS_INPUT_SIZE)
    held_out = digits_split(len(labels))
    prep = Preprocess(DIGITS_INPUT_SIZE, _MEAN, _STD)
    with torch.no_grad():
        x_all = prep(torch.from_numpy(images))
    y_all = torch.from_numpy(labels)
    x_train, y_train = x_all[~held_out], y_all[~held_out]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(num_classes=10)
        optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            optim, max_lr=4e-3, total_steps=epochs * ((len(y_train) + 63) // 64)
        )
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y_train), generator=gen)
            for i in range(0, len(order), 64):
                idx = order[i : i + 64]
                batch = x_train[idx]
                shift = torch.randint(-2, 3, (2,), generator=gen)
                batch = torch.roll(batch, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
                optim.zero_grad()
                loss_fn(model(batch), y_train[idx]).backward()
                optim.step()
                sched.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x_all[i : i + 256]).argmax(1) for i in range(0, len(x_all), 256)])
    correct = (pred == y_all).numpy()
    scores = {
        "train_accuracy": float(correct[~held_out].mean()),
        "held_out_accuracy": float(correct[held_out].mean()),
    }
    meta = {
        "model": "resnet18",
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "input_size": DIGITS_INPUT_SIZE,
        "mean": list(_MEAN),
        "std": list(_STD),
        "trained_on": "scikit-learn digits (held_out == False)",
        **scores,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={weights_metadata_key: json.dumps(meta)})
    tmp.replace(out)
    return scores


def digits_model(cache_dir: str | Path | None = None) -> Path:
    """Path of the trained digits model, training it once if it is not cached."""
    path = Path(cache_dir or default_cache_dir()) / "digits-resnet18.safetensors"
    if not path.is_file():
        train_digits_model(path)
    return path
