"""Re-cutting by measured stage times: the pure rule on literal costs."""

from __future__ import annotations

import pytest

from dask_infer.workflows.rebalance import Rebalance, imbalance, recut_positions


def test_measured_times_move_the_cut() -> None:
    # 8 nodes after the input, uniform profile, cut after node 4: the profile says balanced,
    # but stage 0 measured three times slower, so its nodes weigh 3 each.
    costs = [0.0] + [1.0] * 8
    candidates = [1, 2, 3, 4, 5, 6, 7]
    cuts, predicted = recut_positions(costs, candidates, [4], [12.0, 4.0])
    assert cuts == [3]
    assert predicted == pytest.approx([9.0, 7.0])


def test_balanced_measurements_keep_the_cut() -> None:
    costs = [0.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    cuts, predicted = recut_positions(costs, [1, 2, 3, 4, 5], [3], [4.0, 4.0])
    assert cuts == [3] and predicted == pytest.approx([4.0, 4.0])


def test_three_stages_and_a_stage_profiled_at_zero() -> None:
    costs = [0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    cuts, predicted = recut_positions(costs, [1, 2, 3, 4, 5], [2, 4], [2.0, 6.0, 2.0])
    assert sum(predicted) == pytest.approx(10.0)
    assert max(predicted) < 6.0 and len(cuts) == 2


def test_wrong_number_of_measurements() -> None:
    with pytest.raises(ValueError, match="1 measured times for 2 stages"):
        recut_positions([0.0, 1.0, 1.0], [1], [1], [1.0])


def test_report_says_before_and_after() -> None:
    r = Rebalance(1.25, ("a",), (0.03, 0.01), ("b",), (0.02, 0.02), chunks_measured=8)
    assert r.recut and imbalance(r.measured_before) == pytest.approx(1.5)
    d = r.to_dict()
    assert d["before"]["cut_points"] == ["a"] and d["after"]["cut_points"] == ["b"]
    assert d["after"]["predicted_imbalance"] == pytest.approx(1.0) and d["chunks_measured"] == 8
    assert "exceeds 1.25" in r.describe() and "re-cut at b" in r.describe()
    assert not Rebalance(1.25, ("a",), (0.01, 0.01), ("a",), (0.01, 0.01)).recut
