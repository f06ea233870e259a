"""The dashboard's dask-infer progress page: served by the scheduler, self-contained, drawn offline.

That it counts a pipeline's whole run rather than its window is tested beside the window
itself, in ``test_run_placements.py``.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dask_infer.io.dataset import write_image_dataset
from dask_infer.workflows.progress_page import PAGE, page_url
from tests.browser import visit_offline
from tests.conftest import gpu_labelled, random_images
from tests.reference import run_small


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as answer:
        return answer.status, answer.read().decode()


@pytest.fixture(scope="module")
def page(small_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The page's address on a scheduler that ran one data-parallel run of 6 chunks."""
    here = tmp_path_factory.mktemp("progress")
    write_image_dataset(str(here / "in.zarr"), random_images(24, seed=22), chunk=4)
    lines: list[str] = []
    with gpu_labelled(2) as client:
        run_small(client, here / "in.zarr", here / "o.zarr", small_weights, chunk_size=4, echo=lines.append)
        url = page_url(client.dashboard_link)
        assert url is not None and url.endswith(PAGE)
        assert f"progress: {url}" in lines, "the run prints where its progress page is"
        yield url


def test_the_scheduler_serves_the_runs_counts_and_a_self_contained_page(page: str) -> None:
    status, body = _get(page + ".json")
    data = json.loads(body)
    assert status == 200 and len(data["runs"]) == 1
    run = data["runs"][0]
    assert run["label"] == "resnet18" and run["status"] == "finished"
    assert run["chunks"] == 6 and run["images"] == 24 and run["finished"] >= run["started"]
    groups = [(g["name"], g["done"]) for g in run["groups"]]
    assert groups == [("read", 6), ("infer_resnet18", 6), ("write", 6)]
    status, html = _get(page)
    assert status == 200 and "progress.json" in html
    # Self-contained: no script, style or image from anywhere else.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)


def test_the_page_draws_the_runs_offline(browser: str, page: str) -> None:
    """Opened in headless Chromium: the page fetches only its own data and shows the run's counts."""
    visit = visit_offline(browser, page, canvases=0, seconds=5)
    assert not visit.exceptions and not visit.failed, (visit.exceptions, visit.failed)
    # The page itself and its data, polled; the browser's own favicon request aside.
    asked = {r for r in visit.requests if not r.endswith("/favicon.ico")}
    assert asked == {page, page + ".json"}, visit.requests
    assert "resnet18 \u2014 finished" in visit.text and "write\n6 / 6" in visit.text, visit.text
