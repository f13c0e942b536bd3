"""Which quantizers belong to each layer, and turning a layer's quantizers off (skip).

A layer's quantizers are its weight quantizer, the activation quantizers feeding it, and the
residual-skip quantizer placed because of it. A shared quantizer (one tensor feeding several
layers) stays on while any still-quantized layer needs it — the same rule the skip pass applies
at compile time. Used by sensitivity analysis and by ``apply_skip``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from torch import fx, nn

from qatgraph.errors import SensitivityError, did_you_mean, listing
from qatgraph.graph.annotations import RESIDUAL_KEY
from qatgraph.info import CompileInfo
from qatgraph.passes.materialize import QUANTIZER_KEY
from qatgraph.quant.quantizer import FakeQuantizer, iter_quantizers

log = logging.getLogger(__name__)

Metric = Callable[[nn.Module], float]
__all__ = ["LayerQuantizers", "RankedLayers", "apply_skip", "layer_quantizers"]


class RankedLayers(Protocol):
    """What skipping reads of a sensitivity ranking (a :class:`~.report.SensitivityReport` has it)."""

    mode: str
    ranking: list[str]
    scores: dict[str, float | None]


# ------------------------------------------------------------------------------------- quantizer sets
@dataclass(frozen=True)

class LayerQuantizers:
    """Module paths of the quantizers one layer needs."""

    layer: str
    weight: str | None
    inputs: tuple[str, ...]
    residual: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*([self.weight] if self.weight else []), *self.inputs, *self.residual]))


def layer_quantizers(model: nn.Module) -> dict[str, LayerQuantizers]:
    """Every weighted layer of a compiled model -> the quantizers it needs (weight, inputs, residual skip)."""
    info = _compile_info(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    residual = _residual_quantizers(model)
    result = {}
    for decision in info.layers:
        # decision.weight_quantizer: <layer>.weight_quantizer, or the quantizer next to a functional op's weight
        weight = decision.weight_quantizer if isinstance(modules.get(decision.weight_quantizer or ""), FakeQuantizer) \
            else None
        inputs = tuple(n for n in decision.input_quantizers if isinstance(modules.get(n), FakeQuantizer))
        result[decision.layer] = LayerQuantizers(decision.layer, weight, inputs, tuple(residual.get(decision.layer, ())))
    return result


def _residual_quantizers(model: nn.Module) -> dict[str, list[str]]:
    """Main layer -> quantizers on the skip input of the residual Add it fuses into (passes/residual.py)."""
    found: dict[str, list[str]] = {}
    for module in model.modules():
        if not isinstance(module, fx.GraphModule) or "qatgraph_prefix" not in module.meta:
            continue
        prefix = module.meta["qatgraph_prefix"]
        for node in module.graph.nodes:
            decision = node.meta.get(RESIDUAL_KEY)
            skip_input = node.args[decision["skip_arg"]] if decision else None
            target = skip_input.meta.get(QUANTIZER_KEY) if isinstance(skip_input, fx.Node) else None
            if target:
                found.setdefault(decision["main_layer"], []).append(f"{prefix}.{target}" if prefix else target)
    return found


def _compile_info(model: nn.Module) -> CompileInfo:
    info = getattr(model, "qatgraph_info", None)
    if not isinstance(info, CompileInfo):
        raise SensitivityError(f"{type(model).__name__} was not produced by qatgraph.compile (it has no "
                               "qatgraph_info): run qmodel = qatgraph.compile(model, policy, example_inputs=...) and "
                               "qatgraph.calibrate(qmodel, batches) first, then analyse qmodel")
    return info


class _Probe:
    """Switches quantizer subsets on and off; ``restore()`` returns to the state found at construction."""

    def __init__(self, model: nn.Module) -> None:
        info = _compile_info(model)
        self.by_layer = layer_quantizers(model)
        self.layers = [d.layer for d in info.layers if d.quantized]
        if not self.layers:
            raise SensitivityError("the model has no quantized layer, so there is nothing to analyse: check "
                                   "qatgraph.summary(qmodel) for why each layer was left in floating point")
        self.modules = {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, FakeQuantizer)}
        self.initial = {id(m): m.is_enabled for m in self.modules.values()}
        uncalibrated = [n for n, q in iter_quantizers(model) if q.is_enabled and not q.is_calibrated]
        if uncalibrated:
            raise SensitivityError(f"quantizers {listing(uncalibrated, 5)} have no scale yet: run "
                                   "qatgraph.calibrate(qmodel, batches) before the sensitivity analysis")

    def shared(self, layer: str) -> list[str]:
        others = {n for other in self.layers if other != layer for n in self.by_layer[other].names}
        return [n for n in self.by_layer[layer].names if n in others]

    def enable_only(self, layer: str) -> None:
        wanted = {id(self.modules[n]) for n in self.by_layer[layer].names}
        for module in self.modules.values():
            module.enable(id(module) in wanted and self.initial[id(module)])

    def enable_all_but(self, skipped: Iterable[str]) -> None:
        skipped = set(skipped)
        needed = {n for layer in self.layers if layer not in skipped for n in self.by_layer[layer].names}
        off = {id(self.modules[n]) for layer in skipped for n in self.by_layer[layer].names if n not in needed}
        for module in self.modules.values():
            module.enable(self.initial[id(module)] and id(module) not in off)

    def disable_all(self) -> None:
        for module in self.modules.values():
            module.disable()

    def restore(self) -> None:
        for module in self.modules.values():
            module.enable(self.initial[id(module)])


# ------------------------------------------------------------------------------------- data and outputs

def apply_skip(qmodel: nn.Module, skip: Iterable[str], *, report: RankedLayers | None = None) -> list[str]:
    """Leave the ``skip`` layers in floating point: disable their weight quantizers and the input and
    residual quantizers no still-quantized layer needs; record it in ``qmodel.qatgraph_info`` (and
    its policy's skip list). Returns the skip list; ``Policy(skip=...)`` reproduces it in a fresh
    compile (exactly, except that a fresh compile may move a downsample block's residual quantizer)."""
    info = _compile_info(qmodel)
    skip = list(dict.fromkeys(skip))
    decisions = {d.layer: d for d in info.layers}
    for layer in skip:
        if layer not in decisions:
            raise SensitivityError(f"cannot skip {layer!r}: it is not a weighted layer of the model"
                                   f"{did_you_mean(layer, decisions)}. Layers are: {listing(decisions)}")
    by_layer = layer_quantizers(qmodel)
    modules = dict(qmodel.named_modules(remove_duplicate=False))
    needed = {n for d in info.layers if d.quantized and d.layer not in skip for n in by_layer[d.layer].names}
    for layer in skip:
        for name in by_layer[layer].names:
            if name not in needed:
                modules[name].disable()
        if decisions[layer].quantized:
            decisions[layer].quantized = False
            decisions[layer].reason = f"skipped by sensitivity analysis ({_why(report, layer)})"
        if layer not in info.policy.skip:
            info.policy.skip.append(layer)
    return skip


def _why(report: RankedLayers | None, layer: str) -> str:
    if report is None or layer not in report.ranking:
        return "requested skip list"
    score = report.scores.get(layer)
    shown = f", score {score:.3g}" if score is not None else ""
    return f"rank {report.ranking.index(layer) + 1} of {len(report.ranking)}, {report.mode} mode{shown}"


