"""GPU workers shorten Python's GIL switch interval; the environment may set it; bad values are refused."""

from __future__ import annotations

import pytest

from dask_infer.workflows.runtime import SWITCH_INTERVAL_ENV, gpu_switch_interval


def test_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SWITCH_INTERVAL_ENV, raising=False)
    assert gpu_switch_interval() == 0.0005
    monkeypatch.setenv(SWITCH_INTERVAL_ENV, "0.002")
    assert gpu_switch_interval() == 0.002


@pytest.mark.parametrize("text", ["abc", "0", "-1"])
def test_bad_values_name_the_variable_and_the_fix(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(SWITCH_INTERVAL_ENV, text)
    wanted = rf"DASK_INFER_SWITCH_INTERVAL='{text}' is not a positive.*0\.0005"
    with pytest.raises(RuntimeError, match=wanted):
        gpu_switch_interval()
