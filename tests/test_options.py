"""The shared vocabularies and checks every option goes through."""

from __future__ import annotations

import pytest

from dask_infer.errors import DaskInferError, ModelError
from dask_infer.options import check_choice, check_positive_int, default_batch_size


@pytest.mark.parametrize("value", [1, 7, 10**9])
def test_positive_ints_pass_through(value: int) -> None:
    assert check_positive_int("n", value) == value


@pytest.mark.parametrize("value", [0, -3, 2.0, "2", True, False, None])
def test_everything_else_is_refused_with_its_name_and_value(value: object) -> None:
    with pytest.raises(DaskInferError, match=rf"^n={value!r} must be a whole number >= 1$"):
        check_positive_int("n", value)


def test_optional_allows_none_and_says_so() -> None:
    assert check_positive_int("threads", None, optional=True) is None
    with pytest.raises(ModelError, match=r"^threads=0 must be a whole number >= 1 or None$"):
        check_positive_int("threads", 0, optional=True, error=ModelError)


def test_choices_name_the_value_and_the_choices() -> None:
    assert check_choice("device", "cpu", ("auto", "cpu")) == "cpu"
    with pytest.raises(DaskInferError, match=r"^device='tpu' is not one of auto, cpu$"):
        check_choice("device", "tpu", ("auto", "cpu"))


def test_default_batch_size_by_device() -> None:
    assert default_batch_size(gpu=True) == 256 and default_batch_size(gpu=False) == 32
