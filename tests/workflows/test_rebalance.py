"""What a re-cut decided, as the log, the summary and the attrs show it."""

from __future__ import annotations

import pytest

from dask_infer.partition.balance import imbalance
from dask_infer.workflows.rebalance import Rebalance, Reshare, recut_pays_off, recut_saving


def test_report_says_before_and_after() -> None:
    r = Rebalance(1.25, ("a",), (0.03, 0.01), ("b",), (0.02, 0.02), chunks_measured=8)
    assert r.recut and imbalance(r.measured_before) == pytest.approx(1.5)
    d = r.to_dict()
    assert d["before"]["cut_points"] == ["a"] and d["after"]["cut_points"] == ["b"]
    assert d["after"]["predicted_imbalance"] == pytest.approx(1.0) and d["chunks_measured"] == 8
    assert "exceeds 1.25" in r.describe() and "re-cut at b" in r.describe()
    assert not Rebalance(1.25, ("a",), (0.01, 0.01), ("a",), (0.01, 0.01)).recut


def test_a_reshare_says_the_shares_and_the_two_workers_times() -> None:
    """Stage 1 of three shared: 0.010 s before it, 0.004 in it, 0.012 after, per image."""
    before = {"shared": {"stage": 1, "share": 1.0}}
    after = {"shared": {"stage": 1, "share": 0.25}}
    r = Reshare(1, (1.0, 0.25), (0.010, 0.004, 0.012), 8, before, after)
    assert r.reshared and r.worker_times() == pytest.approx((0.011, 0.015))
    assert r.describe() == (
        "rebalance: stage times 10.00, 4.00, 12.00 ms/image over 8 chunks; stage 1's share on its "
        "first worker 100% -> 25%, which gives the two workers 11.00, 15.00 ms/image"
    )
    d = r.to_dict()
    assert d["reshare"] and "recut" not in d and d["shares"] == [1.0, 0.25] and d["stage"] == 1
    assert d["placement_before"] is before and d["placement_after"] is after
    kept = Reshare(1, (0.5,), (0.010, 0.004, 0.012), 4, before, before)
    assert not kept.reshared and "50% (kept)" in kept.describe()


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
