"""Notebooks are committed without outputs, run top to bottom, and show what they are for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

_WIDGET = "application/vnd.jupyter.widget-view+json"
SHOWN: dict[str, dict[str, int]] = {
    "quickstart.ipynb": {"image/png": 1, "text/html": 1, _WIDGET: 1},
    "pipeline.ipynb": {"image/png": 2, "text/html": 1},
}
"""Per notebook, outputs of each MIME type it shows at least: figures, the summary table, widgets."""


def _shown(nb: Any) -> list[dict[str, Any]]:
    """The data of every displayed output (results and display calls) of the code cells."""
    return [
        out["data"]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") in ("execute_result", "display_data")
    ]


def test_every_notebook_says_what_it_shows() -> None:
    assert sorted(SHOWN) == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, digits_weights: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs"
    assert not any("matplotlib.use" in c.source for c in nb.cells), f"{path.name} forces a backend"
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    shown = _shown(nb)
    for mime, least in SHOWN.get(path.name, {}).items():
        assert sum(mime in data for data in shown) >= least, f"{path.name} shows no {mime}"
    assert not any(d.get("text/plain", "").startswith("<Figure size") for d in shown if len(d) == 1)
    tables = [d["text/html"] for d in shown if "text/html" in d and "dask-infer run" in d["text/html"]]
    assert tables, f"{path.name} shows no summary table"
