"""The plan of a partition: where the model is cut and what each stage costs.

A plan is plain data that round-trips through JSON, so a worker can rebuild its
stage from (model name, weights file, cut points) without receiving a pickled model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from dask.utils import format_bytes

from dask_infer.errors import DaskInferError
from dask_infer.options import BALANCE_MODES, check_choice, check_positive_int
from dask_infer.partition.balance import SHARED_LEAD, imbalance, shared_loads

__all__ = ["PlanError", "StageInfo", "StagePlan", "check_balance", "format_plan"]

_PLAN_VERSION = 1


class PlanError(DaskInferError):
    """A plan, or an option used to make one, is malformed."""


def check_balance(balance: str) -> str:
    """Return ``balance`` if it is a known balance mode, else raise :class:`PlanError`."""
    return check_choice("balance", balance, BALANCE_MODES, error=PlanError)


@dataclass(frozen=True)
class StageInfo:
    """Cost of one stage on the sample batch.

    Attributes
    ----------
    index
        Position of the stage, from 0.
    first_node, last_node
        Names of the first and last graph nodes the stage computes.
    num_nodes
        Number of input-dependent graph nodes in the stage.
    params
        Parameters the stage module holds.
    flops
        Floating point operations for the sample batch.
    time_s
        Measured wall time for the sample batch (sum of per-node medians).
    weight_bytes
        Bytes of the stage's parameters and buffers.
    activation_bytes
        Bytes of the tensors the stage creates for the sample batch.
    """

    index: int
    first_node: str
    last_node: str
    num_nodes: int
    params: int
    flops: int
    time_s: float
    weight_bytes: int
    activation_bytes: int

    @property
    def memory_bytes(self) -> int:
        """Weights plus created activations: an upper bound of the stage's working set."""
        return self.weight_bytes + self.activation_bytes

    def cost(self, balance: str) -> float:
        """This stage's cost in balance mode ``balance``."""
        check_balance(balance)
        return float(
            {"time": self.time_s, "flops": self.flops, "params": self.params}.get(balance, self.memory_bytes)
        )


@dataclass(frozen=True)
class StagePlan:
    """Where a model is cut into sequential stages, and what each stage and cut costs.

    Attributes
    ----------
    model
        Registry name of the model (e.g. ``"resnet50"``), if known.
    balance
        Cost the cuts balance: one of ``BALANCE_MODES``.
    input_shape
        Shape of the sample batch the costs were measured on.
    cut_points
        Names of the graph nodes after which the model is cut (stable across re-tracing
        of the same architecture); ``len(cut_points) == len(stages) - 1``.
    stages
        Cost of each stage.
    cut_shapes
        Shape of the one tensor crossing each cut.
    cut_bytes
        Bytes of the tensor crossing each cut.
    output_shape
        Shape of the model's output (empty if it is not a tensor).
    num_candidates
        How many cut points the model offers.
    threads
        Torch intra-op threads the times were measured with (``None``: the process's
        setting, not recorded).
    fused
        Times are those of compiled stages: pointwise nodes cost nothing (they fuse into
        the operation before them), and no cut separates one from its producer (see
        :func:`~dask_infer.partition.partition_model`).
    shared_stage
        A stage the workers of the stages beside it both hold and share chunk by chunk (the
        boundary block of a two-stage pipeline that no single cut balances), or ``None``.
    """

    model: str | None
    balance: str
    input_shape: tuple[int, ...]
    cut_points: tuple[str, ...]
    stages: tuple[StageInfo, ...]
    cut_shapes: tuple[tuple[int, ...], ...]
    cut_bytes: tuple[int, ...]
    output_shape: tuple[int, ...]
    num_candidates: int
    threads: int | None = None
    fused: bool = False
    shared_stage: int | None = None

    def __post_init__(self) -> None:
        check_balance(self.balance)
        check_positive_int("threads", self.threads, optional=True, error=PlanError)
        n = len(self.stages)
        if self.shared_stage is not None and not 0 < self.shared_stage < n - 1:
            raise PlanError(
                f"shared_stage={self.shared_stage!r} must lie between two stages (1..{n - 2}); "
                "drop it, or give a plan of 3 stages or more"
            )
        if n < 1 or not len(self.cut_points) == len(self.cut_shapes) == len(self.cut_bytes) == n - 1:
            raise PlanError(
                f"plan has {n} stages but {len(self.cut_points)} cut points, {len(self.cut_shapes)} "
                f"cut shapes and {len(self.cut_bytes)} cut sizes; each must be one less than the stages"
            )

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)

    @property
    def stage_costs(self) -> tuple[float, ...]:
        """Each stage's cost in this plan's balance mode."""
        return tuple(s.cost(self.balance) for s in self.stages)

    @property
    def imbalance(self) -> float:
        """Largest stage cost over the mean stage cost (1.0 is perfect balance); with a shared
        stage, of what each of the two workers takes when the chunks are routed as placement
        routes them (the first worker :data:`~dask_infer.partition.balance.SHARED_LEAD` lighter)."""
        if self.shared_stage is not None:
            return imbalance(shared_loads(self.stage_costs, self.shared_stage, SHARED_LEAD))
        return imbalance(self.stage_costs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict; :meth:`from_dict` inverts it."""
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["cut_points"] = list(self.cut_points)
        data["cut_shapes"] = [list(s) for s in self.cut_shapes]
        data["cut_bytes"] = list(self.cut_bytes)
        data["output_shape"] = list(self.output_shape)
        data["stages"] = [asdict(s) for s in self.stages]
        data["version"] = _PLAN_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePlan:
        """Rebuild a plan from :meth:`to_dict` output.

        Raises
        ------
        PlanError
            If keys are missing or unknown, or values have the wrong type.
        """
        if not isinstance(data, dict):
            raise PlanError(f"a stage plan must be a dict, not {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", _PLAN_VERSION)
        if version != _PLAN_VERSION:
            raise PlanError(f"stage plan version {version!r} is not supported; re-run `dask-infer partition`")
        data.setdefault("threads", None)
        data.setdefault("fused", False)
        data.setdefault("shared_stage", None)
        _check_keys("stage plan", data, {f.name for f in fields(cls)})
        try:
            stages = []
            for raw in data["stages"]:
                _check_keys("stage", raw, {f.name for f in fields(StageInfo)})
                stages.append(
                    StageInfo(
                        index=int(raw["index"]),
                        first_node=str(raw["first_node"]),
                        last_node=str(raw["last_node"]),
                        num_nodes=int(raw["num_nodes"]),
                        params=int(raw["params"]),
                        flops=int(raw["flops"]),
                        time_s=float(raw["time_s"]),
                        weight_bytes=int(raw["weight_bytes"]),
                        activation_bytes=int(raw["activation_bytes"]),
                    )
                )
            return cls(
                model=None if data["model"] is None else str(data["model"]),
                balance=str(data["balance"]),
                input_shape=tuple(int(v) for v in data["input_shape"]),
                cut_points=tuple(str(v) for v in data["cut_points"]),
                stages=tuple(stages),
                cut_shapes=tuple(tuple(int(v) for v in s) for s in data["cut_shapes"]),
                cut_bytes=tuple(int(v) for v in data["cut_bytes"]),
                output_shape=tuple(int(v) for v in data["output_shape"]),
                num_candidates=int(data["num_candidates"]),
                threads=None if data["threads"] is None else int(data["threads"]),
                fused=bool(data["fused"]),
                shared_stage=None if data["shared_stage"] is None else int(data["shared_stage"]),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"stage plan has a malformed value: {exc}") from exc

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as a JSON document."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> StagePlan:
        """Rebuild a plan from :meth:`to_json` output.

        Raises
        ------
        PlanError
            If ``text`` is not JSON or not a stage plan.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"stage plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _check_keys(what: str, data: Any, expected: set[str]) -> None:
    if not isinstance(data, dict):
        raise PlanError(f"{what} must be a JSON object, not {type(data).__name__}")
    missing, unknown = sorted(expected - data.keys()), sorted(data.keys() - expected)
    if missing or unknown:
        raise PlanError(
            f"{what} has missing keys {missing} and unknown keys {unknown}; "
            "give the output of StagePlan.to_dict / to_json"
        )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape) if shape else "-"


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: StagePlan) -> str:
    """Render ``plan`` as a table: one row per stage, its cut, and the imbalance line."""
    title = (
        f"{plan.model or 'model'} in {plan.num_stages} stage{'s' if plan.num_stages > 1 else ''}, "
        f"balanced by {plan.balance} (input {_shape(plan.input_shape)}, "
        + (f"{plan.threads} thread{'s' if plan.threads > 1 else ''}, " if plan.threads else "")
        + ("as compiled, pointwise ops fused, " if plan.fused else "")
        + f"{plan.num_candidates} cut points available)"
    )
    header = (
        "stage",
        "nodes",
        "first .. last node",
        "params",
        "FLOPs",
        "time ms",
        "memory",
        "out shape",
        "out size",
    )
    rows = []
    for stage in plan.stages:
        last = stage.index == plan.num_stages - 1
        out_shape = plan.output_shape if last else plan.cut_shapes[stage.index]
        out_size = "-" if last else format_bytes(plan.cut_bytes[stage.index])
        rows.append(
            (
                str(stage.index),
                str(stage.num_nodes),
                f"{stage.first_node} .. {stage.last_node}",
                _count(stage.params),
                _count(stage.flops),
                f"{stage.time_s * 1e3:.2f}",
                format_bytes(stage.memory_bytes),
                _shape(out_shape),
                out_size,
            )
        )
    left = {2, 7}
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    costs: tuple[float, ...] = plan.stage_costs
    if plan.shared_stage is not None:
        costs = shared_loads(costs, plan.shared_stage, SHARED_LEAD)
    mean = sum(costs) / len(costs)
    unit = {"time": "s", "flops": "FLOPs", "params": "params", "memory": "bytes"}[plan.balance]
    over = "of the two workers' " if plan.shared_stage is not None else ""
    summary = (
        f"imbalance (max/mean {over}{plan.balance}): {plan.imbalance:.3f}  "
        f"[max {max(costs):.4g} {unit}, mean {mean:.4g} {unit}]"
    )
    cuts = "cut points: " + (", ".join(plan.cut_points) if plan.cut_points else "none (one stage)")
    if plan.shared_stage is not None:
        cuts += (
            f"; stage {plan.shared_stage} is shared chunk by chunk by the workers of stages "
            f"{plan.shared_stage - 1} and {plan.shared_stage + 1}"
        )
    return "\n".join([title, line(header), *(line(r) for r in rows), summary, cuts])
