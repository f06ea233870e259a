"""How a run's summary reads: which chunks the stage lines describe, and its HTML table in Jupyter."""

from __future__ import annotations

from dataclasses import replace
from html.parser import HTMLParser
from typing import Any

from dask_infer.workflows.summary import RunSummary, stage_summary


class _Cells(HTMLParser):
    """The text of every table cell and caption, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[str] = []
        self._open = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._open = tag in ("td", "th", "caption")
        if self._open:
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        self._open = False

    def handle_data(self, data: str) -> None:
        if self._open:
            self.cells[-1] += data


def _summary(**changes: Any) -> RunSummary:
    stats = {
        "tcp://a": {"stages": {0: {"chunks": 4, "images": 40, "busy_s": 2.0, "work_s": 1.5}}},
        "tcp://b": {"stages": {1: {"chunks": 4, "images": 40, "busy_s": 1.0, "work_s": 1.0}}},
    }
    base = RunSummary(
        images=96,
        seconds=4.0,
        images_per_second=24.0,
        output="/tmp/out.zarr",
        model="resnet18",
        pretrained=False,
        chunks=12,
        chunk_size=8,
        workers=2,
        model_loads=2,
        cluster="LocalCluster",
        dashboard="http://127.0.0.1:8787/status",
        placement={"mode": "pipeline"},
        stage_stats=stage_summary(stats, 4.0, 2),
    )
    return replace(base, **changes)


_RECUT = {
    "recut": True,
    "chunks_measured": 4,
    "chunks_before": 7,
    "before": {"stage_seconds_per_image": [0.05, 0.01]},
}


def test_stage_lines_of_a_whole_run_have_no_heading() -> None:
    summary = _summary()
    assert summary.stage_scope() is None
    lines = summary.format_stages().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["stage 0", "stage 1"]


def test_stage_lines_after_a_recut_say_so_and_give_the_times_before() -> None:
    lines = _summary(rebalance=_RECUT).format_stages().splitlines()
    assert lines[0] == "stage times since the re-cut after chunk 7 of 12:"
    assert lines[-1] == "  before the re-cut: 50.0, 10.0 ms/image per stage, measured over the first 4 chunks"
    kept = _summary(rebalance={**_RECUT, "recut": False})
    assert kept.stage_scope() is None


def test_stage_lines_after_workers_changed_say_so() -> None:
    summary = _summary(recoveries=[{"written_before": 5}])
    assert summary.stage_scope() == "stage times since the stages were placed again with 5 chunk(s) written"


def test_the_html_table_holds_the_key_figures_and_each_stage() -> None:
    parser = _Cells()
    parser.feed(_summary(rebalance=_RECUT, output="/tmp/<out>.zarr")._repr_html_())
    cells = parser.cells
    assert cells[0] == "dask-infer run"
    figures = dict(zip(cells[1:17:2], cells[2:18:2], strict=True))
    assert figures["images"] == "96" and figures["throughput"] == "24.0 images/s"
    assert figures["output"] == "/tmp/<out>.zarr" and figures["placement"] == "pipeline"
    assert "stage times since the re-cut after chunk 7 of 12" in cells
    start = cells.index("images/s busy") + 1
    assert cells[start : start + 6] == ["0", "1", "40", "2.00", "50", "20.0"]
