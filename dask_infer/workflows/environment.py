"""The ``DASK_INFER_*`` variables workers read, checked where the run starts.

Workers read them from their own environment when they load a model; a local cluster's
workers inherit this process's. A bad value found there would end the run in a worker's
traceback after the cluster started, so a run checks this process's values first and
stops in one line naming the variable, its value and the fix.
"""

from __future__ import annotations

import os

from dask_infer.errors import DaskInferError
from dask_infer.partition.compress.freeze import FREEZING_ENV
from dask_infer.workflows.fold import fold_setting
from dask_infer.workflows.kept import keep_seconds
from dask_infer.workflows.runtime import gpu_switch_interval
from dask_infer.workflows.streams import gpu_streams

__all__ = ["check_worker_environment"]

_FREEZING_FIX = "0 to compile CPU stages without inductor freezing, 1 or unset to freeze them"


def check_worker_environment() -> None:
    """Check this process's ``DASK_INFER_*`` worker settings.

    Raises
    ------
    DaskInferError
        A variable holds a value its reader would refuse (or silently ignore).
    """
    text = os.environ.get(FREEZING_ENV, "").strip()
    if text not in ("", "0", "1"):
        raise DaskInferError(f"{FREEZING_ENV}={text!r} is not 1 or 0; set {_FREEZING_FIX}")
    for read in (fold_setting, gpu_streams, gpu_switch_interval, keep_seconds):  # each reads its variable
        try:
            read()
        except RuntimeError as exc:
            raise DaskInferError(str(exc)) from None
