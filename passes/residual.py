"""Pass 4 — residual adds: quantize the skip input so Conv-BN-Add(-ReLU) fuses in INT8.

Expects: annotated graph after the skip pass (so only layers that stay quantized count).
Guarantees, for each Add of two tensors where at least one input is the output of a quantized
weighted op reached through BN/Dropout/Identity only (a "chain" TensorRT fuses into the op):
* the other input (the skip) is requested as a quantized edge, sharing the tensor's quantizer
  with its other quantized consumers (TensorRT rule 4 and 5);
* the chain's edge into the Add is never quantized;
* when both inputs are chains (a downsample block), the branch with fewer weighted ops from
  the graph inputs (the shorter one) is the skip; on a tie the second operand is;
* when neither input is a chain (squeeze-excitation ``x * scale``, a stochastic-depth mask in
  training, any elementwise op between the last weighted op and the Add), the two inputs'
  ancestors decide, as modelopt's ONNX path does: the inputs must share an ancestor (the block
  input); the branch holding a quantized Conv/Linear of its own (not shared with the other) is
  the main branch, and the other input is the skip when its own branch holds no weighted op at
  all, no graph input or constant of its own (a mask or a bias is not a residual) and, where
  shapes are known, the Add's output shape. ``x += y`` / ``x.add_(y)`` are Adds like any other;
The decision is recorded on the Add node (``node.meta["qatgraph.residual"]``).

Target ``onnxruntime`` differs: ONNX Runtime's x86 kernels fuse DQ→Conv→Q into QLinearConv and
an Add with both inputs dequantized (DQ, DQ → Add → Q) into QLinearAdd, and nothing fuses an Add
into a conv; so there both inputs are quantized (the conv chain's output too).
"""
from __future__ import annotations

import torch.fx as fx

from qatgraph.graph.annotations import RESIDUAL_KEY, op_annotation, quantize_edge
from qatgraph.graph.queries import chain_source, is_add, weighted_depth, weighted_kind
from qatgraph.policy import Policy


def run(gm: fx.GraphModule, policy: Policy) -> fx.GraphModule:
    if not policy.residual:
        return gm
    depth = weighted_depth(gm)
    for node in gm.graph.nodes:
        if not is_add(node) or len(node.args) < 2:
            continue
        inputs = node.args[:2]
        if not all(isinstance(arg, fx.Node) for arg in inputs) or inputs[0] is inputs[1]:
            continue
        sources = [_quantized_chain(gm, arg) for arg in inputs]
        if sources[0] is None and sources[1] is None:
            sources = _branches(gm, node, inputs)
            if sources is None:
                continue
        if sources[0] is not None and sources[1] is not None:
            skip_index = 0 if depth[inputs[0]] < depth[inputs[1]] else 1
        else:
            skip_index = 0 if sources[0] is None else 1
        main = sources[1 - skip_index]
        spec = op_annotation(main).activation_spec
        quantize_edge(inputs[skip_index], node, skip_index, spec,
                      f"residual skip input of {node.name} (fuses into {op_annotation(main).layer})")
        if policy.target == "onnxruntime":
            quantize_edge(inputs[1 - skip_index], node, 1 - skip_index, spec,
                          f"residual main input of {node.name} (QLinearAdd in ONNX Runtime)")
        node.meta[RESIDUAL_KEY] = {"skip_arg": skip_index, "main_layer": op_annotation(main).layer}
    return gm


def _quantized_chain(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    source = chain_source(gm, node)
    if source is None:
        return None
    annotation = op_annotation(source)
    return source if annotation is not None and annotation.quantized and annotation.kind != "matmul" else None


def _branches(gm: fx.GraphModule, add: fx.Node, inputs: tuple) -> list[fx.Node | None] | None:
    """[main layer or None, ...] per input from the inputs' ancestors, or None (not a residual)."""
    ancestors = [_ancestors(arg) for arg in inputs]
    common = ancestors[0] & ancestors[1]
    if not common:
        return None
    own = [ancestors[i] - common for i in (0, 1)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nearest = [_nearest_quantized_layer(gm, own[i], order, add) for i in (0, 1)]
    weighted = [any(weighted_kind(gm, n) is not None for n in own[i]) for i in (0, 1)]
    for main in (0, 1):
        skip = 1 - main
        if nearest[main] is not None and not weighted[skip] and _same_shape(inputs[skip], add) and \
                not any(n.op in ("placeholder", "get_attr") for n in own[skip]):
            result: list[fx.Node | None] = [None, None]
            result[main] = nearest[main]
            return result
    return None


def _nearest_quantized_layer(gm: fx.GraphModule, branch: set[fx.Node], order: dict[fx.Node, int],
                             add: fx.Node) -> fx.Node | None:
    """The quantized Conv/Linear of a branch nearest its end; None when a layer the policy skips
    comes first (a skipped layer pulls no quantizer onto the skip). Tiny layers and, where shapes
    are known, layers whose output has another shape than the Add (an SE gate's convs) are passed over."""
    layers = sorted((n for n in branch if weighted_kind(gm, n) not in (None, "matmul") and _same_shape(n, add)),
                    key=order.__getitem__)
    for node in reversed(layers):
        annotation = op_annotation(node)
        if annotation is not None and annotation.quantized:
            return node
        if annotation is None or not annotation.reason.startswith("tiny"):
            return None
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return seen


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    shapes = [getattr(n.meta.get("tensor_meta"), "shape", None) for n in (a, b)]
    return None in shapes or tuple(shapes[0]) == tuple(shapes[1])
