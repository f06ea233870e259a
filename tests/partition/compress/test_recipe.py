"""Compression recipes and plans as data: the short form, dicts, YAML, and errors naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_infer.partition.compress import CompressionError, CompressionPlan, CompressionRecipe

# --- recipes as data -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bf16", CompressionRecipe(precision="bf16")),
        ("int8", CompressionRecipe(quantize="int8")),
        ("bf16+channels_last", CompressionRecipe(precision="bf16", channels_last=True)),
        ("prune=0.3", CompressionRecipe(prune="structured", prune_amount=0.3)),
        ("prune-unstructured=0.5", CompressionRecipe(prune="unstructured", prune_amount=0.5)),
        ("compile", CompressionRecipe(compile=True)),
        (
            "bf16+channels_last+cudagraphs",
            CompressionRecipe(precision="bf16", channels_last=True, compile=True, cuda_graphs=True),
        ),
        ("compile+cudagraphs", CompressionRecipe(compile=True, cuda_graphs=True)),
        (
            "int8+prune=0.25+compile",
            CompressionRecipe(quantize="int8", prune="structured", prune_amount=0.25, compile=True),
        ),
        ("none", CompressionRecipe()),
    ],
)
def test_recipe_short_form(text: str, expected: CompressionRecipe) -> None:
    recipe = CompressionRecipe.parse(text)
    assert recipe == expected
    assert CompressionRecipe.parse(recipe.to_string()) == recipe
    assert CompressionRecipe.from_dict(recipe.to_dict()) == recipe


def test_plan_per_stage_and_round_trips(tmp_path: Path) -> None:
    plan = CompressionPlan.parse("0-2:int8,3-4:bf16")
    assert [plan.recipe_for(i).to_string() for i in range(6)] == ["int8"] * 3 + ["bf16"] * 2 + ["fp32"]
    assert CompressionPlan.parse(plan.to_string()) == plan
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    assert CompressionPlan.from_yaml(path) == plan
    assert CompressionPlan.coerce(str(path)) == plan
    with pytest.raises(CompressionError, match="does not exist"):
        CompressionPlan.coerce(str(tmp_path / "missing.yaml"))
    short = CompressionPlan.from_yaml("default: bf16\nstages:\n  0-1: int8\n  '3': {precision: fp16}\n")
    assert short == CompressionPlan.parse("bf16,0-1:int8,3:fp16")
    uniform = CompressionPlan.parse("bf16")
    assert all(uniform.recipe_for(i).precision == "bf16" for i in range(4))
    plan.validate(5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("fp8", "unknown recipe term 'fp8'"),
        ("prune=0", r"outside \(0, 1\)"),
        ("prune=1", r"outside \(0, 1\)"),
        ("prune-unstructured=1.5", r"outside \(0, 1\)"),
        ("prune=-0.1", r"outside \(0, 1\)"),
        ("prune=abc", "not a number"),
        ("int8+bf16", "int8 cannot be combined with bf16"),
        ("bf16+fp16", "sets precision twice"),
        ("0-1:int8,1:bf16", r"stage\(s\) \[1\] are given more than one recipe"),
        ("2-0:int8", "backwards"),
        ("", "empty"),
    ],
)
def test_bad_recipe_text(text: str, match: str) -> None:
    with pytest.raises(CompressionError, match=match):
        CompressionPlan.parse(text)


def test_bad_recipe_fields() -> None:
    with pytest.raises(CompressionError, match="unknown precision 'fp64'"):
        CompressionRecipe(precision="fp64")
    with pytest.raises(CompressionError, match="unknown recipe keys"):
        CompressionRecipe.from_dict({"precission": "bf16"})
    with pytest.raises(CompressionError, match="without a pruning method"):
        CompressionRecipe(prune_amount=0.3)


def test_missing_stage_is_named() -> None:
    with pytest.raises(CompressionError, match=r"names stage\(s\) \[3, 4\] but the model has 3 stage"):
        CompressionPlan.parse("0-2:int8,3-4:bf16").validate(3)


def test_cuda_graphs_need_compile() -> None:
    with pytest.raises(CompressionError, match="cuda_graphs=True needs compile=True.*'cudagraphs' sets both"):
        CompressionRecipe(cuda_graphs=True)
