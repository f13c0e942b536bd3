"""Pass 4 — residual adds: quantize the skip input so Conv-BN-Add(-ReLU) fuses in INT8.

Expects: annotated graph after the skip pass (so only layers that stay quantized count).
Guarantees, for each Add of two tensors where at least one input is the output of a quantized
weighted op reached through BN/Dropout/Identity only (a "chain" TensorRT fuses into the op):
* the other input (the skip) is requested as a quantized edge, sharing the tensor's quantizer
  with its other quantized consumers (TensorRT rule 4 and 5);
* the chain's edge into the Add is never quantized;
* when both inputs are chains (a downsample block), the branch with fewer weighted ops from
  the graph inputs (the shorter one) is the skip; on a tie the second operand is.
The decision is recorded on the Add node (``node.meta["qatgraph.residual"]``).

Target ``onnxruntime`` differs: ONNX Runtime's x86 kernels fuse DQ→Conv→Q into QLinearConv and
an Add with both inputs dequantized (DQ, DQ → Add → Q) into QLinearAdd, and nothing fuses an Add
into a conv; so there both inputs are quantized (the conv chain's output too).
"""
from __future__ import annotations

import torch.fx as fx

from qatgraph.graph.annotations import RESIDUAL_KEY, op_annotation, quantize_edge
from qatgraph.graph.queries import chain_source, is_add, weighted_depth
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
