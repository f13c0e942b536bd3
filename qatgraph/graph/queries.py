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

from .mode_call import TrainingFlagCall

# Ops whose activation inputs TensorRT wants quantized (rule 1), by node target.
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
FUNCTIONAL_WEIGHTED = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
                       F.conv_transpose1d: "conv_transpose", F.conv_transpose2d: "conv_transpose",
                       F.conv_transpose3d: "conv_transpose"}
# Other GEMM-like functions: listed in the summary (never silently skipped) but not quantized.
OTHER_GEMM_FUNCTIONS = {torch.einsum, torch.addmm, torch.baddbmm, torch.addbmm, torch.tensordot}

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
CAT_FUNCTIONS = {torch.cat, torch.concat}

# Ops TensorRT folds into the preceding weighted op: a conv "chain" reaches an Add through them.
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CHAIN_PASSTHROUGH_TYPES = BATCHNORM_TYPES + (nn.Dropout, nn.Identity)
CHAIN_PASSTHROUGH_FUNCTIONS = {F.dropout, F.batch_norm}
# Identity-like in eval, a per-sample scale in training: stochastic depth / drop path, however spelled
# (torchvision's ``stochastic_depth`` is an fx-wrapped function; timm's ``DropPath`` a module).
IDENTITY_LIKE_NAMES = {"stochastic_depth", "drop_path", "StochasticDepth", "DropPath"}


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
    if isinstance(module, TrainingFlagCall):  # F.dropout/stochastic_depth following train()/eval()
        return module.function in CHAIN_PASSTHROUGH_FUNCTIONS or \
            getattr(module.function, "__name__", None) in IDENTITY_LIKE_NAMES
    if module is not None:
        return isinstance(module, CHAIN_PASSTHROUGH_TYPES) or type(module).__name__ in IDENTITY_LIKE_NAMES
    if node.op == "call_method" and node.target == "contiguous":
        return True
    return node.op == "call_function" and (node.target in CHAIN_PASSTHROUGH_FUNCTIONS or
                                           getattr(node.target, "__name__", None) in IDENTITY_LIKE_NAMES)


def weight_argument(kind: str, node: fx.Node) -> int | None:
    """Index of the weight argument of a functional weighted op (F.linear/F.conv*: 1; matmul:
    the second operand), or None for a module call."""
    if node.op == "call_module":
        return None
    return 1 if len(node.args) > 1 else None


def constant_source(node: object) -> fx.Node | None:
    """The ``get_attr`` node (a parameter or buffer) ``node`` is, or a row slice ``w[a:b]`` of
    (MultiheadAttention's packed in-projection), or None for a computed tensor."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice) and \
            isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" and len(node.users) == 1:
        return node.args[0]
    return None


def functional_weight(gm: fx.GraphModule, kind: str, node: fx.Node) -> fx.Node | None:
    """The get_attr node holding the weight of a functional weighted op, when its weight is a
    parameter or constant of the model (``F.linear(x, self.qkv.weight)``, ``x @ self.w``)."""
    index = weight_argument(kind, node)
    if index is None:
        return None
    source = constant_source(node.args[index])
    if source is None:
        return None
    value = fetch_attr(gm, str(source.target))
    return source if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2 else None


def fetch_attr(gm: nn.Module, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def functional_weight_axis(kind: str, weight: torch.Tensor) -> int | None:
    """Output-channel axis of a functional weight: 0 for F.linear/F.conv (weight [out, in, ...]),
    1 for F.conv_transpose ([in, out/groups, ...]), the last for a 2-D matmul operand ([K, N]);
    None (per tensor) for a batched matmul constant, which TensorRT cannot scale per channel."""
    if kind in ("linear", "conv"):
        return 0
    if kind == "conv_transpose":
        return 1
    return weight.dim() - 1 if weight.dim() == 2 else None


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


def parameter_display_name(owner_name: str, weight_name: str) -> str:
    """The summary's name of a functional op on a parameter: ``qkv`` for ``qkv.weight``,
    ``self_attn.in_proj`` for ``self_attn.in_proj_weight``."""
    qualified = f"{owner_name}.{weight_name}" if owner_name else weight_name
    return qualified.removesuffix(".weight") if qualified.endswith(".weight") else qualified.removesuffix("_weight")
