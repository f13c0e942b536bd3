"""Pass 2 — annotate weighted ops and their inputs (TensorRT rule 1, 2, 5, 6).

Expects: a traced (and fused) GraphModule; shape metadata (``node.meta["tensor_meta"]``) when
example inputs were given.
Guarantees:
* every Conv/ConvTranspose/Linear/matmul/bmm node of a kind in ``policy.quantize`` carries an
  :class:`OpAnnotation`: quantized with its resolved weight/activation specs, or not, with the
  reason (tiny layer: channels or GEMM N/K below ``policy.min_channels``);
* each activation input of a quantized op is requested as a quantized edge on its producer
  (outputs of weighted ops are never annotated for their own sake: rule 2);
* Concat: when a Concat's output is quantized, its quantized inputs join the output's scale
  group (rule 5: Concat inputs and output share one scale).
Override skips and skip lists are applied by the skip pass, not here.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from qatgraph.graph.annotations import (
    OP_KEY,
    TENSOR_KEY,
    OpAnnotation,
    quantize_edge,
    tensor_annotation,
)
from qatgraph.graph.queries import (
    activation_args,
    cat_inputs,
    is_cat,
    layer_name,
    node_module,
    weighted_kind,
)
from qatgraph.policy import Policy


class _FunctionalOp(nn.Module):
    """Stands in for the module type of functional ops (matmul) in policy type rules."""


class MatMul(_FunctionalOp):
    pass


def run(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    for node in gm.graph.nodes:
        kind = weighted_kind(gm, node)
        if kind is None or kind not in policy.quantize or (node.op != "call_module" and kind != "matmul"):
            continue
        module = node_module(gm, node)
        layer = layer_name(gm, node)
        resolved = policy.resolve(layer, type(module) if module is not None else MatMul)
        args = activation_args(kind, node)
        tiny = tiny_reason(kind, module, node, policy.min_channels)
        if tiny:
            node.meta[OP_KEY] = OpAnnotation(kind, layer, False, tiny)
            continue
        reason = "quantized by policy" + (f" (overrides: {', '.join(resolved.applied_rules)})"
                                          if resolved.applied_rules else "")
        node.meta[OP_KEY] = OpAnnotation(kind, layer, True, reason, resolved.weight if module is not None else None,
                                         resolved.activation, args)
        for index in args:
            source = node.args[index]
            spec = resolved.input_activation if getattr(source, "op", None) == "placeholder" else resolved.activation
            quantize_edge(source, node, index, spec or resolved.activation, f"input of {kind} {layer}")
    _group_concat_scales(gm)
    return gm


def tiny_reason(kind: str, module: nn.Module | None, node: fx.Node, min_channels: int) -> str | None:
    """Why a layer is too small to be worth INT8 in TensorRT, or None."""
    if min_channels <= 0:
        return None
    sizes: dict[str, int] = {}
    if kind in ("conv", "conv_transpose"):
        sizes = {"in_channels": module.in_channels, "out_channels": module.out_channels}
    elif kind == "linear":
        sizes = {"K (in_features)": module.in_features, "N (out_features)": module.out_features}
    elif kind == "matmul":
        shapes = [_shape(arg) for arg in node.args[:2]]
        if all(s is not None and len(s) >= 2 for s in shapes):
            sizes = {"K": shapes[0][-1], "N": shapes[1][-1]}
    for label, size in sizes.items():
        if size < min_channels:
            return f"tiny layer: {label}={size} < min_channels={min_channels} (faster in FP16 on TensorRT)"
    return None


def _shape(arg: object) -> tuple[int, ...] | None:
    if not isinstance(arg, fx.Node):
        return None
    meta = arg.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _group_concat_scales(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if not is_cat(node) or tensor_annotation(node) is None:
            continue
        group = node.meta[TENSOR_KEY].group or node.name
        node.meta[TENSOR_KEY].group = group
        for producer in cat_inputs(node):
            annotation = producer.meta.get(TENSOR_KEY)
            if annotation is not None:
                annotation.group = group
