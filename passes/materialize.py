"""Pass 5 — materialize annotations into quantizer modules.

Expects: a fully annotated graph (annotate, skip, residual).
Guarantees:
* one :class:`FakeQuantizer` per annotated tensor (or per scale group: Concat inputs and output
  share one module), registered under ``quantizers.<tensor name>`` and called once, right after
  the producer; only the annotated consumer edges read the quantized tensor, every other
  consumer keeps the original (TensorRT rule 5: one Q/DQ per tensor, shared);
* each activation quantizer's ``compiled_form`` (its fake-quant form under ``torch.compile``) is
  ``"clip"`` when the tensor comes straight from a ReLU and ``"mask"`` otherwise, the split that
  measured cheapest (``qatgraph.quant.quantizer.COMPILED_FORMS``);
* every quantized Conv/ConvTranspose/Linear module is swapped in place for its quantized class
  with a per-channel weight quantizer (parameter names unchanged), calibrated from its weight;
* every quantized functional op on a parameter or constant (``annotation.weight_source``) reads
  its weight through a weight quantizer registered on the weight's owner module, next to the
  weight (``weight_quantizer`` for a tensor named ``weight``, else ``<name>_quantizer``; see
  :func:`qatgraph.graph.annotations.weight_quantizer_path`), per channel on the annotated axis and calibrated from the
  weight; ops sharing a weight share its quantizer. The export swaps it like a layer's;
* the GraphModule is recompiled and lints clean.
Quantizer names depend only on the graph, so a fresh compile of the same model and policy
loads a trained model's ``state_dict``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qatgraph.graph.annotations import TENSOR_KEY, op_annotation, tensor_annotation, weight_quantizer_path
from qatgraph.graph.queries import node_module
from qatgraph.policy import Policy
from qatgraph.quant.qmodules import quantize_module
from qatgraph.quant.quantizer import FakeQuantizer

QUANTIZER_KEY = "qatgraph.quantizer"


def run(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    prefix = gm.meta.get("qatgraph_prefix", "")
    device = next((p.device for p in gm.parameters()), None)
    container = _container_name(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    last_placeholder = [n for n in gm.graph.nodes if n.op == "placeholder"][-1:] or [None]
    by_group: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        annotation = tensor_annotation(node)
        if annotation is None or not annotation.edges:
            continue
        group = annotation.group or node.name
        target = by_group.get(group)
        if target is None:
            target = by_group[group] = f"{container}.{group}"
            qualified = f"{prefix}.{target}" if prefix else target
            quantizer = FakeQuantizer(annotation.spec, name=qualified,
                                      compiled_form="clip" if _fed_by_relu(gm, node) else "mask")
            gm.add_submodule(target, quantizer.to(device) if device is not None else quantizer)
        anchor = last_placeholder[0] if node.op == "placeholder" else node
        with gm.graph.inserting_after(anchor):
            quantized = gm.graph.call_module(target, (node,))
        quantized.meta[QUANTIZER_KEY] = target
        quantized.meta["tensor_meta"] = node.meta.get("tensor_meta")
        for consumer_name in dict.fromkeys(edge.consumer for edge in annotation.edges):
            nodes[consumer_name].replace_input_with(node, quantized)
        if node.op == "placeholder":
            last_placeholder = [quantized]
    weight_nodes: dict[str, fx.Node] = {}
    for node in list(gm.graph.nodes):
        annotation = op_annotation(node)
        module = node_module(gm, node)
        if annotation is not None and annotation.quantized and module is not None:
            quantize_module(module, annotation.weight_spec, annotation.layer)
        elif annotation is not None and annotation.quantized and annotation.weight_source is not None:
            _quantize_functional_weight(gm, node, annotation, weight_nodes, prefix)
    gm.graph.lint()
    gm.recompile()
    return gm


def _quantize_functional_weight(gm: fx.GraphModule, node: fx.Node, annotation, weight_nodes: dict[str, fx.Node],
                                prefix: str) -> None:
    source = annotation.weight_source
    quantized = weight_nodes.get(source)
    if quantized is None:
        path = weight_quantizer_path(source)
        owner_name, _, local = path.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        weight = getattr(owner, source.rpartition(".")[2])
        existing = getattr(owner, local, None)
        if not isinstance(existing, FakeQuantizer):
            axis = annotation.weight_axis
            quantizer = FakeQuantizer(annotation.weight_spec, axis=axis,
                                      num_channels=weight.shape[axis] if axis is not None else None,
                                      name=f"{prefix}.{path}" if prefix else path, is_weight=True)
            quantizer.to(weight.device)
            quantizer.calibrate_from(weight.detach())
            owner.add_module(local, quantizer)
        getter = _getter(node.args[annotation.weight_arg])
        with gm.graph.inserting_after(getter):
            quantized = gm.graph.call_module(path, (getter,))
        quantized.meta["tensor_meta"] = getter.meta.get("tensor_meta")
        weight_nodes[source] = quantized
    expression = node.args[annotation.weight_arg]
    # The weight itself, or a row slice of it (MultiheadAttention's packed in-projection): the
    # quantizer is per output row, so slicing the quantized weight is quantizing the slice.
    (node if expression.op == "get_attr" else expression).replace_input_with(_getter(expression), quantized)


def _getter(expression: fx.Node) -> fx.Node:
    return expression if expression.op == "get_attr" else expression.args[0]


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, torch.ops.aten.relu.default)


def _fed_by_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is a ReLU (module, function or method): its quantizer compiles best as "clip"."""
    if node.op == "call_module":
        return isinstance(node_module(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _container_name(gm: fx.GraphModule) -> str:
    name = "quantizers"
    while hasattr(gm, name) and not isinstance(getattr(gm, name), nn.Module):
        name = "qatgraph_" + name
    return name


def quantizer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if QUANTIZER_KEY in n.meta]


__all__ = ["run", "quantizer_nodes", "QUANTIZER_KEY", "TENSOR_KEY"]
