"""What a re-cut decided, as the log, the summary and the attrs show it."""

from __future__ import annotations

import pytest

from dask_infer.partition.balance import imbalance
from dask_infer.workflows.rebalance import Rebalance, recut_pays_off, recut_saving


def test_report_says_before_and_after() -> None:
    r = Rebalance(1.25, ("a",), (0.03, 0.01), ("b",), (0.02, 0.02), chunks_measured=8)
    assert r.recut and imbalance(r.measured_before) == pytest.approx(1.5)
    d = r.to_dict()
    assert d["before"]["cut_points"] == ["a"] and d["after"]["cut_points"] == ["b"]
    assert d["after"]["predicted_imbalance"] == pytest.approx(1.0) and d["chunks_measured"] == 8
    assert "exceeds 1.25" in r.describe() and "re-cut at b" in r.describe()
    assert not Rebalance(1.25, ("a",), (0.01, 0.01), ("a",), (0.01, 0.01)).recut


def test_a_recut_saves_at_most_the_gap_to_a_perfect_balance() -> None:
    """Stages at 30 and 10 ms per image: the pace is 30, a perfect cut 20; 100 images save 1 s."""
    assert recut_saving((0.03, 0.01), 100) == pytest.approx(1.0)
    assert recut_saving((0.02, 0.02), 100) == 0.0
    assert recut_saving((0.03, 0.01), 0) == 0.0 and recut_saving((), 50) == 0.0


def test_a_recut_is_skipped_only_when_loading_costs_more_than_it_can_save() -> None:
    """Compiled stages that take 12 s to load beyond the chunks in flight, for at most 3 s saved:
    skipped. Saving more than the loading costs, or loading costs under a second: re-cut."""
    assert not recut_pays_off(3.0, 12.0)
    assert recut_pays_off(15.0, 12.0)
    assert recut_pays_off(0.05, 0.4) and recut_pays_off(0.0, -2.0)
