"""Pass 2 — annotate weighted ops and their inputs (TensorRT rule 1, 2, 5, 6).

Expects: a traced (and fused) GraphModule; shape metadata (``node.meta["tensor_meta"]``) when
example inputs were given.
Guarantees:
* every Conv/ConvTranspose/Linear/matmul/bmm node of a kind in ``policy.quantize`` carries an
  :class:`OpAnnotation`: quantized with its resolved weight/activation specs, or not, with the
  reason (tiny layer: channels or GEMM N/K below ``policy.min_channels``);
* functional weighted ops (``F.linear``/``F.conv*``/``F.conv_transpose*``/``matmul``/``bmm``)
  whose weight is a parameter or constant of the model (a ``get_attr`` node) are quantized like
  the layers they stand for: the annotation names the weight (``weight_source``) and its
  output-channel axis, so materialize gives it a per-channel weight quantizer; only the other
  operand is an activation edge. They are named after the weight's owner (``F.linear(x,
  self.qkv.weight)`` -> ``...qkv``; ``self.in_proj_weight`` -> ``...in_proj``), the node name
  when two ops share a weight. ``F.linear``/``F.conv*`` on a weight computed at run time stay float;
* every other weighted op the graph holds also gets an annotation, not quantized, with the rule
  that decided it (kind not in ``policy.quantize``, a subclass of Linear/Conv qatgraph does not
  swap, ``einsum``/``addmm``/``baddbmm``, an attention module left whole): ``qatgraph.summary``
  lists every weighted op of the graph;
* each activation input of a quantized op is requested as a quantized edge on its producer
  (outputs of weighted ops are never annotated for their own sake: rule 2);
* Concat: when a Concat's output is quantized, its quantized inputs join the output's scale
  group (rule 5: Concat inputs and output share one scale).
Override skips and skip lists are applied by the skip pass, not here.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qatgraph.graph.annotations import (
    OP_KEY,
    TENSOR_KEY,
    OpAnnotation,
    quantize_edge,
    tensor_annotation,
)
from qatgraph.graph.queries import (
    OTHER_GEMM_FUNCTIONS,
    activation_args,
    cat_inputs,
    fetch_attr,
    functional_weight,
    functional_weight_axis,
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


_FUNCTIONAL_TYPES = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d,
                     F.conv_transpose1d: nn.ConvTranspose1d, F.conv_transpose2d: nn.ConvTranspose2d,
                     F.conv_transpose3d: nn.ConvTranspose3d}


def functional_type(node: fx.Node) -> type:
    """The module type policy type rules see for a functional op (``F.linear`` is a ``Linear``)."""
    return _FUNCTIONAL_TYPES.get(node.target, MatMul)  # type: ignore[arg-type]


def run(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    names = _functional_names(gm)
    for node in gm.graph.nodes:
        kind = weighted_kind(gm, node)
        if kind is None:
            _note_unquantized_weighted(gm, node)
            continue
        module = node_module(gm, node)
        layer = names.get(node) or layer_name(gm, node)
        if kind not in policy.quantize:
            node.meta[OP_KEY] = OpAnnotation(kind, layer, False, f"{kind} not in policy.quantize")
            continue
        weight = functional_weight(gm, kind, node)
        if module is None and kind != "matmul" and weight is None:
            node.meta[OP_KEY] = OpAnnotation(kind, layer, False, f"functional {kind} whose weight is computed at run "
                                             "time (not a parameter or constant of the model): left in floating point")
            continue
        resolved = policy.resolve(layer, type(module) if module is not None else functional_type(node))
        args = activation_args(kind, node)
        if weight is not None:
            args = tuple(i for i in args if i != 1)
        tiny = tiny_reason(kind, module, node, policy.min_channels, weight=fetch_attr(gm, str(weight.target))
                           if weight is not None else None)
        if tiny:
            node.meta[OP_KEY] = OpAnnotation(kind, layer, False, tiny)
            continue
        reason = "quantized by policy" + (f" (overrides: {', '.join(resolved.applied_rules)})"
                                          if resolved.applied_rules else "")
        annotation = OpAnnotation(kind, layer, True, reason, resolved.weight if module is not None or weight is not None
                                  else None, resolved.activation, args)
        if weight is not None:
            value = fetch_attr(gm, str(weight.target))
            annotation.weight_source, annotation.weight_arg = str(weight.target), 1
            annotation.weight_axis = functional_weight_axis(kind, value) if resolved.weight.per_channel else None
        node.meta[OP_KEY] = annotation
        for index in args:
            source = node.args[index]
            spec = resolved.input_activation if getattr(source, "op", None) == "placeholder" else resolved.activation
            quantize_edge(source, node, index, spec, f"input of {kind} {layer}")
    _group_concat_scales(gm)
    return gm


def _functional_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Functional ops on a parameter, named after it when no other op uses the same weight."""
    by_weight: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        kind = weighted_kind(gm, node)
        weight = functional_weight(gm, kind, node) if kind is not None else None
        if weight is not None:
            by_weight.setdefault(str(weight.target), []).append(node)
    prefix = gm.meta.get("qatgraph_prefix", "")
    names = {}
    for target, nodes in by_weight.items():
        if len(nodes) != 1:
            continue
        name = target[:-len(".weight")] if target.endswith(".weight") else \
            target[:-len("_weight")] if target.endswith("_weight") else target
        names[nodes[0]] = f"{prefix}.{name}" if prefix else name
    taken = {layer_name(gm, n) for n in gm.graph.nodes if n.op == "call_module"}
    return {node: name for node, name in names.items() if name not in taken}


def _note_unquantized_weighted(gm: fx.GraphModule, node: fx.Node) -> None:
    """Give weighted ops qatgraph does not quantize a row in the summary, with the reason."""
    reason = None
    module = node_module(gm, node)
    if module is not None:
        if isinstance(module, nn.MultiheadAttention):
            reason = module.__dict__.get("_qatgraph_kept_whole") or "MultiheadAttention left as one module"
        elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            reason = (f"{type(module).__name__} subclasses {type(module).__mro__[1].__name__} and may change its "
                      "forward: not swapped for a quantized layer (mark it a leaf and quantize its parent's "
                      "GEMMs, or use the torch class)")
    elif node.op == "call_function" and node.target in OTHER_GEMM_FUNCTIONS:
        reason = (f"{getattr(node.target, '__name__', node.target)} is not rewritten to a plain matmul "
                  "(only two-operand einsum GEMMs are): left in floating point")
    if reason is not None:
        kind = "attention" if isinstance(module, nn.MultiheadAttention) else "linear" if isinstance(module, nn.Linear) \
            else "conv" if module is not None else "gemm"
        node.meta[OP_KEY] = OpAnnotation(kind, layer_name(gm, node), False, reason)


def tiny_reason(kind: str, module: nn.Module | None, node: fx.Node, min_channels: int,
                weight: object = None) -> str | None:
    """Why a layer is too small to be worth INT8 in TensorRT, or None."""
    if min_channels <= 0:
        return None
    sizes: dict[str, int] = {}
    if module is None and weight is not None and kind != "matmul":
        shape = tuple(weight.shape)  # type: ignore[attr-defined]
        out_channels, in_channels = (shape[1], shape[0]) if kind == "conv_transpose" else (shape[0], shape[1])
        sizes = {"K (in_features)": in_channels, "N (out_features)": out_channels} if kind == "linear" else \
            {"in_channels": in_channels, "out_channels": out_channels}
    elif kind in ("conv", "conv_transpose"):
        sizes = {"in_channels": module.in_channels, "out_channels": module.out_channels}
    elif kind == "linear":
        sizes = {"K (in_features)": module.in_features, "N (out_features)": module.out_features}
    elif kind == "matmul" and weight is not None:
        shape = tuple(weight.shape)  # type: ignore[attr-defined]
        sizes = {"K": shape[-2], "N": shape[-1]}
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
