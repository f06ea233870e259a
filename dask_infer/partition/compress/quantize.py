"""Static int8 quantization through PyTorch 2 export (PT2E) and the X86 inductor quantizer.

The PT2E flow lives in ``torchao`` (``torchao.quantization.pt2e``); older PyTorch
releases also ship it as ``torch.ao.quantization.quantize_pt2e``. The converted model
holds int8 weights and quantize/dequantize steps around each layer. Run eagerly it is
a reference graph (smaller, not faster); ``torch.compile`` fuses those steps into the
layers, which is where the speed comes from. CPU only.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from dask_infer.errors import reason
from dask_infer.partition.compress.frames import compile_module
from dask_infer.partition.compress.freeze import compile_frozen, freezes
from dask_infer.partition.compress.recipe import CompressionError, CompressionRecipe

__all__ = ["compile_int8", "int8_backend", "quantize_int8"]


def _load_backend() -> SimpleNamespace | None:
    for prefix, quantizer in (
        ("torchao.quantization.pt2e", "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"),
        ("torch.ao.quantization", "torch.ao.quantization.quantizer.x86_inductor_quantizer"),
    ):
        try:
            flow = importlib.import_module(f"{prefix}.quantize_pt2e")
            x86 = importlib.import_module(quantizer)
        except ImportError:
            continue
        to_eval: Callable[[nn.Module], Any] | None = None
        try:
            to_eval = importlib.import_module(prefix).move_exported_model_to_eval
        except (ImportError, AttributeError):
            to_eval = None
        return SimpleNamespace(
            name=prefix,
            prepare=flow.prepare_pt2e,
            convert=flow.convert_pt2e,
            quantizer=x86.X86InductorQuantizer,
            config=x86.get_default_x86_inductor_quantization_config,
            to_eval=to_eval,
        )
    return None


_BACKEND: list[SimpleNamespace | None] = []


def int8_backend() -> SimpleNamespace:
    """The PT2E quantization functions of this install.

    Raises
    ------
    CompressionError
        When neither ``torchao`` nor ``torch.ao.quantization.quantize_pt2e`` is available.
    """
    if not _BACKEND:
        _BACKEND.append(_load_backend())
    backend = _BACKEND[0]
    if backend is None:
        raise CompressionError(
            f"int8 needs PT2E quantization, which this torch {torch.__version__} does not ship; "
            "install torchao (pip install torchao) or drop int8 from the recipe"
        )
    return backend


def check_int8_device(device: torch.device) -> None:
    """Raise unless int8 can run on ``device`` (CPU only in this build)."""
    if device.type != "cpu":
        raise CompressionError(
            f"int8 runs on CPU only in this build, and the stage would run on {device.type!r}; "
            "use bf16 or fp16 on the GPU, or run int8 stages with --device cpu"
        )


def quantize_int8(module: nn.Module, calibration: torch.Tensor, *, batch_size: int = 32) -> nn.Module:
    """Quantize ``module`` to static int8 (weights per channel, activations per tensor).

    Parameters
    ----------
    module
        A CPU model in eval mode taking one float NCHW tensor; not modified.
    calibration
        Real inputs for the activation observers, a float batch shaped like the
        module's input (at least one image).
    batch_size
        Images per calibration forward pass.

    Returns
    -------
    torch.nn.Module
        The converted graph: fp32 in and out, int8 weights inside, any batch size.

    Raises
    ------
    CompressionError
        If PT2E is unavailable or the model cannot be exported.
    """
    backend = int8_backend()
    # Export records the example's strides in its guards: give it the contiguous layout inputs will have.
    calibration = calibration.contiguous()
    example = (
        calibration[:2] if len(calibration) >= 2 else calibration.repeat(2, *[1] * (calibration.ndim - 1))
    )
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=True).module()
    except Exception as exc:
        raise CompressionError(
            f"int8 needs the model exported with torch.export, and {type(module).__name__} cannot be "
            f"({reason(exc)}); use bf16 or fp16 for this stage"
        ) from exc
    quantizer = backend.quantizer()
    quantizer.set_global(backend.config())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        prepared = backend.prepare(exported, quantizer)
        with torch.no_grad():
            for i in range(0, len(calibration), batch_size):
                prepared(calibration[i : i + batch_size])
        converted = backend.convert(prepared)
    if backend.to_eval is not None:
        backend.to_eval(converted)
    _drop_unused(converted)
    return converted


def _drop_unused(graph_module: nn.Module) -> None:
    """Delete the fp32 weights that conversion left behind but the int8 graph never reads."""
    if not isinstance(graph_module, torch.fx.GraphModule):
        return
    graph_module.graph.eliminate_dead_code()
    used = {str(n.target) for n in graph_module.graph.nodes if n.op in ("get_attr", "call_module")}
    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(graph_module, f"named_{kind}")()):
            if name not in used:
                owner, _, attr = name.rpartition(".")
                delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()


def compile_int8(module: nn.Module) -> Callable[..., Any]:
    """``torch.compile`` a converted int8 model: inductor fuses its quantize/dequantize steps.

    Compiled with inductor freezing, which prepacks the int8 weights for oneDNN once, unless
    ``DASK_INFER_INDUCTOR_FREEZING=0``; a build that cannot freeze the graph compiles it
    without freezing (see :class:`~dask_infer.partition.compress.freeze.FrozenCompile`).
    """
    return compile_frozen(module) if freezes(CompressionRecipe(quantize="int8")) else compile_module(module)
