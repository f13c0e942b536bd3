"""``qatgraph.summary``: one table that makes every compile decision visible.

For each weighted layer: its type, its precision (INT8, INT4, W4A8, ... from the bits of its weight
and input quantizers) or floating point, the rule that decided it, its weight quantizer (bits,
granularity, amax range) and the activation quantizer(s) feeding it. Then the trace report (what
stayed eager and why) and the frozen set when EfQAT is on.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from torch import nn

from qatgraph.efqat.functional import display_name_of_quantizer
from qatgraph.quant.quantizer import FakeQuantizer

from .info import LayerDecision, compile_info


@dataclass
class SummaryRow:
    layer: str
    type_name: str
    status: str
    reason: str
    weight: str
    inputs: str
    frozen: str
    precision: str = ""  # INT8, INT4, W4A8, ... for quantized layers; "float" otherwise


@dataclass
class Summary:
    rows: list[SummaryRow]
    trace: str
    policy_name: str

    @property
    def quantized(self) -> list[str]:
        return [r.layer for r in self.rows if r.status == "INT"]

    def to_dict(self) -> dict:
        return {"policy": self.policy_name, "trace": self.trace, "layers": [r.__dict__ for r in self.rows]}

    def render(self, console_width: int = 160) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"qatgraph summary (policy {self.policy_name})", show_lines=False)
        for column in ("layer", "type", "status", "why", "weight", "input quantizer", "frozen"):
            table.add_column(column, overflow="fold")
        for row in self.rows:
            status = f"[green]{row.precision or 'INT8'}[/]" if row.status == "INT" else "[yellow]float[/]"
            table.add_row(row.layer, row.type_name, status, row.reason, row.weight, row.inputs, row.frozen)
        buffer = io.StringIO()
        console = Console(file=buffer, width=console_width, force_terminal=False, color_system=None)
        console.print(table)
        n_quantized = len(self.quantized)
        console.print(f"{n_quantized} of {len(self.rows)} weighted layers quantized. Tracing: {self.trace}")
        return buffer.getvalue()

    def __str__(self) -> str:
        return self.render()


def summary(model: nn.Module, *, print_table: bool = True) -> Summary:
    """Build (and by default print) the decision table of a compiled model."""
    info = compile_info(model)
    modules = dict(model.named_modules())
    controller = getattr(model, "qatgraph_freeze", None)
    frozen = controller.describe() if controller is not None else {}
    rows = [_row(decision, modules, _frozen(controller, frozen, decision)) for decision in info.layers]
    result = Summary(rows=rows, trace=_describe_trace(info.trace_report), policy_name=info.policy.name)
    if print_table:
        print(result.render())
    return result


def _frozen(controller, frozen: dict[str, str], decision: LayerDecision) -> str:
    """The EfQAT state of a layer; a functional op's is that of the parameter it reads (found by
    its weight quantizer's path: the ops of a packed in-projection read in slices share one)."""
    path = decision.functional_weight_quantizer
    if controller is not None and path is not None:
        state = controller.describe_weight(path) if decision.quantized else None
        if state is not None:
            return state
        return frozen.get(display_name_of_quantizer(path), frozen.get(decision.layer, ""))
    return frozen.get(decision.layer, "")


def _row(decision: LayerDecision, modules: dict[str, nn.Module], frozen: str) -> SummaryRow:
    weight = ""
    weight_quantizer = modules.get(decision.weight_quantizer or "")
    if isinstance(weight_quantizer, FakeQuantizer):
        weight = _describe(weight_quantizer)
    input_quantizers = [modules[name] for name in decision.input_quantizers if isinstance(modules.get(name), FakeQuantizer)]
    inputs = ", ".join(f"{name} ({_describe(modules[name])})" for name in decision.input_quantizers
                       if isinstance(modules.get(name), FakeQuantizer))
    precision = _precision(weight_quantizer if isinstance(weight_quantizer, FakeQuantizer) else None, input_quantizers)
    return SummaryRow(decision.layer, decision.type_name, "INT" if decision.quantized else "FP", decision.reason,
                      weight, inputs, frozen, precision if decision.quantized else "float")


def _precision(weight: FakeQuantizer | None, inputs: list[FakeQuantizer]) -> str:
    """``INT8`` when weight and inputs share a width, else ``W4A8`` and the like."""
    weight_bits = {weight.spec.bits} if weight is not None and weight.is_enabled else set()
    input_bits = {q.spec.bits for q in inputs if q.is_enabled}
    widths = weight_bits | input_bits
    if len(widths) == 1:
        return f"INT{widths.pop()}"
    if not widths:
        return "INT8"
    return "W{}A{}".format("/".join(map(str, sorted(weight_bits))) or "-", "/".join(map(str, sorted(input_bits))) or "-")


def _describe_trace(report) -> str:
    """The trace report, without "partially traced: nothing" when torch.fx traced no part at all."""
    text = report.describe()
    if not report.fully_traced and not report.traced:
        _, _, rest = text.partition("\n")
        text = "torch.fx traced no part of the model; its layers are quantized module-wise (eager)" + \
            (("\n" + rest) if rest else "")
    return text


def _describe(quantizer: FakeQuantizer) -> str:
    spec = quantizer.spec
    granularity = "per-ch" if quantizer.axis is not None else "per-t"
    if not quantizer.is_enabled:
        return f"int{spec.bits} {granularity} disabled"
    if not quantizer.is_calibrated:
        return f"int{spec.bits} {granularity} uncalibrated"
    amax = quantizer.amax()
    value = f"amax {amax.min():.3g}..{amax.max():.3g}" if amax.numel() > 1 else f"amax {amax.item():.3g}"
    return f"int{spec.bits} {granularity} {value}"
