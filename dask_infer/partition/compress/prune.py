"""Structured channel pruning that makes convolutions smaller, and unstructured magnitude pruning.

Structured pruning removes output channels of a convolution A whose output reaches
exactly one other convolution B, through nothing but per-channel layers (BatchNorm,
activations, pooling, dropout, depthwise convolutions). Removing a channel then only
shrinks A, the per-channel layers and B's input. Tensors that feed a residual add, a
concatenation or several layers are never pruned, so block outputs keep their width:
in a ResNet the inner convolutions of every BasicBlock and Bottleneck shrink, and the
skip connections stay valid. The pattern is found on a torch.fx trace, so it applies to
any traceable model (ResNet, VGG, MobileNet, and the stages cut from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import fx, nn
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

from dask_infer.errors import reason
from dask_infer.models.tracing import tracing
from dask_infer.partition.compress.recipe import CompressionError
from dask_infer.partition.split import trace_model

__all__ = ["PruneGroup", "check_structured", "find_prune_groups", "prune_structured", "prune_unstructured"]

_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, torch.sigmoid,
    F.max_pool2d, F.avg_pool2d, F.dropout,
}  # fmt: skip
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "contiguous"}


@dataclass(frozen=True)
class PruneGroup:
    """A convolution whose output channels can be removed, and what else shrinks with them.

    Attributes
    ----------
    producer
        Qualified name of the convolution whose output channels are removed.
    channelwise
        Names of the per-channel layers in between (BatchNorm, depthwise convolutions).
    consumer
        Name of the convolution whose input channels are removed.
    """

    producer: str
    channelwise: tuple[str, ...]
    consumer: str


def _feed(module: nn.Module, calibration: torch.Tensor, batch_size: int, handles: list) -> None:
    """Run ``calibration`` through ``module`` in batches so its hooks see it, then drop the hooks."""
    try:
        with torch.no_grad():
            for i in range(0, len(calibration), batch_size):
                module(calibration[i : i + batch_size])
    finally:
        for handle in handles:
            handle.remove()


def _is_plain_conv(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.groups == 1


def _is_depthwise(m: nn.Module) -> bool:
    return type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels


def _follow(node: fx.Node, modules: dict[str, nn.Module], channels: int) -> tuple[list[str], str] | None:
    """From a conv's output node, walk single-user per-channel steps to the next plain conv."""
    chain: list[str] = []
    current = node
    while True:
        users = list(current.users)
        if len(users) != 1:
            return None
        user = users[0]
        if (
            not user.args
            or user.args[0] is not current
            or current in user.args[1:]
            or current in user.kwargs.values()
        ):
            return None
        if user.op == "call_module":
            m = modules[str(user.target)]
            if _is_plain_conv(m):
                return (chain, str(user.target)) if m.in_channels == channels else None
            if (type(m) is nn.BatchNorm2d and m.num_features == channels) or (
                _is_depthwise(m) and m.in_channels == channels
            ):
                chain.append(str(user.target))
            elif not isinstance(m, _CHANNELWISE_MODULES):
                return None
        elif user.op == "call_function":
            if user.target not in _CHANNELWISE_FUNCTIONS:
                return None
        elif user.op != "call_method" or user.target not in _CHANNELWISE_METHODS:
            return None
        current = user


def _trace(module: nn.Module) -> fx.Graph:
    """Trace down to torch.nn layers, so convs inside torchvision blocks are visible."""
    try:
        wrapped: Any = (math, torchvision.ops)
        with tracing():
            return fx.Tracer(autowrap_modules=wrapped).trace(module)
    except Exception:
        # The partitioner's tracer keeps torchvision.ops blocks whole, and copes with more models.
        return trace_model(module).graph


def find_prune_groups(module: nn.Module) -> list[PruneGroup]:
    """Every convolution of ``module`` whose output channels can be removed safely.

    Raises
    ------
    CompressionError
        If the model cannot be traced with torch.fx.
    """
    try:
        graph = _trace(module)
    except Exception as exc:
        raise CompressionError(
            f"structured pruning needs a torch.fx-traceable model and {type(module).__name__} is not "
            f"({reason(exc)}); "
            "use prune-unstructured instead"
        ) from exc
    modules = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_plain_conv(modules[str(node.target)]):
            continue
        found = _follow(node, modules, modules[str(node.target)].out_channels)
        if found is None:
            continue
        chain, consumer = found
        # A module called at several places would have to shrink for all of them at once.
        if all(calls[name] == 1 for name in (str(node.target), *chain, consumer)):
            groups.append(PruneGroup(str(node.target), tuple(chain), consumer))
    return groups


def check_structured(module: nn.Module, label: str) -> list[PruneGroup]:
    """The prune groups of ``module``, or a clear error when it has none."""
    groups = find_prune_groups(module)
    if not groups:
        raise CompressionError(
            f"structured pruning found nothing to prune in {label} ({type(module).__name__}): it removes "
            "channels of convolutions that feed exactly one other convolution through BatchNorm, "
            "activations or pooling (ResNet, VGG, MobileNet blocks); use prune-unstructured, or "
            "leave this stage out of the pruning recipe"
        )
    return groups


def _input_statistics(
    module: nn.Module, consumers: list[str], calibration: torch.Tensor, batch_size: int = 64
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation of the input of each consumer conv."""
    sums: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name in consumers:

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            x = args[0].detach().double()
            stats = torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))])
            count = torch.tensor(float(x.shape[0] * x.shape[2] * x.shape[3]), dtype=torch.float64)
            entry = sums.setdefault(name, [torch.zeros_like(stats), torch.zeros((), dtype=torch.float64)])
            entry[0] += stats
            entry[1] += count

        handles.append(module.get_submodule(name).register_forward_pre_hook(hook))
    _feed(module, calibration, batch_size, handles)
    out = {}
    for name, (stats, count) in sums.items():
        mean = stats[0] / count
        var = (stats[1] / count - mean * mean).clamp_min(0)
        out[name] = (mean.float(), var.sqrt().float())
    return out


def _weight_importance(module: nn.Module, group: PruneGroup) -> torch.Tensor:
    """Without data: L1 norm of each filter, scaled by the BatchNorm that follows it."""
    conv = module.get_submodule(group.producer)
    assert isinstance(conv, nn.Conv2d)
    score = conv.weight.detach().abs().sum((1, 2, 3)).float()
    for name in group.channelwise:
        layer = module.get_submodule(name)
        if isinstance(layer, nn.BatchNorm2d) and layer.running_var is not None and layer.weight is not None:
            running_var: torch.Tensor = layer.running_var
            score = score * (layer.weight.detach().abs() / (running_var + layer.eps).sqrt()).float()
            break
    return score


def _new_batchnorm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(
        len(keep),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
    ).to(device=keep.device)
    state = {k: (v[keep] if v.ndim == 1 else v) for k, v in bn.state_dict().items()}
    new.load_state_dict(state)
    return new.to(dtype=next(iter(bn.state_dict().values())).dtype).train(bn.training)


def _reconstruct(
    module: nn.Module,
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]],
    calibration: torch.Tensor,
    *,
    batch_size: int = 16,
    max_rows: int = 4096,
    ridge: float = 1e-2,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """New weights and bias of each consumer conv, reading only its kept input channels.

    Least squares on the calibration data: the kept channels' weights (and the bias)
    move so the conv's output is as close as possible to the unpruned output, i.e. the
    kept channels take over what the removed ones carried. The correction is ridge
    regularised, so with few calibration images it stays close to the original weights.
    ``kept`` maps each consumer to its ``(kept, removed)`` input channel indices.
    """
    acc: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, (keep, drop) in kept.items():
        conv = module.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        taps = conv.kernel_size[0] * conv.kernel_size[1]
        offsets = torch.arange(taps, device=keep.device)
        keep_cols = (keep[:, None] * taps + offsets).flatten()
        drop_cols = (drop[:, None] * taps + offsets).flatten()
        w_drop = conv.weight.detach()[:, drop].reshape(conv.out_channels, -1).double()

        def hook(
            m: nn.Conv2d,
            args: tuple[torch.Tensor, ...],
            name: str = name,
            keep_cols: torch.Tensor = keep_cols,
            drop_cols: torch.Tensor = drop_cols,
            w_drop: torch.Tensor = w_drop,
        ) -> None:
            cols = F.unfold(args[0].detach(), m.kernel_size, m.dilation, m.padding, m.stride)  # type: ignore[arg-type]
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            # A fixed stride over positions keeps the pass deterministic and its memory bounded.
            rows = rows[:: max(1, -(-len(rows) // max_rows))].double()
            x_keep = torch.cat([rows[:, keep_cols], torch.ones_like(rows[:, :1])], 1)
            lost = rows[:, drop_cols] @ w_drop.T
            entry = acc.setdefault(name, [torch.zeros(0), torch.zeros(0)])
            gram, cross = x_keep.T @ x_keep, lost.T @ x_keep
            entry[0] = gram if entry[0].numel() == 0 else entry[0] + gram
            entry[1] = cross if entry[1].numel() == 0 else entry[1] + cross

        handles.append(conv.register_forward_pre_hook(hook))
    _feed(module, calibration, batch_size, handles)
    out = {}
    for name, (gram, cross) in acc.items():
        conv = module.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        keep = kept[name][0]
        size = gram.shape[0]
        penalty = torch.full((size,), ridge * float(gram.diagonal()[:-1].mean()), dtype=gram.dtype)
        penalty[-1] = 0.0  # the bias is free: it absorbs the removed channels' mean
        delta = torch.linalg.solve(gram + torch.diag(penalty).to(gram.device), cross.T).T
        weight = conv.weight.detach()[:, keep]
        bias = (
            conv.bias.detach()
            if conv.bias is not None
            else torch.zeros(conv.out_channels, device=weight.device)
        )
        new_weight = weight + delta[:, :-1].reshape(weight.shape).to(weight.dtype)
        out[name] = (new_weight, bias + delta[:, -1].to(bias.dtype))
    return out


def _rebuild_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    out_channels = weight.shape[0]
    depthwise = conv.groups > 1
    new = nn.Conv2d(
        out_channels if depthwise else weight.shape[1],
        out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=out_channels if depthwise else 1,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight.data.copy_(weight)
    if new.bias is not None and bias is not None:
        new.bias.data.copy_(bias)
    return new.train(conv.training)


def prune_structured(
    module: nn.Module, amount: float, *, calibration: torch.Tensor | None = None
) -> nn.Module:
    """Remove ``amount`` of the output channels of every prunable convolution, in place.

    With ``calibration`` data, channels are ranked by how much the next convolution's
    input varies along them (standard deviation times the norm of the weights reading
    them), and the next convolution's remaining weights and bias are refitted by least
    squares to reproduce its unpruned output on that data. Without calibration data
    channels are ranked by filter L1 norm times BatchNorm scale, and nothing is refitted.
    No fine-tuning is done: report the accuracy change.

    Parameters
    ----------
    module
        A torch.fx-traceable model in eval mode; modified in place and returned.
    amount
        Fraction of channels removed from each prunable convolution, in (0, 1).
    calibration
        Float batch shaped like the model's input, or ``None``.

    Raises
    ------
    CompressionError
        If the model cannot be traced or has no prunable convolution.
    """
    groups = check_structured(module, type(module).__name__)
    stats = (
        _input_statistics(module, [g.consumer for g in groups], calibration)
        if calibration is not None
        else {}
    )
    keep_out: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in groups:
        consumer = module.get_submodule(group.consumer)
        assert isinstance(consumer, nn.Conv2d)
        channels = consumer.in_channels
        n_keep = max(1, channels - round(amount * channels))
        if group.consumer in stats:
            reads = consumer.weight.detach().float().pow(2).sum((0, 2, 3)).sqrt()
            score = stats[group.consumer][1] * reads
        else:
            score = _weight_importance(module, group)
        order = torch.argsort(score, descending=True, stable=True)
        keep = order[:n_keep].sort().values
        kept[group.consumer] = (keep, order[n_keep:].sort().values)
        for name in (group.producer, *group.channelwise):
            keep_out[name] = keep
    refitted = _reconstruct(module, kept, calibration) if calibration is not None else {}
    for name in sorted(set(keep_out) | set(kept)):
        old = module.get_submodule(name)
        new: nn.Module
        if isinstance(old, nn.BatchNorm2d):
            new = _new_batchnorm(old, keep_out[name])
        else:
            assert isinstance(old, nn.Conv2d)
            bias: torch.Tensor | None
            if name in refitted:
                weight, bias = refitted[name]
            else:
                weight = old.weight.detach()
                weight = weight[:, kept[name][0]] if name in kept else weight
                bias = old.bias.detach() if old.bias is not None else None
            if name in keep_out:
                weight = weight[keep_out[name]]
                bias = bias[keep_out[name]] if bias is not None else None
            new = _rebuild_conv(old, weight, bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
    return module


def prune_unstructured(module: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` smallest-magnitude weights of each conv and linear layer, in place.

    This saves space only once the weights are compressed (or stored sparse): the
    layers keep their shapes, so FLOPs and speed do not change.

    Raises
    ------
    CompressionError
        If the model has no conv or linear layer.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)]
    if not layers:
        raise CompressionError(
            f"unstructured pruning found no conv or linear layer in {type(module).__name__}; "
            "leave this stage out of the pruning recipe"
        )
    for layer in layers:
        torch_prune.l1_unstructured(layer, "weight", amount=amount)
        torch_prune.remove(layer, "weight")
    return module
