"""``torch.export`` frontend: a module-level FX graph for models torch.fx cannot trace.

torch.fx's symbolic tracer stops at Python it cannot run on proxies. Hugging Face
transformers 5 is full of it (measured on ``BertForSequenceClassification``, transformers
5.23): decorated ``forward``s whose ``*args, **kwargs`` wrappers hide the signature
("co_varnames is too small", ``kwargs[arg_name] = ...`` on a proxy), ``**kwargs`` forwarded to
every layer (``GradientCheckpointingLayer.forward_with_checkpointing(self, *args, **kwargs)``
unpacks the ``**kwargs`` proxy), ``hidden_shape = (*input_shape, -1, head_dim)`` (star-unpacking
a traced shape) and, with SDPA, ``is_causal = q_length > 1 and ...`` (``bool`` of a traced
value). Partial tracing then reaches only the feed-forward sub-blocks. ``torch.export``
traces all of it, but at the ATen level: ``aten.linear(x, weight, bias)``, no ``call_module``.

:func:`export_graph` turns an exported program back into what qatgraph's passes read:

* every call of a ``Linear``/``Conv``/``ConvTranspose``/``BatchNorm``/``LayerNorm``/
  ``Embedding``/``Dropout`` module (exact types) that exported to ops on one activation and
  the module's own parameters becomes ``call_module`` again, so layers are quantized by module
  name, BN folds, and ``Dropout``/``BatchNorm`` follow ``train()``/``eval()`` at run time;
* ATen ops the passes look for become their torch functions (``torch.add``, ``torch.matmul``,
  ``torch.bmm``, ``torch.cat``, ``F.scaled_dot_product_attention``; ``F.linear``/``F.conv*`` for a
  linear/conv on a parameter outside a module call, e.g. ``nn.MultiheadAttention``'s
  in-projection, which the passes quantize as a functional weight); ``aten.sym_size`` becomes
  ``x.size(dim)`` so exporters keep the batch dimension symbolic; inference-mode dropout
  (identity) and shape/metadata assertions are dropped; everything else stays an ATen call;
* parameters and buffers keep their qualified names (a checkpoint of the model loads), and are
  shared with ``model``, not copied (``qatgraph.compile`` works on its own copy);
* the result takes the tensor inputs as positional arguments named after ``forward``'s
  parameters (call it with keywords too), returns the flattened tensor outputs (one tensor,
  or a tuple), and is checked to reproduce ``model`` on the example inputs (else TraceError).

Limits: the model is exported in eval mode, so Python branches on ``self.training`` (e.g. the
attention-probability dropout of Hugging Face's attention functions) keep their eval values;
dimension 0 of every tensor input is dynamic (``dynamic_batch``), other dimensions are fixed
to the example's unless ``dynamic_shapes`` says otherwise.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree as pytree

from qatgraph.errors import TraceError

from .tracing import describe_failure

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Modules whose standard forward is re-created exactly by ``module(x)`` (exact types only).
MODULE_TYPES: tuple[type, ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.Embedding, nn.Dropout,
)
TORCH_FUNCTIONS = {
    aten.add.Tensor: torch.add, aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm,
    aten.cat.default: torch.cat, aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    # Weighted ops on a parameter outside a module call (nn.MultiheadAttention's in-projection,
    # F.linear in a user's forward): the functional forms the passes quantize (same arguments).
    aten.linear.default: F.linear, aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d,
    aten.conv3d.default: F.conv3d, aten.conv1d.padding: F.conv1d, aten.conv2d.padding: F.conv2d,
    aten.conv3d.padding: F.conv3d, aten.conv_transpose1d.default: F.conv_transpose1d,
    aten.conv_transpose2d.input: F.conv_transpose2d, aten.conv_transpose3d.input: F.conv_transpose3d,
    # Ops taking sizes: under the TorchScript tracer ``x.size(0)`` is a traced 0-d tensor, which the
    # Python-level functions accept (keeping the batch dynamic) and ATen overloads reject.
    aten.arange.default: torch.arange, aten.arange.start: torch.arange, aten.arange.start_step: torch.arange,
    aten.zeros.default: torch.zeros, aten.ones.default: torch.ones, aten.full.default: torch.full,
    aten.empty.memory_format: torch.empty,
}
TENSOR_METHODS = {
    aten.view.default: "view", aten.reshape.default: "reshape", aten.expand.default: "expand",
    aten.new_ones.default: "new_ones", aten.new_zeros.default: "new_zeros", aten.new_full.default: "new_full",
    aten.new_empty.default: "new_empty",
}
ASSERTIONS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
              aten.sym_constrain_range_for_size.default}


class OutputStructure:
    """The pytree structure of a model's outputs: rebuilds it from the flat tensors. Immutable,
    so copies share it (``copy.deepcopy`` of a ``TreeSpec`` warns in torch 2.13)."""

    def __init__(self, spec: pytree.TreeSpec) -> None:
        self.spec = spec

    def __call__(self, flat: Any) -> Any:
        return pytree.tree_unflatten(list(flat) if isinstance(flat, (list, tuple)) else [flat], self.spec)

    def __deepcopy__(self, memo: dict) -> OutputStructure:
        return self

    def __repr__(self) -> str:
        return f"OutputStructure({self.spec})"


@dataclass
class _ModuleCall:
    """Consecutive nodes exported from one call of one module."""

    key: str
    path: str
    nodes: list[fx.Node]


def export_graph(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None, *,
                 dynamic_batch: bool = True, dynamic_shapes: Any = None, strict: bool = False,
                 check: bool = True) -> fx.GraphModule:
    """Export ``model(*args, **kwargs)`` with torch.export; return a module-level GraphModule
    for :func:`qatgraph.compile` (see the module docstring)."""
    kwargs = dict(kwargs or {})
    if not isinstance(args, tuple):
        args = (args,)
    program = _export(model, args, kwargs, dynamic_batch, dynamic_shapes, strict)
    graph, root = _module_level_graph(program, model)
    gm = fx.GraphModule(root, graph, type(model).__name__)
    gm.train(model.training)  # a new Module starts in training mode; keep the model's (BN, Dropout)
    _restore_non_persistent_buffers(gm, model)
    gm.meta["qatgraph_frontend"] = "torch.export"
    gm.meta["qatgraph_outputs"] = str(program.call_spec.out_spec)  # what the flat outputs were, for users
    gm.meta["qatgraph_out_spec"] = OutputStructure(program.call_spec.out_spec)  # for build.restore_outputs
    modules = sum(node.op == "call_module" for node in graph.nodes)
    log.info("qatgraph.graph.frontends: exported %s with torch.export: %d module calls, %d other ops",
             type(model).__name__, modules, sum(node.op in ("call_function", "call_method") for node in graph.nodes))
    if check:
        _check_same_outputs(gm, model, program, args, kwargs)
    return gm


# ---------------------------------------------------------------------------- torch.export
_DYNAMO_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                   "torch.fx.experimental.symbolic_shapes", "torch._subclasses")


@contextlib.contextmanager
def quiet_dynamo() -> Iterator[io.StringIO]:
    """Silence torch.export's (and the dynamo ONNX exporter's) log lines and graph dumps for the
    block; yields what was printed, which also goes to this module's debug log."""
    printed = io.StringIO()
    loggers = [logging.getLogger(name) for name in _DYNAMO_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            yield printed
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if printed.getvalue():
            log.debug("torch printed:\n%s", printed.getvalue())


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_batch: bool, dynamic_shapes: Any,
            strict: bool) -> torch.export.ExportedProgram:
    if dynamic_shapes is None and dynamic_batch:
        dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        location = describe_failure(exc, model, "").location
        raise TraceError(
            f"torch.export could not export {type(model).__name__}" + (f" at {location}" if location else "") +
            f": {type(exc).__name__}: {first_line}. Fixes: make data-dependent branches static (or use "
            "torch.cond / torch.where); with dynamic_batch=True every input needs a batch of at least 2; pass "
            "dynamic_batch=False to fix all shapes; or compile the traceable parts with qatgraph.compile "
            "(partial tracing).") from exc
    finally:
        model.train(was_training)


def _batch_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    batch = torch.export.Dim("batch")
    return dynamic_shapes_per_input(model, args, kwargs, lambda leaf, name: _batch_spec(leaf, batch, name),
                                    "export_graph: the inputs")


def dynamic_shapes_per_input(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                             spec: Callable[[Any, str], Any], what: str = "the inputs") -> dict[str, Any]:
    """torch.export's ``dynamic_shapes`` for ``model.forward(*args, **kwargs)``: ``spec(leaf, name)``
    for every leaf of every argument (``name`` the parameter it came through), keyed as torch.export
    wants (``**kwargs`` entries flattened into the top level)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(f"{what} do not match {type(model).__name__}.forward: {exc}") from None
    shapes: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        leaf_spec = pytree.tree_map(lambda leaf, arg=name: spec(leaf, arg), value)
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            shapes.update(leaf_spec)
        else:
            shapes[name] = leaf_spec
    return shapes


def _batch_spec(leaf: Any, batch: Any, name: str) -> Any:
    if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
        return None
    if leaf.shape[0] < 2:
        raise TraceError(f"export_graph: input {name!r} has batch size {leaf.shape[0]}; torch.export fixes "
                         "dimensions of size 0 or 1, so a dynamic batch needs example inputs with a batch of at "
                         "least 2 (or pass dynamic_batch=False)")
    return {0: batch}


# ---------------------------------------------------------------------------- graph rewriting
def _module_level_graph(program: torch.export.ExportedProgram, model: nn.Module) -> tuple[fx.Graph, dict]:
    """(new graph, GraphModule root dict {qualified name: module/parameter/buffer/constant})."""
    signature = program.graph_signature
    mutations = [spec for spec in signature.output_specs if spec.kind is not OutputKind.USER_OUTPUT]
    if mutations:
        raise TraceError(f"export_graph: {type(model).__name__} mutates state in forward "
                         f"({', '.join(str(m.target) for m in mutations)}); only eval-mode forwards that "
                         "do not write to buffers or inputs are supported")
    state = {spec.arg.name: spec for spec in signature.input_specs if spec.kind is not InputKind.USER_INPUT}
    calls = {call.nodes[-1]: call for call in _module_calls(program.graph, model, state)}
    inside = {node for call in calls.values() for node in call.nodes}
    graph, env, root = fx.Graph(), {}, {}
    order = {node: index for index, node in enumerate(program.graph.nodes)}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node] = _placeholder(graph, node, state.get(node.name), program, model, root)
        elif node in calls:
            env[node] = _module_call_node(graph, calls[node], env, model, root)
        elif node in inside or node.op == "call_function" and node.target in ASSERTIONS:
            continue
        elif node.op == "output":
            outputs = [env[arg] for arg in node.args[0]]
            graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        elif node.op == "call_function" and node.target is aten.add_.Tensor and _safe_out_of_place(node, order):
            args = fx.node.map_arg(node.args, env.__getitem__)
            env[node] = graph.call_function(torch.add, args, fx.node.map_arg(node.kwargs, env.__getitem__))
            env[node].meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
        else:
            env[node] = _normalized_copy(graph, node, env)
    for node in reversed(graph.nodes):  # state only the dropped ops and module calls read
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    return graph, root


def _placeholder(graph: fx.Graph, node: fx.Node, spec: Any, program: torch.export.ExportedProgram,
                 model: nn.Module, root: dict) -> fx.Node:
    if spec is None:  # a user input
        return graph.placeholder(node.name)
    target = spec.target
    if spec.kind is InputKind.CONSTANT_TENSOR:
        root[target] = program.constants[target]
    else:
        root[target] = model.get_parameter(target) if spec.kind is InputKind.PARAMETER else model.get_buffer(target)
    return graph.get_attr(target)


def _module_calls(graph: fx.Graph, model: nn.Module, state: dict[str, Any]) -> list[_ModuleCall]:
    """Runs of nodes from one call of a MODULE_TYPES module that take one activation and the
    module's own parameters, and whose only value used outside is the last node's."""
    runs: list[_ModuleCall] = []
    for node in graph.nodes:
        call_key, path = _innermost_module(node)
        if runs and path is not None and runs[-1].key == call_key and runs[-1].nodes[-1].next is node:
            runs[-1].nodes.append(node)
        elif path is not None:
            runs.append(_ModuleCall(call_key, path, [node]))
    return [call for call in runs if _is_plain_module_call(call, model, state)]


def _innermost_module(node: fx.Node) -> tuple[str | None, str | None]:
    """(key of the innermost module call, e.g. ``L__self__fc@1`` for the second call, module path)."""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op != "call_function" or not stack:
        return None, None
    call_key, (path, _) = list(stack.items())[-1]
    return call_key, path if isinstance(path, str) else None


def _is_plain_module_call(call: _ModuleCall, model: nn.Module, state: dict[str, Any]) -> bool:
    try:
        module = model.get_submodule(call.path)
    except AttributeError:
        return False
    if type(module) not in MODULE_TYPES:
        return False
    members = set(call.nodes)
    if any(user not in members for node in call.nodes[:-1] for user in node.users):
        return False
    external = {arg for node in call.nodes for arg in node.all_input_nodes if arg not in members}
    activations = [arg for arg in external if arg.name not in state]
    owned = all(str(state[arg.name].target).startswith(call.path + ".") for arg in external if arg.name in state)
    return len(activations) == 1 and owned


def _module_call_node(graph: fx.Graph, call: _ModuleCall, env: dict, model: nn.Module, root: dict) -> fx.Node:
    external = [arg for node in call.nodes for arg in node.all_input_nodes if arg not in call.nodes]
    activation = next(env[arg] for arg in external if env[arg].op != "get_attr")
    root[call.path] = model.get_submodule(call.path)
    node = graph.call_module(call.path, (activation,))
    node.meta["nn_module_stack"] = call.nodes[-1].meta.get("nn_module_stack")
    return node


def _safe_out_of_place(node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``x.add_(y)`` (``out += y`` exported) can become ``torch.add(x, y)``: nothing
    reads ``x`` after it, and ``x`` is a fresh result (not an input, state or a view of another
    tensor), so no one can see the write. The passes then see a plain Add (residual rule)."""
    target = node.args[0]
    if not isinstance(target, fx.Node) or target.op != "call_function":
        return False
    schema = getattr(target.target, "_schema", None)
    if schema is None or any(ret.alias_info is not None for ret in schema.returns):
        return False
    return all(order[user] <= order[node] for user in target.users)


def _normalized_copy(graph: fx.Graph, node: fx.Node, env: dict) -> fx.Node:
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "call_function" and node.target is aten.dropout.default and args[2] is False:
        return args[0]  # inference-mode dropout is the identity
    if node.op == "call_function" and node.target is aten.sym_size.int:
        new = graph.call_method("size", args, kwargs)
    elif node.op == "call_function" and node.target in TENSOR_METHODS:
        kwargs = {k: v for k, v in kwargs.items() if k != "implicit"}  # aten.expand's tracing-only flag
        new = graph.call_method(TENSOR_METHODS[node.target], args, kwargs)
    elif node.op == "call_function" and node.target in TORCH_FUNCTIONS:
        new = graph.call_function(TORCH_FUNCTIONS[node.target], args, kwargs)
    else:
        new = graph.create_node(node.op, node.target, args, kwargs, name=node.name)
    new.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
    return new


def _restore_non_persistent_buffers(gm: fx.GraphModule, model: nn.Module) -> None:
    """fx.GraphModule registers every tensor attribute as a persistent buffer; keep the model's
    non-persistent ones (e.g. BERT's position_ids) out of the state_dict, as in the model."""
    for name, _ in gm.named_buffers():
        owner_name, _, buffer_name = name.rpartition(".")
        try:
            original_owner = model.get_submodule(owner_name)
        except AttributeError:
            continue
        if buffer_name in getattr(original_owner, "_non_persistent_buffers_set", ()):
            gm.get_submodule(owner_name)._non_persistent_buffers_set.add(buffer_name)


# ---------------------------------------------------------------------------- checking
def flat_inputs(program: torch.export.ExportedProgram, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensor inputs in the order of the exported graph's placeholders."""
    in_spec = program.call_spec.in_spec
    children = [] if in_spec is None else \
        in_spec.children() if callable(getattr(in_spec, "children", None)) else in_spec.children_specs
    kwargs_spec = children[1] if len(children) == 2 else None
    order = list(kwargs_spec.context) if kwargs_spec is not None and kwargs_spec.context else list(kwargs)
    ordered = {name: kwargs[name] for name in order if name in kwargs}
    return [leaf for leaf in pytree.tree_leaves((args, ordered)) if isinstance(leaf, torch.Tensor)]


@torch.no_grad()
def _check_same_outputs(gm: fx.GraphModule, model: nn.Module, program: torch.export.ExportedProgram,
                        args: tuple, kwargs: dict[str, Any]) -> None:
    was_training = model.training
    model.eval()
    try:
        expected = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        actual = pytree.tree_leaves(gm(*flat_inputs(program, args, kwargs)))
    finally:
        model.train(was_training)
    if len(expected) != len(actual):
        raise TraceError(f"export_graph: {type(model).__name__} returned {len(expected)} tensors but the exported "
                         f"graph returns {len(actual)}")
    for index, (want, got) in enumerate(zip(expected, actual)):
        if want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=1e-4, atol=1e-5):
            raise TraceError(f"export_graph: output {index} of the exported graph differs from "
                             f"{type(model).__name__}'s (max |diff| {(want.float() - got.float()).abs().max():.3g}); "
                             "pass check=False to inspect the graph")
