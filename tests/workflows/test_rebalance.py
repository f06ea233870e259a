"""What a re-cut decided, as the log, the summary and the attrs show it."""

from __future__ import annotations

import pytest

from dask_infer.partition.balance import imbalance
from dask_infer.workflows.rebalance import Rebalance


def test_report_says_before_and_after() -> None:
    r = Rebalance(1.25, ("a",), (0.03, 0.01), ("b",), (0.02, 0.02), chunks_measured=8)
    assert r.recut and imbalance(r.measured_before) == pytest.approx(1.5)
    d = r.to_dict()
    assert d["before"]["cut_points"] == ["a"] and d["after"]["cut_points"] == ["b"]
    assert d["after"]["predicted_imbalance"] == pytest.approx(1.0) and d["chunks_measured"] == 8
    assert "exceeds 1.25" in r.describe() and "re-cut at b" in r.describe()
    assert not Rebalance(1.25, ("a",), (0.01, 0.01), ("a",), (0.01, 0.01)).recut
