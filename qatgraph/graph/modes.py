"""Keeping ``train()``/``eval()`` meaningful in a traced model.

torch.fx runs Python at trace time, so ``self.training`` becomes a constant of the graph: a model
traced in training mode would keep drawing dropout and stochastic-depth masks after ``eval()``
(in PyTorch and in the export), and one traced in eval mode would never drop again while it trains.
:func:`trace_both_modes` traces a module in its own mode and in the other one and makes the graph
follow the mode the way the original model does:

* **leaf modules**: a module without parameters or buffers and without a weighted op
  (Conv/Linear/matmul/attention) whose trace differs between the modes (torchvision's
  ``StochasticDepth``, timm's ``DropPath``, a custom dropout) is not traced into: the graph calls
  it (:func:`keeps_mode_as_leaf`, used by the tracer's ``is_leaf_module``);
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

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .mode_call import TrainingFlagCall
from .queries import weighted_kind

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
        if weighted_kind(gm, node) is not None:
            return True
    return False


def keeps_mode_as_leaf(module: nn.Module, trace: Callable[[nn.Module], fx.Graph]) -> bool:
    """True for a module with no parameter, no buffer and no weighted op whose trace (by
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


def trace_both_modes(module: nn.Module, trace: Callable[[], fx.Graph]) -> tuple[fx.Graph, fx.Graph | None]:
    """``trace()`` in the module's mode, and in the other one (None if that trace fails)."""
    graph = trace()
    try:
        with _ModeFlipped(module, not module.training):
            other = trace()
    except Exception as exc:  # noqa: BLE001 - the model's own mode traced; nothing to compare
        log.debug("qatgraph: tracing %s in the other mode failed: %s", type(module).__name__, exc)
        return graph, None
    return graph, other


def follow_training_flags(gm: fx.GraphModule, other: fx.Graph | None, training: bool) -> list[str]:
    """Rewrite ``gm`` (traced in mode ``training``) against ``other`` (the same module traced in
    the other mode): calls that differ only in training-flag booleans become
    :class:`TrainingFlagCall` submodules. Returns the modules whose code still differs (from the
    nodes' ``nn_module_stack``), or ``["<whole graph>"]`` when the graphs do not line up."""
    if other is None:
        return []
    nodes, others = list(gm.graph.nodes), list(other.nodes)
    if len(nodes) != len(others):
        return _differing_modules(nodes, others)
    fixed: list[str] = []
    rewrites: list[tuple[fx.Node, tuple[int | str, ...]]] = []
    for node, twin in zip(nodes, others):
        if (node.op, node.target, node.name) != (twin.op, twin.target, twin.name):
            return _differing_modules(nodes, others)
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
