"""The run report: one self-contained HTML page of what a run did, that opens offline.

While the run goes, a :class:`RunRecorder` keeps, on the client, when each chunk was
submitted and written and how many images it held, and samples the workers' memory
from the scheduler about once a second. At the end :func:`report_run` gathers the
per-stage figures of every runtime the run registered (before and after a re-cut) and
writes the page: images/s over time, per-stage busy time, chunk latency, memory per
worker, GPU use, the stage plan and the config, with BokehJS inline and a link to
dask's performance report written beside it.
"""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client, Future

from dask_infer.workflows.cluster import scheduler_workers
from dask_infer.workflows.execution import Execution, runtime_stats
from dask_infer.workflows.monitor import dask_report_path
from dask_infer.workflows.rebalance import Rebalance, Reshare
from dask_infer.workflows.summary import RunSummary, stage_summary

__all__ = ["Recording", "RunRecorder", "StageRun", "build_report", "report_run", "stage_runs", "write_report"]


@dataclass
class Recording:
    """What a run recorded on the client, in seconds since it started feeding chunks.

    Attributes
    ----------
    written
        ``(seconds, images)`` for each chunk written, in the order they finished.
    latencies
        ``(seconds written, seconds from submit to written)`` for each chunk.
    memory
        ``(seconds, worker address, process memory bytes, memory_limit bytes)`` samples.
    """

    written: list[tuple[float, int]] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    memory: list[tuple[float, str, int, int]] = field(default_factory=list)


class RunRecorder:
    """Keeps a run's per-chunk times and samples its workers' memory, cheaply, on the client.

    Parameters
    ----------
    client
        The run's client; ``None`` records chunks only (no memory samples).
    every
        Seconds between memory samples, taken when :meth:`check` is called.
    """

    def __init__(self, client: Client | None, every: float = 1.0) -> None:
        self.client, self.every = client, every
        self.start = time.perf_counter()
        self.recording = Recording()
        self._submitted: dict[Any, float] = {}
        self._lock = threading.Lock()
        self._last = float("-inf")

    def now(self) -> float:
        """Seconds since the recorder started."""
        return time.perf_counter() - self.start

    def watch(self, submit: Callable[[list[int]], list[Future]]) -> Callable[[list[int]], list[Future]]:
        """``submit``, recording when each chunk it returns a write future for is submitted and written.

        The workers' memory is sampled before the first submission too (then at most every ``every`` s).
        """

        def submitted(indices: list[int]) -> list[Future]:
            self.check()
            futures = submit(indices)
            at = self.now()
            with self._lock:
                self._submitted.update((f.key, at) for f in futures)
            for future in futures:
                future.add_done_callback(self._finished)
            return futures

        return submitted

    def _finished(self, future: Future) -> None:
        at = self.now()
        with self._lock:
            sent = self._submitted.pop(future.key, None)
        if sent is not None and future.status == "finished":
            self.recording.latencies.append((at, at - sent))

    def on_done(self, then: Callable[[int], Any]) -> Callable[[int], None]:
        """A chunk-written callback that records the chunk's images, then calls ``then``."""

        def done(images: int) -> None:
            self.recording.written.append((self.now(), int(images)))
            then(images)

        return done

    def check(self) -> None:
        """Sample the workers' memory if ``every`` seconds have passed since the last sample."""
        if self.now() - self._last >= self.every:
            self.sample()

    def sample(self) -> None:
        """Sample every worker's process memory and memory limit from the scheduler now."""
        if self.client is None:
            return
        self._last = at = self.now()
        for address, record in sorted(scheduler_workers(self.client).items()):
            used = int((record.get("metrics") or {}).get("memory") or 0)
            self.recording.memory.append((at, address, used, int(record.get("memory_limit") or 0)))


@dataclass(frozen=True)
class StageRun:
    """Per-stage figures of one runtime the run registered, labelled for the report.

    Attributes
    ----------
    label
        What it was: ``"run"``, ``"before re-cut"``, ``"after re-cut"``, ``"re-placed 1"``...
    stages
        :func:`~dask_infer.workflows.summary.stage_summary` rows.
    """

    label: str
    stages: list[dict[str, Any]]


def _labels(count: int, rebalance: Rebalance | Reshare | None) -> list[str]:
    """What each of ``count`` runtimes was, in the order they were registered."""
    if isinstance(rebalance, Rebalance) and rebalance.recut:
        first = [f"before re-cut ({', '.join(rebalance.cuts_before)})"]
        second = [f"after re-cut ({', '.join(rebalance.cuts_after)})"]
        return (first + second + [f"after re-cut, re-placed {i}" for i in range(1, count - 1)])[:count]
    return ["run"] + [f"re-placed {i}" for i in range(1, count)]


def stage_runs(
    client: Client, run: Execution, seconds: float, rebalance: Rebalance | Reshare | None
) -> list[StageRun]:
    """The per-stage figures of every runtime ``run`` registered, each labelled.

    Call before ``run.release``: the figures live in the workers' runtimes.
    """
    out = []
    for name, label in zip(run.active, _labels(len(run.active), rebalance), strict=True):
        stats = runtime_stats(client, name)
        stages = 1 + max((int(k) for s in stats.values() for k in s.get("stages", {})), default=0)
        rows = [row for row in stage_summary(stats, seconds, stages) if row["images"]]
        out.append(StageRun(label, rows))
    return out


def _throughput(written: Sequence[tuple[float, int]]) -> tuple[list[float], list[float]]:
    """Images/s in bins of about a fortieth of the run (at least 0.25 s): bin centres, rates."""
    if not written:
        return [], []
    end = max(t for t, _ in written)
    width = max(0.25, end / 40)
    bins = [0] * (int(end / width) + 1)
    for t, images in written:
        bins[int(t / width)] += images
    return [(i + 0.5) * width for i in range(len(bins))], [n / width for n in bins]


def _figures(recording: Recording, runs: Sequence[StageRun], gpus: Mapping[str, Any]) -> dict[str, Any]:
    """The report's Bokeh plots by section name; a section without data has none."""
    from bokeh.models import ColumnDataSource, FactorRange, HoverTool
    from bokeh.palettes import Category10_10
    from bokeh.plotting import figure

    size: dict[str, Any] = {"height": 280, "sizing_mode": "stretch_width"}
    plots: dict[str, Any] = {}
    times, rates = _throughput(recording.written)
    if times:
        p = figure(title="images/s over time", x_axis_label="seconds", y_axis_label="images/s", **size)
        p.line(times, rates, line_width=2)
        p.scatter(times, rates, size=5)
        plots["throughput"] = p
    rows = [(r.label, f"stage {s['stage']}", s["busy_s"], s["images"]) for r in runs for s in r.stages]
    if rows:
        factors = [(label, stage) for label, stage, _, _ in rows]
        source = ColumnDataSource(
            {"x": factors, "busy": [b for *_, b, _ in rows], "images": [n for *_, n in rows]}
        )
        p = figure(
            title="busy seconds per stage (summed over its workers)",
            x_range=FactorRange(factors=factors),
            y_axis_label="busy seconds",
            **size,
        )
        p.vbar(x="x", top="busy", width=0.8, source=source)
        p.add_tools(HoverTool(tooltips=[("stage", "@x"), ("busy s", "@busy{0.00}"), ("images", "@images")]))
        p.xaxis.major_label_orientation = 0.6
        plots["stages"] = p
    if recording.latencies:
        p = figure(
            title="chunk latency (submitted -> written)",
            x_axis_label="seconds (written)",
            y_axis_label="latency, seconds",
            **size,
        )
        p.scatter([t for t, _ in recording.latencies], [s for _, s in recording.latencies], size=6)
        plots["latency"] = p
    if recording.memory:
        p = figure(title="process memory per worker", x_axis_label="seconds", y_axis_label="MiB", **size)
        workers = sorted({w for _, w, _, _ in recording.memory})
        for i, worker in enumerate(workers):
            points = [(t, m / 2**20) for t, w, m, _ in recording.memory if w == worker]
            colour = Category10_10[i % 10]
            p.line([t for t, _ in points], [m for _, m in points], color=colour, legend_label=worker)
            p.scatter([t for t, _ in points], [m for _, m in points], color=colour, size=4)
        p.legend.location = "bottom_right"
        plots["memory"] = p
    if gpus:
        names = sorted(gpus)
        util = [float(gpus[n].get("utilization_mean_pct") or 0.0) for n in names]
        p = figure(title="mean GPU utilisation", x_range=FactorRange(factors=names), y_axis_label="%", **size)
        p.vbar(x=names, top=util, width=0.8)
        plots["gpu"] = p
    return plots


def _table(record: Mapping[str, Any]) -> str:
    """An HTML table of ``record``'s keys and values (nested values as JSON)."""
    rows = []
    for key, value in record.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(shown))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _stage_table(runs: Sequence[StageRun]) -> str:
    header = "<tr><th>runtime</th><th>stage</th><th>workers</th><th>images</th><th>busy s</th>"
    header += "<th>busy %</th><th>images/s busy</th></tr>"
    rows = [
        f"<tr><td>{html.escape(r.label)}</td><td>{s['stage']}</td><td>{len(s['workers'])}</td>"
        f"<td>{s['images']}</td><td>{s['busy_s']:.2f}</td><td>{100 * s['busy_fraction']:.0f}</td>"
        f"<td>{(s['images_per_s_busy'] or 0.0):.1f}</td></tr>"
        for r in runs
        for s in r.stages
    ]
    return "<table>" + header + "".join(rows) + "</table>"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
td { font-family: monospace; word-break: break-all; } p.none { color: #888; }
"""

_SECTIONS = (
    ("throughput", "Images per second"),
    ("stages", "Per-stage busy time"),
    ("latency", "Chunk latency"),
    ("memory", "Memory per worker"),
    ("gpu", "GPU use"),
)


def build_report(
    summary: Mapping[str, Any],
    recording: Recording,
    runs: Sequence[StageRun],
    *,
    config: Mapping[str, Any],
    plan: Mapping[str, Any] | None = None,
    dask_report: str | None = None,
) -> str:
    """The report page as one HTML string, BokehJS inline, no outside resource.

    Parameters
    ----------
    summary
        :meth:`RunSummary.to_dict` of the run.
    recording
        What the run recorded (:class:`Recording`).
    runs
        Per-stage figures of each runtime, labelled (:func:`stage_runs`).
    config
        The run's config as a dict.
    plan
        The stage plan as a dict, if the model was split.
    dask_report
        Where dask's performance report is, relative to the page, to link to.

    Returns
    -------
    str
        The page.
    """
    from bokeh.embed import components
    from bokeh.resources import INLINE

    plots = _figures(recording, runs, summary.get("gpus") or {})
    script, divs = components(plots) if plots else ("", {})
    body = [f"<h1>dask-infer run: {html.escape(str(summary.get('model', '')))}</h1>"]
    body.append(
        f"<p>{summary.get('images', 0)} images in {float(summary.get('seconds', 0.0)):.1f} s "
        f"({float(summary.get('images_per_second', 0.0)):.1f} images/s), {summary.get('chunks', 0)} chunks "
        f"of {summary.get('chunk_size', 0)} on {summary.get('workers', 0)} worker(s); "
        f"results: <code>{html.escape(str(summary.get('output', '')))}</code></p>"
    )
    if dask_report:
        body.append(
            f'<p>Dask\'s performance report: <a href="{html.escape(dask_report)}">'
            f"{html.escape(dask_report)}</a></p>"
        )
    for key, title in _SECTIONS:
        if key == "gpu" and key not in divs:
            continue
        body.append(f"<h2>{title}</h2>")
        body.append(divs.get(key, '<p class="none">nothing was recorded</p>'))
        if key == "stages" and runs:
            body.append(_stage_table(runs))
        if key == "gpu":
            body.append(_table(summary.get("gpus") or {}))
    if summary.get("rebalance"):
        body += ["<h2>Rebalance</h2>", _table(summary["rebalance"])]
    body += ["<h2>Placement</h2>", _table(summary.get("placement") or {})]
    if plan:
        body += ["<h2>Stage plan</h2>", _table(plan)]
    body += ["<h2>Config</h2>", _table(config), "<h2>Summary</h2>", _table(summary)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>dask-infer run report</title><style>{_STYLE}</style>\n"
        f"{INLINE.render_js()}\n{INLINE.render_css()}\n</head><body>\n"
        + "\n".join(body)
        + f"\n{script}\n</body></html>\n"
    )


def write_report(path: str, page: str) -> None:
    """Write the report ``page`` to ``path``, making its folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")


def report_run(
    path: str,
    client: Client,
    run: Execution,
    summary: RunSummary,
    recorder: RunRecorder,
    *,
    config: Mapping[str, Any],
    plan: Mapping[str, Any] | None,
    rebalance: Rebalance | Reshare | None,
) -> None:
    """Gather the run's stage figures and a last memory sample, and write the report to ``path``.

    Call before ``run.release``, while the runtimes still hold their figures.
    """
    recorder.sample()
    runs = stage_runs(client, run, summary.seconds, rebalance)
    dask_report = Path(dask_report_path(path))
    page = build_report(
        summary.to_dict(),
        recorder.recording,
        runs,
        config=config,
        plan=plan,
        dask_report=dask_report.name if dask_report.exists() else None,
    )
    write_report(path, page)
