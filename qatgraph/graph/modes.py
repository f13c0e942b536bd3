"""Keeping ``train()``/``eval()`` meaningful in a traced model.

torch.fx runs Python at trace time, so ``self.training`` becomes a constant of the graph: a model
traced in training mode would keep drawing dropout and stochastic-depth masks after ``eval()``
(in PyTorch and in the export), and one traced in eval mode would never drop again while it trains.
:func:`trace_both_modes` traces a module in its own mode and in the other one and makes the graph
follow the mode the way the original model does:

* **leaf modules**: a module without parameters or buffers and without anything the passes
  quantize (Conv/Linear/matmul/attention, an Add of two tensors, a concatenation) whose trace
  differs between the modes (torchvision's ``StochasticDepth``, timm's ``DropPath``, a custom
  dropout) is not traced into: the graph calls it (:func:`keeps_mode_as_leaf`, used by the tracer's ``is_leaf_module``);
* **training flags**: a call whose arguments differ between the two traces only in booleans that
  are ``True`` in training mode and ``False`` in eval mode (``F.dropout(x, p, self.training)``,
  ``F.batch_norm(..., self.training)``, an fx-wrapped ``stochastic_depth(x, p, self.training)``)
  becomes a :class:`TrainingFlagCall` submodule that passes its own ``self.training`` there;
* anything else that differs (a Python branch on ``self.training`` in a module with weighted ops,
  a dropout probability chosen by the mode) keeps the mode the model had at compile, and the trace
  report names the module (``TraceReport.mode_fixed``): compile in the mode you will train in, or
  make that module a leaf (``tracing.leaf_modules``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .mode_call import TrainingFlagCall
from .queries import is_add, is_cat, weighted_kind

log = logging.getLogger(__name__)

# Calls the attention and MHA passes turn into quantized GEMMs: a module holding one is not made a leaf.
_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, F.multi_head_attention_forward}


class _ModeFlipped:
    """Context: ``module`` and all its submodules in training mode ``mode``; each one's own flag
    (a frozen BatchNorm in eval inside a training model) restored on exit."""

    def __init__(self, module: nn.Module, mode: bool) -> None:
        self.module, self.mode = module, mode
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.train(self.mode)

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _has_weighted_op(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ATTENTION_FUNCTIONS:
            return True
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.MultiheadAttention):
            return True
        residual = is_add(node) and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2  # not `p + rand()`
        if weighted_kind(gm, node) is not None or residual or is_cat(node):
            return True  # what the passes quantize (a residual Add, a concat) must stay in the graph
    return False


def keeps_mode_as_leaf(module: nn.Module, trace: Callable[[nn.Module], fx.Graph]) -> bool:
    """True for a module with no parameter, no buffer and nothing to quantize whose trace (by
    ``trace``) differs between training and eval mode: the graph should call it, not inline one
    mode of it. A module that cannot be traced on its own is traced into as before."""
    if type(module).__module__.startswith("torch.nn") or next(module.parameters(), None) is not None or \
            next(module.buffers(), None) is not None:
        return False
    graphs = []
    try:
        for mode in (True, False):
            with _ModeFlipped(module, mode):
                graph = trace(module)
            gm = fx.GraphModule(module, graph)
            if _has_weighted_op(gm):
                return False
            graphs.append(gm.code)
    except Exception:  # noqa: BLE001 - traced in its parent's context as before
        return False
    return graphs[0] != graphs[1]


@dataclass
class OtherMode:
    """The same module traced in the other mode: its graph and the tensor constants that trace
    made (``_tensor_constant<i>``, by name: the same names as the first trace's)."""

    graph: fx.Graph
    constants: dict[str, object]


def trace_both_modes(module: nn.Module, trace: Callable[[], fx.Graph]) -> tuple[fx.Graph, OtherMode | None]:
    """``trace()`` in the module's mode, and in the other one (None if that trace fails). Tensor
    constants torch.fx stores on ``module`` while tracing stay only from the first trace."""
    before = set(vars(module))
    graph = trace()
    first = {name: vars(module)[name] for name in set(vars(module)) - before}
    for name in first:  # the second trace then names its constants as the first did
        delattr(module, name)
    try:
        with _ModeFlipped(module, not module.training):
            other = trace()
    except Exception as exc:  # noqa: BLE001 - the model's own mode traced; nothing to compare
        log.debug("qatgraph: tracing %s in the other mode failed: %s", type(module).__name__, exc)
        other = None
    finally:
        second = {name: vars(module)[name] for name in set(vars(module)) - before - set(first)}
        second.update({name: getattr(module, name) for name in first if name in vars(module)})
        for name in second:
            delattr(module, name)
        for name, value in first.items():
            setattr(module, name, value)
    return graph, None if other is None else OtherMode(other, second)


def follow_training_flags(gm: fx.GraphModule, other: OtherMode | None, training: bool) -> list[str]:
    """Rewrite ``gm`` (traced in mode ``training``) against ``other`` (the same module traced in
    the other mode): calls that differ only in training-flag booleans become
    :class:`TrainingFlagCall` submodules. Returns the modules whose code still differs (from the
    nodes' ``nn_module_stack``), or ``["<whole graph>"]`` when the graphs do not line up."""
    if other is None:
        return []
    nodes, others = list(gm.graph.nodes), list(other.graph.nodes)
    if len(nodes) != len(others):
        return _differing_modules(nodes, others)
    fixed: list[str] = []
    rewrites: list[tuple[fx.Node, tuple[int | str, ...]]] = []
    for node, twin in zip(nodes, others):
        if (node.op, node.target, node.name) != (twin.op, twin.target, twin.name):
            return _differing_modules(nodes, others)
        if node.op == "get_attr" and not _same_constant(gm, node, other):
            fixed.append(_owner(node))
            continue
        if _named(node) == _named(twin):
            continue
        flags = _flag_positions(node, twin, training)
        if flags is None or node.op != "call_function":
            fixed.append(_owner(node))
        else:
            rewrites.append((node, flags))
    for node, flags in rewrites:
        name = _free_name(gm, f"{node.name}_mode")
        gm.add_submodule(name, TrainingFlagCall(node.target, flags))
        node.op, node.target = "call_module", name
    if rewrites:
        gm.recompile()
    return sorted(set(fixed))


def _same_constant(gm: fx.GraphModule, node: fx.Node, other: OtherMode) -> bool:
    """A tensor constant the other trace made holds the same value (parameters and buffers are
    shared by both traces)."""
    theirs = other.constants.get(str(node.target))
    if theirs is None:
        return True
    mine = getattr(gm, str(node.target), None)
    return isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and mine.shape == theirs.shape and \
        mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def _flag_positions(node: fx.Node, twin: fx.Node, training: bool) -> tuple[int | str, ...] | None:
    """Positions/keywords where ``node`` holds ``training`` and ``twin`` ``not training`` (both
    bools), if those are the only differences; else None."""
    (args, kwargs), (twin_args, twin_kwargs) = _named(node), _named(twin)
    if len(args) != len(twin_args) or kwargs.keys() != twin_kwargs.keys():
        return None
    flags: list[int | str] = []
    pairs = [(i, a, b) for i, (a, b) in enumerate(zip(args, twin_args))]
    pairs += [(k, kwargs[k], twin_kwargs[k]) for k in kwargs]
    for where, mine, theirs in pairs:
        if mine == theirs and type(mine) is type(theirs):
            continue
        if mine is training and theirs is (not training):
            flags.append(where)
        else:
            return None
    return tuple(flags)


def _named(node: fx.Node) -> tuple[tuple, dict]:
    """The node's arguments with other nodes replaced by their names (comparable across graphs)."""
    return fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{n.name}")


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else "<root>"


def _differing_modules(nodes: list[fx.Node], others: list[fx.Node]) -> list[str]:
    def signature(n: fx.Node) -> tuple:
        return n.op, str(n.target), _owner(n)
    mine, theirs = {signature(n) for n in nodes}, {signature(n) for n in others}
    return sorted({owner for _, _, owner in mine ^ theirs}) or ["<whole graph>"]


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name
