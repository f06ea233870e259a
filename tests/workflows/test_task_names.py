"""Task keys: the dashboard's group names tell every step and stage apart, one separator style."""

from __future__ import annotations

import re
from typing import Any

import pytest
from dask.base import tokenize
from dask.utils import key_split
from distributed.utils import key_split_group

from dask_infer.io.images import ImageSource
from dask_infer.io.outputs import OutputTarget
from dask_infer.workflows.graph import (
    Chunks,
    group_name,
    infer_prefix,
    stage_prefix,
    submit_chunks,
    submit_pipeline,
)
from dask_infer.workflows.placement import Placement

_SOURCE = ImageSource("in.zarr", "images", "NHWC", (10, 8, 8, 1), "uint8", 4)
_TARGET = OutputTarget("out.zarr", ("logits",), 4)
_KEY = re.compile(r"^[0-9A-Za-z_]+-[0-9a-f]+-[0-9]+$")
"""``{group}-{token}-{chunk}``: ``-`` only between the three parts."""


class _Recorder:
    """Stands in for a ``Client``: records the keys of each ``map`` and returns them as futures."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def map(self, func: Any, *iterables: Any, key: list[str], **kwargs: Any) -> list[str]:
        self.keys.extend(key)
        return list(key)


def _groups(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(key_split(k) for k in keys))


@pytest.mark.parametrize("label", ["resnet18", "resnet50", "efficientnet_b0", "vit_b_16", "my-net"])
def test_stage_groups_differ_in_their_first_twelve_characters(label: str) -> None:
    token = tokenize(label)
    groups = [key_split(f"{stage_prefix(label, k)}-{token}-3") for k in range(4)]
    groups += [key_split(f"{p}-{token}-3") for p in ("read", "write", infer_prefix(label))]
    groups += [key_split(f"{group_name(p, label)}-1a2b3c4d") for p in ("recut", "profile")]
    assert len({g[:12] for g in groups}) == len(groups), groups
    assert all("-" not in g for g in groups), groups
    assert [key_split_group(f"{stage_prefix(label, k)}-{token}-3") for k in range(2)] == groups[:2]


def test_group_names_read_as_the_dashboard_shows_them() -> None:
    token = tokenize("x")
    assert key_split(f"{stage_prefix('resnet18', 0)}-{token}-3") == "s0_resnet18"
    assert key_split(f"{stage_prefix('resnet18', 1)}-{token}-12") == "s1_resnet18"
    assert key_split(f"{infer_prefix('resnet18')}-{token}-0") == "infer_resnet18"
    assert key_split(f"{group_name('recut', 'resnet18')}-deadbeef") == "recut_resnet18"
    assert group_name("s0", "my-net.v2") == "s0_my_net_v2"


def test_data_parallel_keys_have_one_separator_style() -> None:
    client = _Recorder()
    writes = submit_chunks(
        client,  # type: ignore[arg-type]
        _SOURCE,
        _TARGET,
        "rt",
        Chunks(size=4, bounds=((0, 4), (4, 8), (8, 10))),
        label="resnet18",
    )
    assert all(_KEY.match(k) for k in client.keys), client.keys
    assert _groups(client.keys) == ["read", "infer_resnet18", "write"]
    assert [str(k).rsplit("-", 1)[-1] for k in writes] == ["0", "1", "2"]
    assert all(str(k).startswith("write-") for k in writes)


def test_pipeline_keys_name_each_stage() -> None:
    client = _Recorder()
    placement = Placement("pipeline", ((("w0",), ("w1",), ("w2",)),), "test")
    writes = submit_pipeline(
        client,  # type: ignore[arg-type]
        _SOURCE,
        _TARGET,
        "rt",
        Chunks(size=4, bounds=((0, 4), (4, 8), (8, 10))),
        placement,
        label="resnet50",
        indices=[1, 2],
    )
    assert all(_KEY.match(k) for k in client.keys), client.keys
    assert _groups(client.keys) == ["read", "s0_resnet50", "s1_resnet50", "s2_resnet50", "write"]
    assert [str(k).rsplit("-", 1)[-1] for k in writes] == ["1", "2"]
