"""The run report: built from synthetic data; written by a real run and opened offline in Chromium."""

from __future__ import annotations

import re
from pathlib import Path

from distributed import Client

from dask_infer.workflows.monitor import dask_report_path
from dask_infer.workflows.report import Recording, RunRecorder, StageRun, _labels, _throughput, build_report
from dask_infer.workflows.summary import stage_summary
from tests.browser import visit_offline
from tests.reference import run_small

_OUTSIDE = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.I)


def _stage_rows(busy: tuple[float, ...]) -> list[dict[str, object]]:
    stats = {"w1": {"stages": {k: {"images": 64, "busy_s": b, "work_s": b} for k, b in enumerate(busy)}}}
    return stage_summary(stats, 10.0, len(busy))


def _synthetic_page(gpus: dict[str, object] | None = None) -> str:
    recording = Recording(
        written=[(0.5 * i, 16) for i in range(1, 21)],
        latencies=[(0.5 * i, 0.3 + 0.01 * i) for i in range(1, 21)],
        memory=[
            (float(t), w, (200 + t) * 2**20, 2**30) for t in range(10) for w in ("tcp://a:1", "tcp://b:2")
        ],
    )
    runs = [
        StageRun("before re-cut (layer2)", _stage_rows((3.0, 1.0))),
        StageRun("after re-cut (layer3)", _stage_rows((2.0, 2.1))),
    ]
    summary = {
        "model": "resnet18",
        "images": 320,
        "seconds": 10.0,
        "images_per_second": 32.0,
        "chunks": 20,
        "chunk_size": 16,
        "workers": 2,
        "output": "/tmp/out.zarr",
        "placement": {"mode": "pipeline"},
        "gpus": gpus or {},
        "rebalance": {
            "recut": True,
            "before": {"cut_points": ["layer2"]},
            "after": {"cut_points": ["layer3"]},
        },
    }
    return build_report(
        summary,
        recording,
        runs,
        config={"model": "resnet18", "stages": 2, "report": "run.html"},
        plan={"cut_points": ["layer2"]},
        dask_report="run.dask.html",
    )


def test_report_page_holds_every_section_and_no_outside_resource() -> None:
    page = _synthetic_page()
    for title in (
        "Images per second",
        "Per-stage busy time",
        "Chunk latency",
        "Memory per worker",
        "Stage plan",
        "Config",
        "Rebalance",
    ):
        assert f"<h2>{title}</h2>" in page
    assert "before re-cut (layer2)" in page and "after re-cut (layer3)" in page
    assert '<a href="run.dask.html">' in page
    assert "GPU use" not in page
    assert not _OUTSIDE.search(page), _OUTSIDE.search(page)
    # BokehJS is inline: a large script, and one root element per plot.
    assert len(page) > 1_000_000
    assert page.count('data-root-id="') == 4


def test_report_shows_gpu_use_where_there_is_a_gpu() -> None:
    gpus = {"tcp://a:1": {"gpu": "H100", "utilization_mean_pct": 71.0, "memory_peak_bytes": 2**33}}
    page = _synthetic_page(gpus)
    assert "<h2>GPU use</h2>" in page and "H100" in page
    assert page.count('data-root-id="') == 5


def test_a_report_with_nothing_recorded_says_so() -> None:
    page = build_report({"model": "m"}, Recording(), [], config={})
    assert page.count("nothing was recorded") == 4
    assert "data-root-id" not in page


def test_throughput_bins_images_by_time() -> None:
    times, rates = _throughput([(0.1, 10), (0.2, 10), (0.6, 5)])
    assert times == [0.125, 0.375, 0.625]
    assert rates == [80.0, 0.0, 20.0]
    assert _throughput([]) == ([], [])


def test_runtimes_are_labelled_before_and_after_a_recut() -> None:
    from dask_infer.workflows.rebalance import Rebalance

    recut = Rebalance(1.2, ("layer2",), (1.0, 0.5), ("layer3",), (0.7, 0.8))
    assert _labels(3, recut) == [
        "before re-cut (layer2)",
        "after re-cut (layer3)",
        "after re-cut, re-placed 1",
    ]
    assert _labels(2, None) == ["run", "re-placed 1"]
    kept = Rebalance(1.2, ("layer2",), (1.0, 0.9), ("layer2",), (1.0, 0.9))
    assert _labels(1, kept) == ["run"]


def test_recorder_counts_written_chunks_without_a_client() -> None:
    seen: list[int] = []
    recorder = RunRecorder(None)
    done = recorder.on_done(seen.append)
    done(16)
    done(8)
    recorder.check()
    assert seen == [16, 8]
    assert [n for _, n in recorder.recording.written] == [16, 8]
    assert recorder.recording.memory == []


def test_dask_report_goes_beside_the_run_report() -> None:
    assert dask_report_path("/r/run.html") == "/r/run.dask.html"
    assert dask_report_path("out/report.htm") == "out/report.dask.htm"


def test_run_report_opens_offline_and_draws_its_plots(
    browser: str, client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    report = tmp_path / "reports" / "run.html"
    summary = run_small(
        client, small_dataset, tmp_path / "out.zarr", small_weights, report=str(report), chunk_size=16
    )
    assert summary.images == 200
    page = report.read_text()
    dask_page = Path(dask_report_path(str(report)))
    assert dask_page.exists(), "dask's performance report is written beside the run report"
    assert f'<a href="{dask_page.name}">' in page
    for text in (page, dask_page.read_text()):
        assert not _OUTSIDE.search(text), _OUTSIDE.search(text)
    # images/s, stage busy time, chunk latency and memory: four plots, with data.
    assert page.count('data-root-id="') == 4
    assert "nothing was recorded" not in page

    visit = visit_offline(browser, report, canvases=4)
    assert not visit.exceptions, visit.exceptions
    assert visit.failed == [], visit.failed
    outside = [u for u in visit.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]
    assert outside == [], f"the report asked the network for {outside}"
    assert visit.painted() >= 4, f"plots not drawn: canvases (width, height, painted pixels) {visit.canvases}"

    dask_visit = visit_offline(browser, dask_page, canvases=1)
    assert [u for u in dask_visit.requests if not u.startswith(("file:", "data:", "blob:", "about:"))] == []
    assert dask_visit.painted() >= 1, dask_visit.canvases
