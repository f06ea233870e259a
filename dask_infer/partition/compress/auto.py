"""``--compress auto``: each worker measures candidate recipes per stage and keeps the fastest accurate one.

``auto`` (or ``auto=0.99`` to set the bound) means: for each stage a worker holds, try the
recipes its device does well (see :func:`candidate_recipes`), time each on a batch of
the input's first images, and compare its top-1 class on those images with the fp32
stage's, as ``dask-infer evaluate`` does. The fastest recipe whose top-1 agreement with
fp32 is at least the bound (default 99.5%) wins; fp32 itself always qualifies. The stage
built for the winning measurement is the one the worker runs, so nothing compiles twice.
For a stage after the first, "top-1" is the argmax of its flattened output.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from dask_infer.errors import reason
from dask_infer.partition.compress.apply import CompressedStage, compress_module
from dask_infer.partition.compress.cpu import CpuFeatures, cpu_features
from dask_infer.partition.compress.quantize import int8_backend
from dask_infer.partition.compress.recipe import CompressionError

__all__ = [
    "DEFAULT_MIN_AGREEMENT",
    "AutoChoice",
    "Candidate",
    "auto_bound",
    "candidate_recipes",
    "choose_recipe",
    "is_auto",
]

DEFAULT_MIN_AGREEMENT = 0.995
_AUTO = re.compile(r"^\s*auto\s*(?:=\s*(.*?)\s*)?$", re.IGNORECASE)


def is_auto(compress: object) -> bool:
    """Whether ``compress`` asks for ``auto`` (``"auto"`` or ``"auto=BOUND"``)."""
    return isinstance(compress, str) and _AUTO.match(compress) is not None


def auto_bound(compress: str) -> float:
    """The top-1 agreement bound of an ``auto`` plan: ``auto`` -> 0.995, ``auto=0.99`` -> 0.99.

    Raises
    ------
    CompressionError
        When the bound is not a number in (0, 1].
    """
    match = _AUTO.match(compress)
    if match is None:
        raise CompressionError(f"{compress!r} is not an auto plan; write auto or auto=0.995")
    if match.group(1) is None:
        return DEFAULT_MIN_AGREEMENT
    try:
        bound = float(match.group(1))
    except ValueError:
        bound = float("nan")
    if not 0.0 < bound <= 1.0:
        raise CompressionError(
            f"auto bound {match.group(1)!r} in {compress!r} is not a top-1 agreement in (0, 1]; "
            "write e.g. auto=0.995"
        )
    return bound


@dataclass(frozen=True)
class Candidate:
    """One recipe as measured: images per second and top-1 agreement with fp32, or why it failed."""

    recipe: str
    images_per_s: float | None
    top1_agreement: float | None
    error: str | None = None


@dataclass(frozen=True)
class AutoChoice:
    """The recipe kept for one stage, with every candidate's measurement."""

    stage: int
    recipe: str
    min_agreement: float
    images: int
    batch_size: int
    device: str
    cpu: str
    candidates: tuple[Candidate, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict."""
        out = asdict(self)
        out["candidates"] = [asdict(c) for c in self.candidates]
        return out

    def describe(self) -> str:
        """One line: the choice and each candidate's figures."""
        parts = [
            f"{c.recipe} {c.images_per_s:.1f} img/s, top-1 {100 * c.top1_agreement:.2f}%"
            if c.error is None and c.images_per_s is not None and c.top1_agreement is not None
            else f"{c.recipe} failed ({c.error})"
            for c in self.candidates
        ]
        return (
            f"stage {self.stage}: {self.recipe} (top-1 agreement >= {100 * self.min_agreement:g}% on "
            f"{self.images} images; {'; '.join(parts)})"
        )


def candidate_recipes(device: torch.device, features: CpuFeatures | None = None) -> tuple[str, ...]:
    """The recipes ``auto`` tries on ``device``: fp32 first, then what the hardware does well.

    On a CPU: fp32 compiled always; bf16 with ``amx_bf16``/``avx512_bf16``; fp16 with
    ``amx_fp16``/``avx512_fp16``; int8 with AMX or VNNI int8 units and PT2E available.
    On a GPU: fp16, and bf16 where the GPU supports it.
    """
    if device.type == "cuda":
        recipes = ["none", "fp16+channels_last+compile"]
        if torch.cuda.is_bf16_supported():
            recipes.append("bf16+channels_last+compile")
        return tuple(recipes)
    features = features or cpu_features()
    recipes = ["none", "fp32+channels_last+compile"]
    if features.fast_bf16:
        recipes.append("bf16+channels_last+compile")
    if features.fast_fp16:
        recipes.append("fp16+channels_last+compile")
    if features.fast_int8 and _has_int8():
        recipes.append("int8+compile")
    return tuple(recipes)


def _has_int8() -> bool:
    try:
        int8_backend()
    except CompressionError:
        return False
    return True


def _top1(out: torch.Tensor) -> torch.Tensor:
    return out.float().flatten(1).argmax(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(stage: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([stage(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.inference_mode()
def choose_recipe(
    module: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    candidates: Sequence[str] | None = None,
    repeats: int = 2,
    stage: int = 0,
    output_dtype: torch.dtype | None = torch.float32,
) -> tuple[CompressedStage, AutoChoice]:
    """Measure each candidate recipe on ``module`` and keep the fastest accurate one.

    Parameters
    ----------
    module
        The fp32 stage in eval mode; not modified.
    images
        What enters the stage for the input's first images (float, preprocessed); int8
        calibrates on them too.
    device
        Where the stage runs.
    batch_size
        Images per timed forward pass (the run's batch size); a compiled winner keeps it.
    min_agreement
        Smallest top-1 agreement with fp32 a recipe may have.
    candidates
        Recipes to try; by default :func:`candidate_recipes` of ``device``.
    repeats
        Timed passes per recipe (the fastest is kept).
    stage, output_dtype
        The stage's index (for the record and messages) and its output dtype.

    Returns
    -------
    (CompressedStage, AutoChoice)
        The winning stage, warmed up at ``batch_size``, and what was measured.
    """
    dev = torch.device(device)
    names = tuple(candidates) if candidates is not None else candidate_recipes(dev)
    data = images.to(dev)
    timed = data[:batch_size]
    if len(timed) < batch_size:
        timed = timed.repeat((batch_size + len(timed) - 1) // len(timed), *[1] * (timed.ndim - 1))[
            :batch_size
        ]
    reference = None
    measured: list[Candidate] = []
    best: tuple[float, CompressedStage] | None = None
    for name in names:
        try:
            built = compress_module(
                module, name, calibration=data, device=dev, output_dtype=output_dtype, label=f"stage {stage}"
            )
            built.pad_batches_to(batch_size)
            built(timed)  # compiles here, outside the timing
            seconds = []
            for _ in range(repeats):
                _sync(dev)
                start = time.perf_counter()
                built(timed)
                _sync(dev)
                seconds.append(time.perf_counter() - start)
            top1 = _top1(_batches(built, data, batch_size))
        except Exception as exc:  # a candidate this build or model cannot run is skipped, and said so
            measured.append(Candidate(name, None, None, reason(exc)))
            continue
        if reference is None:
            reference = top1  # the first candidate is fp32
        agreement = float((top1 == reference).float().mean())
        rate = batch_size / min(seconds)
        measured.append(Candidate(name, rate, agreement))
        if agreement >= min_agreement and (best is None or rate > best[0]):
            best = (rate, built)
    if best is None:
        raise CompressionError(
            f"auto found no recipe that runs stage {stage}: "
            + "; ".join(f"{c.recipe}: {c.error}" for c in measured)
        )
    chosen = best[1]
    features = cpu_features() if dev.type == "cpu" else None
    return chosen, AutoChoice(
        stage=stage,
        recipe=chosen.recipe.to_string(),
        min_agreement=min_agreement,
        images=len(data),
        batch_size=batch_size,
        device=str(dev),
        cpu=features.describe() if features is not None else torch.cuda.get_device_name(dev),
        candidates=tuple(measured),
    )
