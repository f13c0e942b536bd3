"""What a torch.fx node *is*, as far as quantization cares: weighted op, add, concat, BN...

Rule tables, written forward, so the passes read as TensorRT's placement rules rather than
as pattern-matching code.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qatgraph.quant.qmodules import op_kind

# Ops whose activation inputs TensorRT wants quantized (rule 1), by node target.
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
FUNCTIONAL_WEIGHTED = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
CAT_FUNCTIONS = {torch.cat, torch.concat}

# Ops TensorRT folds into the preceding weighted op: a conv "chain" reaches an Add through them.
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CHAIN_PASSTHROUGH_TYPES = BATCHNORM_TYPES + (nn.Dropout, nn.Identity)
CHAIN_PASSTHROUGH_FUNCTIONS = {F.dropout, F.batch_norm}


def node_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def weighted_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'conv', 'conv_transpose', 'linear' or 'matmul' for weighted ops, else None."""
    if node.op == "call_module":
        return op_kind(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        if node.target in MATMUL_FUNCTIONS:
            return "matmul"
        return FUNCTIONAL_WEIGHTED.get(node.target)
    if node.op == "call_method" and node.target in MATMUL_METHODS:
        return "matmul"
    return None


def activation_args(kind: str, node: fx.Node) -> tuple[int, ...]:
    """Positional args of a weighted op that are activations to quantize."""
    if kind == "matmul":
        return tuple(i for i in (0, 1) if i < len(node.args) and isinstance(node.args[i], fx.Node))
    return (0,) if node.args and isinstance(node.args[0], fx.Node) else ()


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return "alpha" not in node.kwargs
    return node.op == "call_method" and node.target in ADD_METHODS and "alpha" not in node.kwargs


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CAT_FUNCTIONS


def cat_inputs(node: fx.Node) -> list[fx.Node]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", [])
    return [t for t in tensors if isinstance(t, fx.Node)]


def is_chain_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = node_module(gm, node)
    if module is not None:
        return isinstance(module, CHAIN_PASSTHROUGH_TYPES)
    return node.op == "call_function" and node.target in CHAIN_PASSTHROUGH_FUNCTIONS


def chain_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The weighted op whose output reaches ``node`` through BN/Dropout/Identity only, each
    with a single user (so TensorRT can fuse the chain into the op), else None."""
    current = node
    while True:
        if weighted_kind(gm, current) is not None:
            return current
        if not is_chain_passthrough(gm, current) or not current.args or not isinstance(current.args[0], fx.Node):
            return None
        producer = current.args[0]
        if len(producer.users) != 1:
            return None
        current = producer


def layer_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """Qualified name of the layer a node stands for (module path, or node name for functions)."""
    prefix = gm.meta.get("qatgraph_prefix", "")
    local = str(node.target) if node.op == "call_module" else node.name
    return f"{prefix}.{local}" if prefix else local


def weighted_depth(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Longest count of weighted ops on any path from the graph inputs to each node."""
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        inputs = [depth[n] for n in node.all_input_nodes if n in depth]
        depth[node] = max(inputs, default=0) + (1 if weighted_kind(gm, node) else 0)
    return depth
