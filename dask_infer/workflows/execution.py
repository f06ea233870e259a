"""What a run has registered on the cluster: its runtimes, and the spec and placement they run.

A re-cut registers a second runtime beside the first; both stay until the run ends, so
chunks already submitted finish on the stages they were submitted to.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from distributed import Client
from distributed.comm.core import CommClosedError

from dask_infer.workflows.placement import Placement
from dask_infer.workflows.runtime import ModelRuntime
from dask_infer.workflows.stages import RuntimeSpec
from dask_infer.workflows.summary import stage_summary

__all__ = ["Execution", "runtime_stats", "seconds_per_image"]

_GONE = (CommClosedError, OSError)
"""What talking to a worker that died raises."""


def runtime_stats(client: Client, name: str) -> dict[str, dict[str, Any]]:
    """Each worker's figures for the runtime registered as ``name``, by worker address.

    A worker that is gone by the time it is asked (killed, restarted) is left out.
    """
    answers = client.run(lambda dask_worker: dask_worker.plugins[name].stats(), on_error="return")
    out = {}
    for address, answer in answers.items():
        if isinstance(answer, _GONE):
            continue
        if isinstance(answer, BaseException):
            raise answer
        out[address] = answer
    return out


def seconds_per_image(stats: dict[str, dict[str, Any]], stages: int) -> tuple[float, ...]:
    """Compute seconds per image of each stage, over the workers that ran it (0 if none did)."""
    return tuple(row["work_seconds_per_image"] or 0.0 for row in stage_summary(stats, 1.0, stages))


@dataclass
class Execution:
    """What a run has registered and decided so far: it changes when the stages are re-cut."""

    spec: RuntimeSpec
    placement: Placement
    active: list[str] = field(default_factory=list)
    loads: int = 0
    reused: int = 0
    """Of ``loads``, those that took the stages an earlier run's runtime left on the worker."""
    last_start: float = 0.0
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    """Each re-placement of the stages after workers were lost or joined."""

    @property
    def current(self) -> str:
        """Name of the runtime new chunks are submitted to."""
        return self.active[-1]

    def register(self, client: Client) -> str:
        """Register a runtime for the current spec; it loads on the workers before this returns."""
        name = f"dask-infer-runtime-{uuid.uuid4().hex[:8]}"
        # A worker may die while the plugin is sent: the scheduler keeps the plugin for the
        # workers that join, and a pipeline re-places its stages when it sees the loss.
        with contextlib.suppress(*_GONE):
            client.register_plugin(ModelRuntime(self.spec, name), name=name)
        self.active.append(name)
        stats = runtime_stats(client, name).values()
        self.loads += sum(s["loads"] for s in stats)
        self.reused += sum(bool(s.get("reused")) for s in stats)
        return name

    def release(self, client: Client) -> None:
        """Unregister every runtime, which frees their stages on every worker."""
        while self.active:
            name = self.active.pop()
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(name)
