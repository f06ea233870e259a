"""What a run did: per-stage busy time and throughput, GPU use, and the run's summary.

Stage timings are kept by each worker's runtime (:class:`~dask_infer.workflows.runtime.StageStats`)
and gathered at the end with ``client.run``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dask.utils import format_bytes

__all__ = ["RunSummary", "format_stages", "gpu_summary", "stage_summary", "write_summary"]


@dataclass(frozen=True)
class RunSummary:
    """What a run did: counts, time, throughput and where the results are."""

    images: int
    seconds: float
    images_per_second: float
    output: str
    model: str
    pretrained: bool
    chunks: int
    chunk_size: int
    workers: int
    model_loads: int
    cluster: str
    dashboard: str | None
    placement: dict[str, Any] = field(default_factory=dict)
    loaded_stages: dict[str, list[int]] = field(default_factory=dict)
    stage_stats: list[dict[str, Any]] = field(default_factory=list)
    gpus: dict[str, Any] = field(default_factory=dict)
    rebalance: dict[str, Any] | None = None
    skipped_chunks: int = 0
    """Chunks a resume found already written, and did not compute again."""
    invalid_images: int = 0
    """Images with NaN or infinite pixels: ``valid`` false, top-k classes -1."""
    filled_images: int = 0
    """Images read (wholly or partly) from absent input chunks as the fill value."""
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    """Each re-placement of a pipeline's stages after workers were lost or joined."""
    reused_loads: int = 0
    """Of ``model_loads``, those that took the stages an earlier run left on the worker."""
    compression_choices: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Under ``--compress auto``: per worker address, each held stage's chosen recipe and every
    candidate's measured images/s and top-1 agreement with fp32."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON and output attrs."""
        return asdict(self)

    def format(self) -> str:
        """Human summary, a few lines."""
        resumed = (
            f" (resumed: {self.skipped_chunks} chunks were already written)" if self.skipped_chunks else ""
        )
        return (
            f"{self.images} images in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s){resumed}, "
            f"{self.chunks} chunks of {self.chunk_size} on {self.workers} worker(s) [{self.cluster}]"
            f"{self._bad_data()}\n"
            f"{self._choices()}"
            f"results: {self.output}  (xarray.open_zarr({self.output!r}))"
        )

    def _choices(self) -> str:
        """One line per worker and stage that ``--compress auto`` chose a recipe for."""
        return "".join(
            f"compress auto on {address}, stage {c['stage']}: {c['recipe']} ("
            + ", ".join(
                f"{k['recipe']} {k['images_per_s']:.1f} img/s top-1 {100 * k['top1_agreement']:.2f}%"
                if k["error"] is None
                else f"{k['recipe']} failed"
                for k in c["candidates"]
            )
            + ")\n"
            for address, choices in sorted(self.compression_choices.items())
            for c in choices
        )

    def _bad_data(self) -> str:
        """What the summary line says about invalid and filled images, if there were any."""
        notes = []
        if self.invalid_images:
            notes.append(
                f"{self.invalid_images} invalid image(s) with NaN/inf pixels (valid=False, top-k class -1)"
            )
        if self.filled_images:
            notes.append(
                f"{self.filled_images} image(s) read as the fill value from absent input chunks (filled=True)"
            )
        return "; " + "; ".join(notes) if notes else ""

    def stage_scope(self) -> str | None:
        """Which chunks :attr:`stage_stats` describe, when not all of the run's; ``None`` when all.

        A re-cut and a re-placement after workers were lost or joined start new runtimes,
        and ``stage_stats`` holds the figures of the last one only.
        """
        since = []
        if self.rebalance and self.rebalance.get("recut"):
            since.append(f"the re-cut after chunk {self.rebalance['chunks_before']} of {self.chunks}")
        if self.recoveries:
            done = self.recoveries[-1]["written_before"]
            since.append(f"the stages were placed again with {done} chunk(s) written")
        return "stage times since " + " and ".join(since) if since else None

    def format_stages(self) -> str:
        """The per-stage lines, headed by which chunks they describe, and the times before a re-cut."""
        lines = []
        scope = self.stage_scope()
        if scope:
            lines.append(f"{scope}:")
        lines.append(format_stages(self.stage_stats))
        if self.rebalance and self.rebalance.get("recut"):
            times = ", ".join(f"{t * 1e3:.1f}" for t in self.rebalance["before"]["stage_seconds_per_image"])
            lines.append(
                f"  before the re-cut: {times} ms/image per stage, "
                f"measured over the first {self.rebalance['chunks_measured']} chunks"
            )
        reshare = self.rebalance if self.rebalance and self.rebalance.get("reshare") else None
        if reshare is not None and len(reshare["shares"]) > 1:
            lines.append(
                f"  stage {reshare['stage']}'s share on its first worker, set from measured stage times: "
                + " -> ".join(f"{s:.0%}" for s in reshare["shares"])
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The key figures and the per-stage lines as two small HTML tables, for Jupyter."""
        rows = [
            ("images", f"{self.images}"),
            ("time", f"{self.seconds:.1f} s"),
            ("throughput", f"{self.images_per_second:.1f} images/s"),
            ("model", self.model),
            ("chunks", f"{self.chunks} of {self.chunk_size} images"),
            ("workers", f"{self.workers} [{self.cluster}]"),
            ("placement", str(self.placement.get("mode", "data"))),
            ("output", self.output),
        ]
        if self.skipped_chunks:
            rows.append(("resumed", f"{self.skipped_chunks} chunk(s) were already written"))
        if self.invalid_images or self.filled_images:
            rows.append(("bad data", self._bad_data().lstrip("; ")))
        if self.dashboard:
            rows.append(("dashboard", self.dashboard))
        body = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows
        )
        out = f"<table><caption>dask-infer run</caption>{body}</table>"
        stages = [s for s in self.stage_stats if s["images"]]
        if stages:
            head = "".join(
                f"<th>{h}</th>" for h in ("stage", "workers", "images", "busy s", "busy %", "images/s busy")
            )
            cells = "".join(
                f"<tr><td>{s['stage']}</td><td>{len(s['workers'])}</td><td>{s['images']}</td>"
                f"<td>{s['busy_s']:.2f}</td><td>{100 * s['busy_fraction']:.0f}</td>"
                f"<td>{s['images_per_s_busy']:.1f}</td></tr>"
                for s in stages
            )
            caption = html.escape(self.stage_scope() or "stage times")
            out += f"<table><caption>{caption}</caption><tr>{head}</tr>{cells}</table>"
        return out


def stage_summary(
    stats: Mapping[str, Mapping[str, Any]], seconds: float, num_stages: int
) -> list[dict[str, Any]]:
    """Per-stage busy time, images and throughput over every worker.

    Parameters
    ----------
    stats
        Worker address -> its runtime's ``stats()``.
    seconds
        Wall time of the run.
    num_stages
        Number of stages.

    Returns
    -------
    list of dict
        One per stage: workers, images, busy seconds (wall time, summed), work seconds
        (CPU time on a CPU, which other processes on the same cores do not inflate),
        mean busy fraction of its workers over the run, seconds per image (busy and
        work), images/s while busy and images/s over the run, and the bytes of activations
        it passed to the next stage (in all and per image; 0 for the last stage).
    """
    out = []
    for k in range(num_stages):
        busy = work = images = 0.0
        sent = 0
        workers = []
        for address, s in stats.items():
            stage = s.get("stages", {}).get(k)
            if stage and stage["images"]:
                busy += stage["busy_s"]
                work += stage.get("work_s", stage["busy_s"])
                images += stage["images"]
                sent += stage.get("sent_bytes", 0)
                workers.append(address)
        out.append(
            {
                "stage": k,
                "workers": sorted(workers),
                "images": int(images),
                "busy_s": busy,
                "work_s": work,
                "busy_fraction": busy / (seconds * len(workers)) if workers and seconds > 0 else 0.0,
                "seconds_per_image": busy / images if images else None,
                "work_seconds_per_image": work / images if images else None,
                "images_per_s_busy": images / busy if busy > 0 else None,
                "images_per_s": images / seconds if seconds > 0 else None,
                "sent_bytes": sent,
                "sent_bytes_per_image": sent / images if images else None,
            }
        )
    return out


def gpu_summary(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Worker address -> NVML statistics, for workers that have a GPU."""
    return {address: s["gpu"] for address, s in sorted(stats.items()) if s.get("gpu")}


def format_stages(stages: Sequence[Mapping[str, Any]]) -> str:
    """One line per stage: busy time, busy fraction, throughput and what it passes on."""
    lines = []
    for s in stages:
        if not s["images"]:
            continue
        sent = s.get("sent_bytes_per_image")
        lines.append(
            f"  stage {s['stage']}: {s['busy_s']:.2f} s busy on {len(s['workers'])} worker(s) "
            f"({100 * s['busy_fraction']:.0f}%), {s['images_per_s_busy']:.1f} images/s while busy"
            + (f", passes {format_bytes(sent)} per image on" if sent else "")
        )
    return "\n".join(lines)


def write_summary(path: str, summary: Mapping[str, Any]) -> None:
    """Write ``summary`` as indented JSON to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2, default=str) + "\n")
