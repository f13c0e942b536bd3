"""``qatgraph.compile``: trace, then run the passes in one explicit order.

The order differs slightly from the product overview on purpose: every decision is an
annotation until ``materialize``, so the skip pass runs *before* the residual pass (a skipped
conv must not pull a quantizer onto its residual skip input), and one pass turns the final
annotations into modules:

    einsum → mha → attention → fuse → annotate → skip → residual → materialize → freeze (when the policy asks for it)

``einsum`` rewrites two-operand einsum GEMMs as matmul (passes/einsum.py); ``mha`` re-expresses ``nn.MultiheadAttention`` as functional Linears around an SDPA call
(passes/mha.py); ``attention`` decomposes ``scaled_dot_product_attention`` into matmul/softmax/matmul so that
annotate sees both attention GEMMs (passes/attention.py).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from qatgraph.graph.annotations import op_annotation
from qatgraph.graph.build import build_graph
from qatgraph.graph.reload import mark_compiled
from qatgraph.graph.sharing import analyse_untraced
from qatgraph.passes import (
    annotate,
    attention,
    einsum,
    freeze,
    fuse,
    materialize,
    mha,
    residual,
    skip,
)
from qatgraph.policy import Policy
from qatgraph.quant.first_batch import register_first_batch_hook
from qatgraph.quant.qmodules import op_kind, quantize_module
from qatgraph.quant.quantizer import FakeQuantizer
from qatgraph.quant.state_checks import install_state_checks

from .errors import QatgraphError, TraceError, UsageError, warn
from .info import CompileInfo, LayerDecision, keep_state_on_deepcopy

log = logging.getLogger(__name__)

GraphPass = Callable[[fx.GraphModule, Policy], fx.GraphModule]
PASSES: list[tuple[str, GraphPass]] = [
    ("einsum", einsum.run),
    ("mha", mha.run),
    ("attention", attention.run),
    ("fuse", fuse.run),
    ("annotate", annotate.run),
    ("skip", skip.run),
    ("residual", residual.run),
    ("materialize", materialize.run),
]


def compile(model: nn.Module, policy: Policy | str | dict | None = "tensorrt",
            example_inputs: Any = None) -> nn.Module:  # noqa: A001 - the public name users expect
    """Return a QAT copy of ``model`` quantized by ``policy`` (the original is not modified).

    ``policy`` is a preset name (``"tensorrt"``, ``"onnxruntime"``), a :class:`Policy`, a dict
    or a YAML path. ``example_inputs`` (a tensor, a tuple of forward's positional arguments or a
    dict of its keyword arguments, e.g. a tokenizer's output) enables shape-based decisions
    (tiny GEMMs, Linear-BN folding), lets ``tracing.frontend: auto`` export a model torch.fx
    cannot trace (qatgraph/graph/build.py), and, where code stays untraced, shares quantizers of
    one tensor. The result trains in any PyTorch loop; call :func:`qatgraph.calibrate` before
    training or evaluating it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qatgraph.compile expects an nn.Module, got {type(model).__name__}")
    _refuse_compiled(model)
    policy = Policy.from_any(policy)
    example_args, example_kwargs = _as_args(example_inputs)
    original_types = {name: type(m) for name, m in model.named_modules() if name}
    work = copy.deepcopy(model)
    was_training = work.training
    root, report = build_graph(work, policy, example_args, example_kwargs)
    regions = _graph_regions(root)
    if not regions and not _eager_layers(root, regions):
        raise TraceError("torch.fx could not trace any part of the model and it has no Conv/Linear layer to "
                         "quantize module-wise. " + "; ".join(u.describe() for u in report.untraced))
    if example_args is not None or example_kwargs:
        _propagate_shapes(root, regions, example_args or (), example_kwargs, model)
    decisions: list[LayerDecision] = []
    matmul_layers: dict[str, type] = {}
    for prefix, region in regions:
        for name, graph_pass in PASSES:
            log.debug("qatgraph: pass %s on %s", name, prefix or "<root>")
            graph_pass(region, policy)
        for node in region.graph.nodes:
            annotation = op_annotation(node)
            if annotation is not None:
                decisions.append(LayerDecision.from_annotation(annotation, region, node))
                if node.op != "call_module":  # functional ops: the type policy type rules see
                    matmul_layers[annotation.layer] = annotate.functional_type(node)
    decisions += _quantize_eager_layers(root, regions, policy, report)
    if not report.fully_traced or report.eager_layers:  # untraced code, or leaf modules' layers
        if example_args is not None or example_kwargs:
            decisions += _analyse_untraced(root, report, policy, example_args or (), example_kwargs)
        else:
            report.untraced_pending = True  # qatgraph.calibrate runs it on its first batch
    policy.check_rules_match(list(original_types) + list(matmul_layers), {**original_types, **matmul_layers})
    root.train(was_training)
    info = CompileInfo(policy=policy, trace_report=report, layers=decisions)
    mark_compiled(root)  # torch.load of a pickled whole model refuses, in words
    keep_state_on_deepcopy(root)
    install_state_checks(root)
    root.qatgraph_info = info
    root.trace_report = report
    freeze.apply(root, policy)
    if not any(d.quantized for d in decisions):
        warn("qatgraph.compile quantized no layer: the model has no Conv/ConvTranspose/Linear/matmul that the policy "
             "quantizes (see qatgraph.summary for why each was skipped). The model is returned unchanged in function.")
    return root


def _untraced_pending(model: nn.Module) -> bool:
    report = getattr(model, "trace_report", None)
    return report is not None and report.untraced_pending


def _analyse_untraced_on_first_batch(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What compile does with ``example_inputs`` for untraced code, done by ``qatgraph.calibrate``
    on its first batch when compile had none; returns what was found (the ranks must agree)."""
    report, info = model.trace_report, model.qatgraph_info
    info.layers += _analyse_untraced(model, report, info.policy, args, kwargs)
    controller = getattr(model, "qatgraph_freeze", None)
    if controller is not None:
        controller.add_float_weights(model)
        if report.eager_folded:  # the fold changed weights the controller snapshotted
            controller.refresh()
    log.info("qatgraph.calibrate: untraced code analysed on the first batch (%d quantizers shared, %d BatchNorms "
             "folded, %d float weighted ops)", len(report.shared_quantizers), len(report.eager_folded),
             len(report.eager_weighted))
    return (report.eager_adds, [op.name for op in report.eager_weighted], report.shared_quantizers,
            report.eager_folded)


def _analyse_untraced(model: nn.Module, report: Any, policy: Policy, args: tuple,
                      kwargs: dict[str, Any]) -> list[LayerDecision]:
    """graph/sharing.py's analysis of untraced code; returns the float rows of the weighted ops it found."""
    analyse_untraced(model, report, policy.bn == "fold", args, kwargs)
    return [LayerDecision.untraced(op) for op in report.eager_weighted]


register_first_batch_hook(_untraced_pending, _analyse_untraced_on_first_batch)


def _refuse_compiled(model: nn.Module) -> None:
    """A compiled model holds FakeQuantizers: compiling it again would quantize the quantizers."""
    name = next((name or "<root>" for name, m in model.named_modules() if isinstance(m, FakeQuantizer)), None)
    if name is not None or hasattr(model, "qatgraph_info"):
        where = f" (it contains the quantizer {name!r})" if name else ""
        raise UsageError(f"qatgraph.compile got a model that qatgraph already compiled{where}. Compile the original "
                         "float model instead, or keep using this one: it trains, calibrates and exports as it is "
                         "(to change its policy, compile the float model again with the new policy).")


def _as_args(example_inputs: Any) -> tuple[tuple | None, dict[str, Any]]:
    """(positional arguments or None, keyword arguments) of forward."""
    if example_inputs is None:
        return None, {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        return None, dict(example_inputs)
    raise TypeError("example_inputs must be a tensor, a tuple of forward's positional arguments or a dict of its "
                    f"keyword arguments (e.g. a tokenizer's output), not {type(example_inputs).__name__}")


def _graph_regions(root: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """Traced GraphModules (the root itself, or the largest traced submodules)."""
    if isinstance(root, fx.GraphModule) and root.meta.get("qatgraph_prefix", None) == "":
        return [("", root)]
    regions = []
    for name, module in root.named_modules():
        if isinstance(module, fx.GraphModule) and "qatgraph_prefix" in module.meta and \
                not any(name.startswith(p + ".") for p, _ in regions):
            regions.append((name, module))
    return regions


def _eager_layers(root: nn.Module, regions: Sequence[tuple[str, fx.GraphModule]]) -> list[tuple[str, nn.Module]]:
    """Conv/Linear layers no graph calls directly: outside every traced region, or inside a
    module the tracer kept as a leaf. They are quantized module-wise."""
    called = set()
    for prefix, region in regions:
        for node in region.graph.nodes:
            if node.op == "call_module":
                called.add(f"{prefix}.{node.target}" if prefix else str(node.target))
    region_names = {prefix for prefix, _ in regions}
    return [(name, module) for name, module in root.named_modules()
            if name and op_kind(module) is not None and name not in called and name not in region_names]


def _quantize_eager_layers(root: nn.Module, regions: Sequence[tuple[str, fx.GraphModule]], policy: Policy,
                           report: Any) -> list[LayerDecision]:
    """Module-wise quantization (weight + own input quantizer) for layers torch.fx did not reach."""
    decisions = []
    for name, module in _eager_layers(root, regions):
        kind = op_kind(module)
        resolved = policy.resolve(name, type(module))
        tiny = annotate.tiny_reason(kind, module, None, policy.min_channels)  # type: ignore[arg-type]
        if kind not in policy.quantize or resolved.skip_rule or tiny:
            why = ("skipped by " + resolved.skip_rule) if resolved.skip_rule else tiny or f"{kind} not in policy.quantize"
            decisions.append(LayerDecision(name, kind, type(module).__name__, False, why, eager=True))
            continue
        quantize_module(module, resolved.weight, name, input_spec=resolved.activation)
        report.eager_layers.append(name)
        decisions.append(LayerDecision(name, kind, type(module).__name__, True,
                                       "quantized module-wise (outside the traced graph)", eager=True,
                                       input_quantizers=[f"{name}.input_quantizer"]))
    return decisions


def _propagate_shapes(root: nn.Module, regions: Sequence[tuple[str, fx.GraphModule]], example_args: tuple,
                      example_kwargs: dict[str, Any], original: nn.Module) -> None:
    """Record tensor shapes on every node (``tensor_meta``) by running the example inputs."""
    captured: dict[str, tuple] = {}

    def capture(module: nn.Module, args: tuple, kwargs: dict, name: str) -> None:
        if name not in captured:
            captured[name] = _bind_placeholders(module, args, kwargs)

    hooks = [region.register_forward_pre_hook(
        lambda m, args, kwargs, _name=name: capture(m, args, kwargs, _name), with_kwargs=True)
        for name, region in regions]
    was_training = root.training
    root.eval()  # eval for both runs: batch-1 inputs must not trip BatchNorm, nor move its running statistics
    try:
        try:
            with torch.no_grad():
                root(*example_args, **example_kwargs)
        except Exception as exc:
            raise _blame(exc, original, example_args, example_kwargs) from exc
        finally:
            for hook in hooks:
                hook.remove()
        for name, region in regions:
            if captured.get(name) is not None:
                with torch.no_grad():
                    _ShapeProp(region).propagate(*captured[name])
    finally:
        root.train(was_training)


def _bind_placeholders(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """The call's arguments in placeholder order (None when keywords cannot be bound)."""
    if not kwargs:
        return tuple(args)
    nodes = [n for n in module.graph.nodes if n.op == "placeholder"]  # type: ignore[union-attr]
    placeholders = [str(n.target) for n in nodes]
    if any(p.startswith("*") for p in placeholders):
        return None
    values = {str(n.target): n.args[0] for n in nodes if n.args}  # defaults (graph/attention_calls.py)
    values.update(zip(placeholders, args))
    values.update(kwargs)
    if set(values) - set(placeholders) or set(placeholders) - set(values):
        return None
    return tuple(values[p] for p in placeholders)


def _blame(exc: Exception, original: nn.Module, args: tuple, kwargs: dict[str, Any]) -> QatgraphError:
    """The error for a failed example run: the user's inputs if the original model fails on them
    too, else qatgraph's traced model."""
    was_training = original.training
    original.eval()
    try:
        with torch.no_grad():
            original(*args, **kwargs)
    except Exception:  # noqa: BLE001 - any failure of the user's own model on the inputs
        return QatgraphError(f"running the model on example_inputs failed before quantization: {exc}. Pass "
                             "example_inputs that the model's forward accepts (a tensor, a tuple of positional "
                             "arguments or a dict of keyword arguments).")
    finally:
        original.train(was_training)
    return QatgraphError(f"the traced model fails on example_inputs where the original model runs ({type(exc).__name__}: "
                         f"{exc}): a qatgraph tracing defect, please report it. To work around it, mark the module "
                         "named in the traceback a leaf (policy tracing.leaf_modules) or set tracing.frontend: "
                         "export.")


class _ShapeProp(ShapeProp):
    """ShapeProp that binds a ``**kwargs`` placeholder to ``{}``: torch.fx's Interpreter gives every
    starred placeholder the leftover positional arguments as a list, and ``kwargs.get(...)`` then
    fails on models with a ``forward(self, x, **kwargs)``. Only positional example inputs are
    captured, so the keyword arguments are empty by construction."""

    def placeholder(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if str(target).startswith("**"):
            return {}
        return super().placeholder(target, args, kwargs)
