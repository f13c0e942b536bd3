"""Exact BatchNorm folding into the preceding Conv/ConvTranspose/Linear.

``y = gamma * (conv(x, w) + b - mean) / sqrt(var + eps) + beta`` equals ``conv(x, w * k) +
(b - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)`` per output channel. When the weight
is fake-quantized per output channel with scale ``s``, folding multiplies the scale by ``|k|``:
``round(w * k / (s * |k|)) = sign(k) * round(w / s)`` and the clamp range is symmetric
(narrow range), so the folded model quantizes to exactly the same values, negative gammas
included. Used by the fuse pass (``bn: fold``) and by exporters (``bn: train``).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qatgraph.quant.qmodules import CONV_TRANSPOSE_TYPES, op_kind
from qatgraph.quant.quantizer import FakeQuantizer

from .queries import BATCHNORM_TYPES, node_module

log = logging.getLogger(__name__)


def bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel multiplier ``k`` and offset so that ``bn(z) = z * k + offset``."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    return factor, beta - bn.running_mean.double() * factor


def can_fold(bn: nn.Module) -> str | None:
    """None if ``bn`` can be folded, else why not."""
    if not isinstance(bn, BATCHNORM_TYPES):
        return f"{type(bn).__name__} is not a BatchNorm"
    if not bn.track_running_stats or bn.running_var is None:
        return "BatchNorm has track_running_stats=False (it always normalizes with batch statistics)"
    return None


def _exportable_quantizer(layer: nn.Module) -> FakeQuantizer | None:
    quantizer = getattr(layer, "weight_quantizer", None)
    if isinstance(quantizer, FakeQuantizer) and quantizer.is_enabled and quantizer.is_calibrated:
        return quantizer
    return None


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, snap_to_codes: bool = False) -> None:
    """Fold ``bn`` into ``layer`` in place (weight, bias, and per-channel weight scale if any).

    ``snap_to_codes`` (for export) folds the *fake-quantized* weight, so that the folded weight
    divided by the folded scale is exactly ``sign(k) * code``: folding float weights instead
    would, once in a million weights, move a value that sits within float32 rounding of a
    half-step to the other code.
    """
    factor, offset = bn_factor(bn)
    weight = layer.weight
    quantizer = _exportable_quantizer(layer)
    source = weight
    if snap_to_codes and quantizer is not None:
        was_training = quantizer.training
        source = quantizer.eval()(weight.detach())
        quantizer.train(was_training)
    if isinstance(layer, CONV_TRANSPOSE_TYPES):
        groups = layer.groups
        # weight is [in, out/groups, *kernel]; output channel g*(out/groups)+j lives in group g, column j
        grouped = source.double().reshape((groups, weight.shape[0] // groups) + tuple(weight.shape[1:]))
        new_weight = (grouped * factor.reshape(groups, 1, -1, *([1] * (weight.dim() - 2)))).reshape(weight.shape)
    else:
        new_weight = source.double() * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    new_bias = bias * factor + offset
    weight.copy_(new_weight.to(weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        layer.bias.copy_(new_bias.to(layer.bias.dtype))
    if quantizer is not None:
        _fold_weight_scale(quantizer, factor, layer)


def _fold_weight_scale(quantizer: FakeQuantizer, factor: torch.Tensor, layer: nn.Module) -> None:
    magnitude = factor.abs().clamp_min(1e-30)
    if quantizer.axis is not None and quantizer.scale.numel() == magnitude.numel():
        quantizer.scale.data.copy_((quantizer.scale.double() * magnitude).to(quantizer.scale.dtype))
        return
    # Per-tensor scales (or grouped ConvTranspose, whose weight axis 1 holds out/groups channels)
    # cannot absorb a per-output-channel factor exactly: recalibrate from the folded weight.
    log.warning("qatgraph: folding BN into %s is not exact with this weight granularity; "
                "use per-channel weight quantization (groups=1 for ConvTranspose) for exact folding", quantizer.name)
    quantizer.calibrate_from(layer.weight.detach())


def foldable_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """(weighted-op node, BN node) pairs where the BN is the only user of the op's output."""
    pairs = []
    for node in gm.graph.nodes:
        bn = node_module(gm, node)
        if bn is None or not isinstance(bn, BATCHNORM_TYPES) or can_fold(bn) is not None:
            continue
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or len(producer.users) != 1:
            continue
        layer = node_module(gm, producer)
        if layer is None or op_kind(layer) is None:
            continue
        if op_kind(layer) == "linear" and not _is_2d(producer):
            continue  # BatchNorm1d normalizes dim 1; only a 2-D Linear output has features there
        if layer.weight.shape[1 if isinstance(layer, CONV_TRANSPOSE_TYPES) else 0] * \
                (layer.groups if isinstance(layer, CONV_TRANSPOSE_TYPES) else 1) != bn.num_features:
            continue
        pairs.append((producer, node))
    return pairs


def _is_2d(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) == 2


def fold_graph_batchnorm(gm: fx.GraphModule, snap_to_codes: bool = False) -> list[str]:
    """Fold every foldable BN of ``gm`` into its producer and remove it; returns the folded BN names.

    Exporters pass ``snap_to_codes=True`` (see :func:`fold_bn_into`)."""
    folded = []
    for producer, bn_node in foldable_pairs(gm):
        fold_bn_into(node_module(gm, producer), node_module(gm, bn_node), snap_to_codes)
        bn_node.replace_all_uses_with(producer)
        gm.graph.erase_node(bn_node)
        folded.append(str(bn_node.target))
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


# ---------------------------------------------------------------------------- eager regions
_METADATA = {"dim", "size", "numel", "ndimension", "__get__", "is_floating_point", "is_contiguous", "get_device",
             "data_ptr", "element_size", "nelement", "stride", "is_complex", "__len__"}


class _UseCounter(torch.overrides.TorchFunctionMode):
    """Counts the ops that read each watched tensor (shape queries and the BN's own forward excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (producer, tensor kept alive)
        self.uses: dict[int, int] = {}
        self.inside_bn = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if not self.inside_bn and getattr(func, "__name__", "") not in _METADATA:
            for leaf in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.watched:
                    self.uses[id(leaf)] = self.uses.get(id(leaf), 0) + 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def eager_foldable_pairs(model: nn.Module, args: tuple, kwargs: dict | None = None) -> list[tuple[str, str]]:
    """(weighted layer, BN) names where, running ``model(*args)`` in eval mode, the BN's input is
    the output of the layer and nothing else reads that output, each called once: the BN can be
    folded into the layer although no graph shows the pair (a module torch.fx did not trace)."""
    names = {id(m): name for name, m in model.named_modules()}
    layers = [(n, m) for n, m in model.named_modules() if op_kind(m) is not None and hasattr(m, "weight")]
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES) and can_fold(m) is None]
    if not layers or not bns:
        return []
    counter = _UseCounter()
    calls: dict[str, int] = {}
    bn_inputs: dict[str, str | None] = {}
    dims: dict[str, int] = {}

    def after_layer(module: nn.Module, _inputs: tuple, output: Any) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            counter.watched[id(output)] = (name, output)
            dims[name] = output.dim()

    def before_bn(module: nn.Module, inputs: tuple) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        source = counter.watched.get(id(inputs[0])) if inputs and isinstance(inputs[0], torch.Tensor) else None
        bn_inputs[name] = source[0] if source is not None and source[1] is inputs[0] else None
        counter.inside_bn += 1

    def after_bn(*_: Any) -> None:
        counter.inside_bn -= 1

    hooks = [m.register_forward_hook(after_layer) for _, m in layers]
    hooks += [m.register_forward_pre_hook(before_bn) for _, m in bns] + [m.register_forward_hook(after_bn) for _, m in bns]
    was_training = model.training
    model.eval()
    try:
        with counter:
            model(*args, **(kwargs or {}))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    outputs = {name: key for key, (name, _) in counter.watched.items()}
    pairs = []
    for bn_name, layer_name in bn_inputs.items():
        if layer_name is None or calls.get(bn_name) != 1 or calls.get(layer_name) != 1:
            continue
        if counter.uses.get(outputs[layer_name], 0) != 0:  # read outside the BN: folding would change it
            continue
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        channels = layer.weight.shape[1] * layer.groups if isinstance(layer, CONV_TRANSPOSE_TYPES) else layer.weight.shape[0]
        if channels == bn.num_features and (op_kind(layer) != "linear" or dims.get(layer_name) == 2):
            pairs.append((layer_name, bn_name))
    return pairs


def fold_eager_batchnorm(model: nn.Module, args: tuple, kwargs: dict | None = None,
                         snap_to_codes: bool = False) -> list[str]:
    """Fold the :func:`eager_foldable_pairs` of ``model`` and replace each BN by ``nn.Identity``;
    returns the folded BN names."""
    folded = []
    for layer_name, bn_name in eager_foldable_pairs(model, args, kwargs):
        fold_bn_into(model.get_submodule(layer_name), model.get_submodule(bn_name), snap_to_codes)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, nn.Identity())
        folded.append(bn_name)
    return folded
