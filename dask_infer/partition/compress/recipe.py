"""Compression recipes as data: one per stage, or one for all stages.

A recipe is a frozen dataclass that round-trips through dict, YAML and a short text
form. The text grammar (what ``--compress`` takes) is::

    PLAN    := ENTRY ("," ENTRY)*
    ENTRY   := [STAGES ":"] RECIPE       no STAGES: the recipe of every stage not named
    STAGES  := INT | INT "-" INT         stage indices from 0, ranges inclusive
    RECIPE  := TERM ("+" TERM)*
    TERM    := "fp32" | "fp16" | "bf16"  precision of weights and activations
             | "int8"                    int8 weights and activations (PT2E, CPU, calibrated)
             | "channels_last"           NHWC memory format
             | "compile"                 torch.compile the stage
             | "cudagraphs"              compile, and replay the stage as CUDA graphs (GPU)
             | "prune=" AMOUNT           structured channel pruning (fewer FLOPs)
             | "prune-unstructured=" AMOUNT   zeroed weights: smaller compressed, not faster
             | "none"                    no compression (same as fp32)

``AMOUNT`` is the fraction of channels (or weights) removed, strictly between 0 and 1.
Examples: ``"bf16"``, ``"int8+compile"``, ``"bf16+channels_last+cudagraphs"``,
``"0-2:int8,3-4:bf16"``, ``"prune=0.3,4:fp32"``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dask_infer.errors import ModelError

__all__ = [
    "PRECISIONS",
    "PRUNE_METHODS",
    "QUANTIZE_METHODS",
    "CompressionError",
    "CompressionPlan",
    "CompressionRecipe",
]

PRECISIONS = ("fp32", "fp16", "bf16")
QUANTIZE_METHODS = ("int8",)
PRUNE_METHODS = ("structured", "unstructured")
_GRAMMAR_HINT = (
    "write terms joined by '+' from: fp32, fp16, bf16, int8, channels_last, compile, cudagraphs, "
    "prune=0.3, prune-unstructured=0.5, none; per stage as '0-2:int8,3:bf16'"
)
_PRUNE_TERMS = {"prune": "structured", "prune-structured": "structured", "prune-unstructured": "unstructured"}
_STAGES = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class CompressionError(ModelError):
    """A compression recipe or plan is malformed, or cannot be applied as asked."""


@dataclass(frozen=True)
class CompressionRecipe:
    """How to compress one stage (or a whole model).

    Parameters
    ----------
    precision
        ``"fp32"``, ``"fp16"`` or ``"bf16"``: dtype of the weights and activations.
    channels_last
        Use NHWC memory format (often faster convolutions on CPU and tensor cores).
    compile
        Wrap the stage in ``torch.compile``; compiles on first use, in every process.
    cuda_graphs
        Compile with ``mode="reduce-overhead"``: on a GPU each batch replays as recorded
        CUDA graphs, one launch instead of one per kernel, so the GPU stays busy even when
        the worker's reading threads hold the Python interpreter. Needs ``compile``; on a
        CPU it compiles as ``compile`` does.
    quantize
        ``None`` or ``"int8"``: static int8 quantization of weights and activations
        through PyTorch 2 export (X86 inductor quantizer), calibrated on real inputs.
        CPU only. Pair with ``compile`` for speed: uncompiled, int8 runs as a
        reference graph that is smaller but slower than fp32.
    prune
        ``None``; ``"structured"``: remove whole output channels of convolutions whose
        output feeds a single other convolution (physically smaller, fewer FLOPs);
        ``"unstructured"``: zero the smallest-magnitude weights of every conv and
        linear layer (same FLOPs and speed; smaller only once compressed).
    prune_amount
        Fraction removed, strictly between 0 and 1; must be 0 without ``prune``.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    quantize: str | None = None
    prune: str | None = None
    prune_amount: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CompressionError(
                f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        for name in ("channels_last", "compile", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise CompressionError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.cuda_graphs and not self.compile:
            raise CompressionError(
                "cuda_graphs=True needs compile=True: CUDA graphs are recorded by torch.compile; "
                "set compile too (the short form 'cudagraphs' sets both)"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise CompressionError(
                f"unknown quantization {self.quantize!r}; choose {', '.join(QUANTIZE_METHODS)} or none"
            )
        if self.prune is not None and self.prune not in PRUNE_METHODS:
            raise CompressionError(
                f"unknown pruning {self.prune!r}; choose one of {', '.join(PRUNE_METHODS)} or none"
            )
        amount = self.prune_amount
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise CompressionError(f"prune_amount={amount!r} must be a number strictly between 0 and 1")
        object.__setattr__(self, "prune_amount", float(amount))
        if self.prune is not None and not 0.0 < amount < 1.0:
            raise CompressionError(
                f"pruning amount {amount!r} is outside (0, 1); give the fraction to remove, e.g. prune=0.3"
            )
        if self.prune is None and amount != 0.0:
            raise CompressionError(
                f"prune_amount={amount!r} given without a pruning method; set prune to "
                "'structured' or 'unstructured', or drop prune_amount"
            )
        if self.quantize == "int8" and self.precision != "fp32":
            raise CompressionError(
                f"int8 cannot be combined with {self.precision}: int8 keeps fp32 for the few "
                "layers it does not quantize; choose one of int8 or " + self.precision
            )
        if self.quantize == "int8" and self.channels_last:
            raise CompressionError(
                "int8 cannot be combined with channels_last: the int8 kernels choose their own "
                "layout; drop channels_last"
            )

    @property
    def is_identity(self) -> bool:
        """Whether this recipe leaves the module as it is."""
        return self == CompressionRecipe()

    @property
    def needs_calibration(self) -> bool:
        """Whether applying the recipe needs real input data (int8 does)."""
        return self.quantize is not None

    @property
    def uses_calibration(self) -> bool:
        """Whether real input data changes the result: int8 needs it, structured pruning ranks
        channels and refits on it when given."""
        return self.needs_calibration or self.prune == "structured"

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON- and YAML-safe dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionRecipe:
        """Build from a dict; unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise CompressionError(f"a recipe must be a mapping or a string like 'bf16', not {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CompressionError(f"unknown recipe keys {unknown}; known keys: {', '.join(sorted(names))}")
        return cls(**dict(data))

    @classmethod
    def parse(cls, text: str) -> CompressionRecipe:
        """Read the short form, e.g. ``"bf16+channels_last"`` or ``"prune=0.3"``."""
        if not isinstance(text, str) or not text.strip():
            raise CompressionError(f"empty compression recipe {text!r}; {_GRAMMAR_HINT}")
        fields: dict[str, Any] = {}

        def put(key: str, value: Any, term: str) -> None:
            if key in fields and fields[key] != value:
                raise CompressionError(f"recipe {text!r} sets {key} twice ({term!r}); keep one")
            fields[key] = value

        for raw in text.split("+"):
            term = raw.strip().lower()
            if term in PRECISIONS:
                put("precision", term, term)
            elif term in QUANTIZE_METHODS:
                put("quantize", term, term)
            elif term in ("channels_last", "channels-last"):
                put("channels_last", True, term)
            elif term == "compile":
                put("compile", True, term)
            elif term in ("cudagraphs", "cuda_graphs", "cuda-graphs"):
                put("compile", True, term)
                put("cuda_graphs", True, term)
            elif term == "none":
                continue
            elif term == "auto" or term.startswith("auto="):
                raise CompressionError(
                    f"{text!r}: auto is chosen by `dask-infer run` on its workers, not a recipe here; "
                    "give a recipe such as bf16+channels_last+compile"
                )
            elif "=" in term:
                key, _, value = term.partition("=")
                method = _PRUNE_TERMS.get(key.strip())
                if method is None:
                    raise CompressionError(
                        f"unknown recipe term {raw.strip()!r} in {text!r}; {_GRAMMAR_HINT}"
                    )
                try:
                    amount = float(value)
                except ValueError:
                    raise CompressionError(
                        f"pruning amount {value.strip()!r} in {text!r} is not a number; e.g. prune=0.3"
                    ) from None
                put("prune", method, term)
                put("prune_amount", amount, term)
            elif term in ("prune", "prune-structured", "prune-unstructured"):
                raise CompressionError(f"{term!r} in {text!r} needs an amount, e.g. {term}=0.3")
            else:
                raise CompressionError(f"unknown recipe term {raw.strip()!r} in {text!r}; {_GRAMMAR_HINT}")
        return cls(**fields)

    def to_string(self) -> str:
        """The short form that :meth:`parse` reads back."""
        terms = [self.quantize or self.precision]
        if self.channels_last:
            terms.append("channels_last")
        if self.prune == "structured":
            terms.append(f"prune={self.prune_amount:g}")
        elif self.prune == "unstructured":
            terms.append(f"prune-unstructured={self.prune_amount:g}")
        if self.cuda_graphs:
            terms.append("cudagraphs")
        elif self.compile:
            terms.append("compile")
        return "+".join(terms)

    def __str__(self) -> str:
        return self.to_string()


def _coerce_recipe(value: Any) -> CompressionRecipe:
    if isinstance(value, CompressionRecipe):
        return value
    if isinstance(value, str):
        return CompressionRecipe.parse(value)
    if value is None:
        return CompressionRecipe()
    return CompressionRecipe.from_dict(value)


def _stage_range(text: str, plan_text: str) -> range:
    match = _STAGES.match(text)
    if match is None:
        raise CompressionError(
            f"bad stage selection {text.strip()!r} in {plan_text!r}; "
            "use a stage index like '3' or a range like '0-2'"
        )
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise CompressionError(
            f"stage range {text.strip()!r} in {plan_text!r} is backwards; write {last}-{first}"
        )
    return range(first, last + 1)


@dataclass(frozen=True)
class CompressionPlan:
    """A recipe per stage, and one for every stage not named.

    Parameters
    ----------
    default
        Recipe of the stages not in ``stages`` (the identity recipe by default).
    stages
        ``(index, recipe)`` pairs, sorted by index, each index at most once.
    """

    default: CompressionRecipe = CompressionRecipe()
    stages: tuple[tuple[int, CompressionRecipe], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.default, CompressionRecipe):
            raise CompressionError(f"default={self.default!r} must be a CompressionRecipe")
        items = []
        for pair in self.stages:
            index, recipe = pair
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise CompressionError(f"stage index {index!r} must be a whole number >= 0")
            items.append((index, _coerce_recipe(recipe)))
        indices = [i for i, _ in items]
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise CompressionError(f"stage(s) {repeated} are given more than one recipe; give each stage one")
        object.__setattr__(self, "stages", tuple(sorted(items)))

    @classmethod
    def uniform(cls, recipe: CompressionRecipe | str) -> CompressionPlan:
        """One recipe for all stages."""
        return cls(default=_coerce_recipe(recipe))

    @classmethod
    def parse(cls, text: str) -> CompressionPlan:
        """Read the ``--compress`` form, e.g. ``"bf16"`` or ``"0-2:int8,3-4:bf16"``."""
        if not isinstance(text, str) or not text.strip():
            raise CompressionError(f"empty compression plan {text!r}; {_GRAMMAR_HINT}")
        default: CompressionRecipe | None = None
        stages: list[tuple[int, CompressionRecipe]] = []
        for entry in text.split(","):
            if ":" in entry:
                selection, _, recipe_text = entry.partition(":")
                recipe = CompressionRecipe.parse(recipe_text)
                stages.extend((i, recipe) for i in _stage_range(selection, text))
            else:
                if default is not None:
                    raise CompressionError(
                        f"plan {text!r} has two recipes without stages; give at most one default recipe"
                    )
                default = CompressionRecipe.parse(entry)
        return cls(default=default or CompressionRecipe(), stages=tuple(stages))

    @classmethod
    def coerce(
        cls, value: CompressionPlan | CompressionRecipe | Mapping[str, Any] | str | None
    ) -> CompressionPlan:
        """A plan from a plan, a recipe, a dict (see :meth:`from_dict`), ``None``, or a string.

        A string ending in ``.yaml`` or ``.yml`` names a plan file; any other string is
        the ``--compress`` short form.
        """
        if isinstance(value, CompressionPlan):
            return value
        if isinstance(value, CompressionRecipe):
            return cls.uniform(value)
        if value is None:
            return cls()
        if isinstance(value, str) and value.strip().endswith((".yaml", ".yml")):
            return cls.from_yaml(Path(value.strip()))
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise CompressionError(f"cannot read a compression plan from {value!r}; give a string like 'bf16'")

    def recipe_for(self, index: int) -> CompressionRecipe:
        """The recipe of stage ``index``."""
        return dict(self.stages).get(index, self.default)

    def validate(self, n_stages: int) -> None:
        """Raise if the plan names a stage the model does not have.

        Raises
        ------
        CompressionError
            Naming the missing stages and the valid range.
        """
        missing = [i for i, _ in self.stages if i >= n_stages]
        if missing:
            raise CompressionError(
                f"the compression plan names stage(s) {missing} but the model has {n_stages} "
                f"stage(s), numbered 0..{n_stages - 1}; fix the stage numbers or raise --stages"
            )

    @property
    def is_identity(self) -> bool:
        """Whether no stage is compressed."""
        return self.default.is_identity and all(r.is_identity for _, r in self.stages)

    @property
    def needs_calibration(self) -> bool:
        """Whether some stage's recipe needs calibration data."""
        return self.default.needs_calibration or any(r.needs_calibration for _, r in self.stages)

    @property
    def uses_calibration(self) -> bool:
        """Whether some stage's recipe uses calibration data (int8, structured pruning)."""
        return self.default.uses_calibration or any(r.uses_calibration for _, r in self.stages)

    def to_string(self) -> str:
        """The short form that :meth:`parse` reads back."""
        parts = [] if self.default.is_identity and self.stages else [self.default.to_string()]
        parts += [f"{i}:{r.to_string()}" for i, r in self.stages]
        return ",".join(parts)

    def __str__(self) -> str:
        return self.to_string()

    def to_dict(self) -> dict[str, Any]:
        """``{"default": recipe dict, "stages": {"0": recipe dict, ...}}`` (JSON- and YAML-safe)."""
        return {"default": self.default.to_dict(), "stages": {str(i): r.to_dict() for i, r in self.stages}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        """Build from :meth:`to_dict` output; recipes may also be short strings and keys ranges.

        ``{"default": "bf16", "stages": {"0-2": "int8", "3": {"precision": "fp16"}}}``
        """
        unknown = sorted(set(data) - {"default", "stages"})
        if unknown:
            raise CompressionError(f"unknown compression plan keys {unknown}; known keys: default, stages")
        raw_stages = data.get("stages") or {}
        if not isinstance(raw_stages, Mapping):
            raise CompressionError(f"plan 'stages' must map stage numbers to recipes, not {raw_stages!r}")
        stages = [
            (i, _coerce_recipe(recipe))
            for key, recipe in raw_stages.items()
            for i in _stage_range(str(key), str(dict(raw_stages)))
        ]
        return cls(default=_coerce_recipe(data.get("default")), stages=tuple(stages))

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, source: str | Path) -> CompressionPlan:
        """Read a plan from a YAML file, or from YAML text when ``source`` is not a file."""
        path = Path(source) if isinstance(source, Path) or "\n" not in str(source) else None
        if path is not None and path.is_file():
            text = path.read_text()
        elif isinstance(source, Path) or (path is not None and path.suffix in (".yaml", ".yml")):
            raise CompressionError(f"compression plan file {str(source)!r} does not exist")
        else:
            text = str(source)
        data = yaml.safe_load(text)
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, Mapping):
            raise CompressionError(
                f"compression plan YAML must hold a mapping with default/stages, not {data!r}"
            )
        return cls.from_dict(data)
