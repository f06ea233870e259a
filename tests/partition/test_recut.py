"""Re-cutting by measured stage times: the pure rule on literal costs."""

from __future__ import annotations

import pytest

from dask_infer.partition.recut import recut_positions


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
