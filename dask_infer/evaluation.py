"""How far a compressed model's answers move from the uncompressed model's, and what it saves.

:func:`evaluate` runs the uncompressed and the compressed model in this process on
the same images of a Zarr dataset (held-out images when the dataset flags them) and
calibrates on other images of the same dataset.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dask_infer.errors import DaskInferError, InputError
from dask_infer.io.images import open_images
from dask_infer.io.outputs import quiet_zarr
from dask_infer.models import Preprocess, build_model
from dask_infer.options import DEFAULT_BALANCE, check_positive_int
from dask_infer.partition import partition_model
from dask_infer.partition.compress import CompressedStage, CompressionPlan, compress_stages
from dask_infer.partition.compress.cpu import cpu_features
from dask_infer.partition.compress.measure import count_flops, serialized_size, time_call
from dask_infer.partition.compress.quantize import check_int8_device, int8_backend

__all__ = [
    "REPORTS_ATTR",
    "REPORT_ATTR",
    "EvaluationReport",
    "StageReport",
    "evaluate",
    "format_comparison",
    "read_report",
    "read_reports",
    "write_report",
]

REPORT_ATTR = "compression_evaluation"
REPORTS_ATTR = "compression_evaluations"


@dataclass(frozen=True)
class StageReport:
    """Costs of one stage, uncompressed (``ref``) and compressed.

    FLOPs are per image, sizes are serialised bytes (``*_zlib``: zlib-compressed),
    times are the median seconds per batch of ``batch_size`` images.
    """

    index: int
    recipe: str
    flops_ref: int
    flops: int
    size_ref: int
    size: int
    size_zlib_ref: int
    size_zlib: int
    time_ref_s: float
    time_s: float


@dataclass(frozen=True)
class EvaluationReport:
    """Agreement of a compressed model with the uncompressed one, and its costs.

    Attributes
    ----------
    top1_agreement
        Fraction of images whose top-1 class is the same in both models.
    top5_overlap
        Mean fraction of the uncompressed model's top-5 classes among the compressed
        model's top-5 (top-k with k = min(5, classes)).
    relative_logit_error
        ``||compressed - reference|| / ||reference||`` over all logits.
    accuracy_ref, accuracy
        Top-1 accuracy against the dataset's ``label`` (``None`` without labels).
    selection
        ``"held_out"`` when the images evaluated are the dataset's held-out ones,
        else ``"first"``.
    """

    input: str
    model: str
    weights: str | None
    plan: dict[str, Any]
    compress: str
    n_stages: int
    n_images: int
    n_calibration: int
    selection: str
    calibration_overlaps: bool
    batch_size: int
    device: str
    top1_agreement: float
    top5_overlap: float
    relative_logit_error: float
    accuracy_ref: float | None
    accuracy: float | None
    stages: tuple[StageReport, ...]
    cpu: str = ""
    """The CPU's model name (``/proc/cpuinfo``)."""
    cpu_capability: str = ""
    """``torch.backends.cpu.get_cpu_capability()``: the kernels torch picked for this CPU."""
    cpu_flags: tuple[str, ...] = ()
    """The CPU flags that decide which precision is fast (see
    :data:`~dask_infer.partition.compress.cpu.RELEVANT_FLAGS`)."""

    @property
    def flops_reduction(self) -> float:
        """Fraction of the uncompressed model's FLOPs saved."""
        ref = sum(s.flops_ref for s in self.stages)
        return 1.0 - sum(s.flops for s in self.stages) / ref if ref else 0.0

    @property
    def speedup(self) -> float:
        """Uncompressed time over compressed time, all stages together."""
        total = sum(s.time_s for s in self.stages)
        return sum(s.time_ref_s for s in self.stages) / total if total else float("nan")

    @property
    def images_per_s(self) -> tuple[float, float]:
        """Images per second through all stages, ``(uncompressed, compressed)``, timed in this run."""
        ref, new = sum(s.time_ref_s for s in self.stages), sum(s.time_s for s in self.stages)
        nan = float("nan")
        return (self.batch_size / ref if ref else nan, self.batch_size / new if new else nan)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe dict of every field, plus the derived totals."""
        out = dataclasses.asdict(self)
        out["stages"] = [dataclasses.asdict(s) for s in self.stages]
        out["flops_reduction"] = self.flops_reduction
        out["speedup"] = self.speedup
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationReport:
        """Read back :meth:`to_dict` output."""
        values = {k: v for k, v in data.items() if k not in ("flops_reduction", "speedup")}
        values["stages"] = tuple(StageReport(**s) for s in values["stages"])
        values["cpu_flags"] = tuple(values.get("cpu_flags", ()))
        return cls(**values)

    def format(self) -> str:
        """A plain-text table: agreement first, then per-stage costs."""

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}%"

        lines = [
            f"compression {self.compress!r} of {self.model} on {self.n_images} {self.selection} images "
            f"of {self.input} ({self.device}, calibrated on {self.n_calibration} other images"
            f"{', overlapping' if self.calibration_overlaps else ''})",
            f"  top-1 agreement      {pct(self.top1_agreement)}",
            f"  top-5 overlap        {pct(self.top5_overlap)}",
            f"  relative logit error {self.relative_logit_error:.4g}",
            f"  accuracy             {pct(self.accuracy_ref)} -> {pct(self.accuracy)}"
            + (
                f" ({100 * (self.accuracy - self.accuracy_ref):+.2f} points)"
                if self.accuracy is not None and self.accuracy_ref is not None
                else ""
            ),
            f"  FLOPs reduction      {pct(self.flops_reduction)};  speed-up x{self.speedup:.2f} over fp32 "
            f"({self.images_per_s[0]:.1f} -> {self.images_per_s[1]:.1f} images/s, same run)",
            "",
            f"  {'stage':>5}  {'recipe':<24} {'MFLOP/img':>17} {'size MB':>15} {'zlib MB':>15} "
            f"{'ms/batch':>17}",
        ]
        if self.cpu:
            lines.insert(
                1,
                f"  CPU {self.cpu}; torch capability {self.cpu_capability}; flags {' '.join(self.cpu_flags)}",
            )
        for s in self.stages:
            lines.append(
                f"  {s.index:>5}  {s.recipe:<24} {s.flops_ref / 1e6:>8.1f}>{s.flops / 1e6:<8.1f} "
                f"{s.size_ref / 1e6:>7.2f}>{s.size / 1e6:<7.2f} "
                f"{s.size_zlib_ref / 1e6:>7.2f}>{s.size_zlib / 1e6:<7.2f} "
                f"{1e3 * s.time_ref_s:>8.2f}>{1e3 * s.time_s:<8.2f}"
            )
        return "\n".join(lines)


def _select(
    coords: dict[str, np.ndarray], n_total: int, n_images: int, n_calibration: int
) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """Indices to evaluate and to calibrate on, disjoint whenever the dataset allows."""
    if "held_out" in coords and coords["held_out"].any() and (~coords["held_out"]).any():
        held = coords["held_out"].astype(bool)
        evaluate_idx = np.flatnonzero(held)[:n_images]
        rest = np.flatnonzero(~held)
        selection = "held_out"
    else:
        evaluate_idx = np.arange(min(n_images, n_total))
        rest = np.arange(len(evaluate_idx), n_total)
        selection = "first"
    overlaps = len(rest) == 0
    pool = evaluate_idx if overlaps else rest
    # Evenly spread, so calibration sees every part of the dataset, not only its start.
    take = np.unique(np.linspace(0, len(pool) - 1, num=min(n_calibration, len(pool))).round().astype(int))
    return evaluate_idx, pool[take], selection, overlaps


def _run(stages: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for stage in stages:
        x = stage(x)
        outs.append(x)
    return outs


def _stage_inputs(stages: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [x, *_run(stages, x)[:-1]]


def evaluate(
    input: str,
    *,
    model: str | nn.Module,
    weights: str | Path | None = None,
    compress: str | CompressionPlan,
    stages: int = 1,
    balance: str = DEFAULT_BALANCE,
    n_images: int = 512,
    calibration_images: int = 128,
    batch_size: int = 64,
    variable: str | None = None,
    num_classes: int | None = None,
    device: str = "cpu",
    repeats: int = 3,
    model_kwargs: Mapping[str, Any] | None = None,
) -> EvaluationReport:
    """Compare a compressed model with the uncompressed one on images of a dataset.

    Parameters
    ----------
    input
        Zarr image store. When it has a ``held_out`` coordinate, held-out images are
        evaluated and the others calibrate; otherwise the first ``n_images`` are
        evaluated and calibration images are drawn from the rest.
    model, weights, num_classes, model_kwargs
        As for :func:`~dask_infer.models.build_model`: a torchvision name, an import path
        ``package.module:factory``, a ``.pt2`` program or an ``nn.Module`` instance.
    compress
        A :class:`CompressionPlan` or the ``--compress`` string, e.g. ``"0-1:int8,2:bf16"``.
    stages, balance
        Split the model into this many stages (see ``partition_model``) before compressing.
    n_images
        Images to evaluate (at most this many).
    calibration_images
        Images to calibrate int8 and structured pruning on.
    batch_size
        Images per forward pass; timings are per batch of this size.
    variable
        Image array name when the store holds several.
    device
        ``"cpu"`` or ``"cuda"``.
    repeats
        Timed passes per stage over the first batch (the median is kept).

    Returns
    -------
    EvaluationReport

    Raises
    ------
    DaskInferError
        Before any work, for bad counts, a bad plan or a plan naming a missing stage.
    """
    plan = CompressionPlan.coerce(compress)
    for name, value in (
        ("stages", stages),
        ("n_images", n_images),
        ("calibration_images", calibration_images),
        ("batch_size", batch_size),
        ("repeats", repeats),
    ):
        check_positive_int(name, value)
    plan.validate(stages)
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise DaskInferError(f"device={device!r} is not one of cpu, cuda")
    dev = torch.device(device)
    if any(plan.recipe_for(i).quantize == "int8" for i in range(stages)):
        check_int8_device(dev)
        int8_backend()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DaskInferError("device='cuda' but this machine has no CUDA GPU; use device='cpu'")
    images = open_images(input, variable=variable)
    coords = {str(k): np.asarray(v.values) for k, v in images.coords.items() if v.dims == ("image",)}
    eval_idx, calib_idx, selection, overlaps = _select(
        coords, images.sizes["image"], n_images, calibration_images
    )
    loaded = build_model(model, weights=weights, num_classes=num_classes, model_kwargs=model_kwargs)
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    with torch.no_grad():
        x_eval = prep(torch.from_numpy(np.ascontiguousarray(images.isel(image=eval_idx).values)))
        x_calib = prep(torch.from_numpy(np.ascontiguousarray(images.isel(image=calib_idx).values)))
    size = loaded.input_size
    if stages > 1:
        reference = list(
            partition_model(
                loaded.module, stages, balance=balance, sample=(1, 3, size, size), name=loaded.name
            ).modules
        )
    else:
        reference = [loaded.module]
    reference = [stage.to(dev).eval() for stage in reference]
    compressed = compress_stages(reference, plan, calibration=x_calib, device=dev, batch_size=batch_size)

    ref_logits, new_logits = [], []
    with torch.no_grad():
        for i in range(0, len(x_eval), batch_size):
            batch = x_eval[i : i + batch_size].to(dev)
            ref_logits.append(_run(reference, batch)[-1].float().cpu())
            new_logits.append(_run(compressed, batch)[-1].float().cpu())
    ref, new = torch.cat(ref_logits), torch.cat(new_logits)

    k = min(5, ref.shape[1])
    top_ref, top_new = ref.topk(k, dim=1).indices, new.topk(k, dim=1).indices
    overlap = (top_ref[:, :, None] == top_new[:, None, :]).any(2).float().mean(1)
    labels = coords.get("label")
    accuracy_ref = accuracy = None
    if labels is not None:
        truth = torch.from_numpy(labels[eval_idx].astype(np.int64))
        accuracy_ref = float((ref.argmax(1) == truth).float().mean())
        accuracy = float((new.argmax(1) == truth).float().mean())

    first = x_eval[:batch_size].to(dev)
    reports = tuple(
        _stage_report(i, r, c, ref_in, new_in, repeats, dev)
        for i, (r, c, ref_in, new_in) in enumerate(
            zip(
                reference,
                compressed,
                _stage_inputs(reference, first),
                _stage_inputs(compressed, first),
                strict=True,
            )
        )
    )
    features = cpu_features()
    return EvaluationReport(
        input=str(input),
        model=loaded.source.ref if loaded.source is not None else loaded.name,
        weights=str(weights) if weights is not None else None,
        plan=plan.to_dict(),
        compress=plan.to_string(),
        n_stages=len(reference),
        n_images=len(eval_idx),
        n_calibration=len(calib_idx),
        selection=selection,
        calibration_overlaps=overlaps,
        batch_size=batch_size,
        device=str(dev),
        top1_agreement=float((ref.argmax(1) == new.argmax(1)).float().mean()),
        top5_overlap=float(overlap.mean()),
        relative_logit_error=float((new - ref).norm() / ref.norm().clamp_min(1e-12)),
        accuracy_ref=accuracy_ref,
        accuracy=accuracy,
        stages=reports,
        cpu=features.model,
        cpu_capability=features.capability,
        cpu_flags=features.flags,
    )


def _stage_report(
    index: int,
    reference: nn.Module,
    compressed: CompressedStage,
    ref_input: torch.Tensor,
    new_input: torch.Tensor,
    repeats: int,
    device: torch.device,
) -> StageReport:
    size_ref, zlib_ref = serialized_size(reference)
    size_new, zlib_new = serialized_size(compressed.module)
    with torch.no_grad():
        compressed(new_input)  # compiles now when the recipe says compile, outside the timing
        time_ref = time_call(lambda: reference(ref_input), repeats=repeats, device=device)
        time_new = time_call(lambda: compressed(new_input), repeats=repeats, device=device)
    return StageReport(
        index=index,
        recipe=compressed.recipe.to_string(),
        flops_ref=count_flops(reference, ref_input[:1]),
        flops=count_flops(compressed.forward_eager, new_input[:1]),
        size_ref=size_ref,
        size=size_new,
        size_zlib_ref=zlib_ref,
        size_zlib=zlib_new,
        time_ref_s=time_ref,
        time_s=time_new,
    )


def format_comparison(reports: Sequence[EvaluationReport]) -> str:
    """The recipes of one ``evaluate`` call side by side, fastest first: speed and agreement.

    Each recipe's fp32 rate is timed in the same call, just before the recipe's, so
    ``vs fp32`` compares like with like even if the machine's speed drifts between recipes.
    """

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    head = (
        f"  {'recipe':<34} {'images/s':>9} {'fp32 images/s':>14} {'vs fp32':>8} "
        f"{'top-1 agreement':>16} {'rel. logit error':>17} {'accuracy':>9}"
    )
    lines = [f"recipes compared on the same {reports[0].n_images} images:", head]
    for r in sorted(reports, key=lambda r: r.images_per_s[1], reverse=True):
        fp32, rate = r.images_per_s
        lines.append(
            f"  {r.compress:<34} {rate:>9.1f} {fp32:>14.1f} {r.speedup:>7.2f}x "
            f"{pct(r.top1_agreement):>16} {r.relative_logit_error:>17.4g} {pct(r.accuracy):>9}"
        )
    return "\n".join(lines)


def write_report(
    report: EvaluationReport | Sequence[EvaluationReport],
    store: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Record ``report`` in the attrs of a Zarr store (as JSON text under ``compression_evaluation``).

    Several reports (one ``evaluate`` call comparing recipes) go under
    ``compression_evaluations`` as a JSON list; :func:`read_reports` reads either.

    Raises
    ------
    InputError
        If ``store`` is not an existing Zarr group.
    """
    import zarr

    try:
        group = zarr.open_group(store, mode="r+", storage_options=storage_options or None)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as exc:
        raise InputError(
            f"cannot record the report in {store!r}: it is not an existing Zarr group ({exc})"
        ) from exc
    if isinstance(report, EvaluationReport):
        group.attrs[REPORT_ATTR] = json.dumps(report.to_dict())
    else:
        group.attrs[REPORTS_ATTR] = json.dumps([r.to_dict() for r in report])
    # Readers open consolidated metadata first; refresh it so they see the new attrs.
    with quiet_zarr():
        zarr.consolidate_metadata(group.store)


def read_report(store: str, *, storage_options: dict[str, Any] | None = None) -> EvaluationReport:
    """The report :func:`write_report` stored in ``store``."""
    import zarr

    group = zarr.open_group(store, mode="r", storage_options=storage_options or None)
    return EvaluationReport.from_dict(json.loads(str(group.attrs[REPORT_ATTR])))


def read_reports(store: str, *, storage_options: dict[str, Any] | None = None) -> list[EvaluationReport]:
    """Every report :func:`write_report` stored in ``store``: the list of several, or the one."""
    import zarr

    group = zarr.open_group(store, mode="r", storage_options=storage_options or None)
    if REPORTS_ATTR in group.attrs:
        return [EvaluationReport.from_dict(d) for d in json.loads(str(group.attrs[REPORTS_ATTR]))]
    return [EvaluationReport.from_dict(json.loads(str(group.attrs[REPORT_ATTR])))]
