"""The quantized activations the parity check compares, captured and matched by identity.

Used by :mod:`qatgraph.backends.parity`. Three sides compute every quantized activation: the
trained QAT model (eval; its :class:`~qatgraph.quant.quantizer.FakeQuantizer` modules), its
export copy (``onnx_qdq.prepare_for_export``: BatchNorm folded, each activation quantizer a
:class:`~qatgraph.backends.onnx_qdq.QuantizeDequantize` under the same qualified name) and
ONNX Runtime (the ``DequantizeLinear`` after each activation ``QuantizeLinear``, which the
export tagged with that name: metadata ``qatgraph.activation_quantizers``).

Activations are matched by that name and, for a quantizer called more than once, by the order of
its calls, never by counting Q/DQ pairs: a quantizer whose output the exporter dropped as dead
code (an unused pooler), or one PyTorch did not call for these inputs, is simply not compared.
Files without tags (exported before) fall back to the scale initializer's name, then to position.

:func:`run_capturing` runs a PyTorch side with hooks that record each call (output, scale, the
input in steps before rounding, how much of the input was clipped) and can replace outputs
("teacher forcing"); :class:`OrtProbe` runs ONNX Runtime with every activation exposed;
:func:`compare_free` and :func:`compare_forced` measure integer differences and root flips;
:func:`amplification` measures how far a single one-step change travels in the trained model.
"""
from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from qatgraph.backends.onnx_postprocess import QUANTIZER_TAGS, quantizer_of
from qatgraph.backends.onnx_qdq import QuantizeDequantize
from qatgraph.backends.onnxruntime import OrtRunner
from qatgraph.quant.quantizer import FakeQuantizer


@dataclass
class Call:
    """One call of an activation quantizer (or its export stand-in): outputs in float64."""

    name: str
    order: int                   # position among all quantizer calls of the run
    value: np.ndarray            # the dequantized output
    scale: np.ndarray            # broadcastable to value
    codes: np.ndarray | None     # the input in steps before rounding (recorded when asked)
    clipped: float = 0.0         # fraction of the input outside the quantizer's range
    overflow: float = 0.0        # max |input| / clipping threshold


Captures = dict[str, list[Call]]  # quantizer name -> its calls, in call order


def trained_quantizer(module: nn.Module) -> bool:
    return isinstance(module, FakeQuantizer) and module.is_enabled and not module.is_weight


def export_quantizer(module: nn.Module) -> bool:
    return isinstance(module, QuantizeDequantize)


def _broadcast_scale(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    shape = [1] * output.dim()
    if module.axis is not None:
        shape[module.axis % output.dim()] = -1
    return module.scale.detach().double().reshape(shape).to(output.device)


def _range_use(module: nn.Module, x: torch.Tensor, scale: torch.Tensor) -> tuple[float, float]:
    """(fraction of x outside the range, max |x| / clipping threshold) for a quantizer's input."""
    zero_point = module.zero_point.detach().double().reshape(scale.shape).to(x.device)
    codes = torch.round(x.double() / scale) + zero_point
    clipped = float(((codes < module.qmin) | (codes > module.qmax)).double().mean())
    threshold = torch.maximum((module.qmax - zero_point).abs(), (module.qmin - zero_point).abs()) * scale
    return clipped, float((x.double().abs() / threshold).max())


def run_capturing(module: nn.Module, args: tuple, is_quantizer: Callable[[nn.Module], bool], *,
                  forced: dict[str, list[np.ndarray]] | None = None, codes: bool = False,
                  ranges: bool = False, perturb: tuple[str, int, int, float] | None = None
                  ) -> tuple[Captures, list[torch.Tensor], dict[int, float]]:
    """Run ``module(*args)`` without gradients, recording every call of the quantizers
    ``is_quantizer`` selects. ``forced``: per name, values that replace the outputs of its calls
    in order (a shape that differs is left alone). ``perturb``: (name, call, flat index, steps)
    adds that many steps to one element of one call's output. Returns (captures, the output's
    tensor leaves, {id(output tensor): its finest step} for quantizer outputs)."""
    calls: Captures = defaultdict(list)
    steps_of: dict[int, float] = {}
    keep_alive: list[torch.Tensor] = []  # ids of live tensors are not reused
    counter = [0]

    repeats: dict[tuple[str, int], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def hook_for(name: str):
        def hook(quantizer, inputs, output):
            earlier = repeats.get((name, id(inputs[0])))
            if earlier is not None and earlier[0] is inputs[0] and earlier[1] == inputs[0]._version:
                # One quantizer called again on the very same tensor (shared by module-wise layers of
                # untraced code): the export merges the two Q/DQ pairs into one, so this is that call.
                return earlier[2]
            scale = _broadcast_scale(quantizer, output)
            clipped, overflow = _range_use(quantizer, inputs[0].detach(), scale) if ranges else (0.0, 0.0)
            record = Call(name, counter[0], output.detach().double().cpu().numpy(), scale.cpu().numpy(),
                          (inputs[0].detach().double() / scale).cpu().numpy() if codes else None, clipped, overflow)
            index = len(calls[name])
            calls[name].append(record)
            counter[0] += 1
            replacement = None
            if forced is not None and index < len(forced.get(name, ())):
                candidate = forced[name][index]
                if candidate.shape == tuple(output.shape):
                    replacement = torch.from_numpy(candidate).to(device=output.device, dtype=output.dtype)
            if perturb is not None and perturb[:2] == (name, index):
                replacement = (output if replacement is None else replacement).clone()
                flat_scale = scale.expand(output.shape).reshape(-1)[perturb[2]]
                replacement.view(-1)[perturb[2]] += (perturb[3] * flat_scale).to(output.dtype)
            result = output if replacement is None else replacement
            repeats[(name, id(inputs[0]))] = (inputs[0], inputs[0]._version, result)
            keep_alive.append(result)
            steps_of[id(result)] = float(quantizer.scale.detach().min())
            return replacement
        return hook

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in module.named_modules() if is_quantizer(m)]
    try:
        with torch.no_grad():
            leaves = tree_leaves(module(*args))
    finally:
        for hook in hooks:
            hook.remove()
    return dict(calls), [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)], steps_of


def values_of(captures: Captures) -> dict[str, list[np.ndarray]]:
    return {name: [call.value for call in calls] for name, calls in captures.items()}


def in_order(captures: Captures) -> list[Call]:
    return sorted((call for calls in captures.values() for call in calls), key=lambda call: call.order)


# ---------------------------------------------------------------------------- ONNX Runtime
class OrtProbe:
    """ONNX Runtime on a copy of the model with every activation DequantizeLinear exposed as an
    output; ``probe(*batch)`` -> (the model's outputs, {quantizer name: [values in graph order]})."""

    def __init__(self, model_proto: onnx.ModelProto, optimization: str) -> None:
        probed = onnx.ModelProto()
        probed.CopyFrom(model_proto)
        self.num_outputs = len(probed.graph.output)
        self.exposed = activation_dequantizers(probed)  # [(DQ output, quantizer name or None)]
        known = {o.name for o in probed.graph.output}
        probed.graph.output.extend(onnx.ValueInfoProto(name=n) for n, _ in self.exposed if n not in known)
        self.runner = OrtRunner(probed, optimization=optimization, quantize_bias=False)
        self.index = {name: i for i, name in enumerate(self.runner.output_names)}
        self.identified = all(name is not None for _, name in self.exposed)

    def __call__(self, *batch) -> tuple[list[np.ndarray], list[tuple[str | None, np.ndarray]]]:
        outputs = self.runner(*batch)
        activations = [(name, outputs[self.index[dq]].astype(np.float64)) for dq, name in self.exposed]
        return outputs[: self.num_outputs], activations


def activation_dequantizers(model: onnx.ModelProto) -> list[tuple[str, str | None]]:
    """(output of the DequantizeLinear reading each activation QuantizeLinear, the quantizer's
    name or None), in graph order."""
    tags = next((json.loads(p.value) for p in model.metadata_props if p.key == QUANTIZER_TAGS), None)
    initializers = {init.name for init in model.graph.initializer}
    readers = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            readers.setdefault(node.input[0], node.output[0])
    exposed = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in readers and node.input[0] not in initializers:
            name = tags.get(node.output[0]) if tags is not None else quantizer_of(node, initializers, {})
            exposed.append((readers[node.output[0]], name))
    return exposed


def by_name(activations: list[tuple[str | None, np.ndarray]], reference: Captures) -> dict[str, list[np.ndarray]] | None:
    """ORT's activations grouped by quantizer name; unnamed ones (files exported before the tags)
    are aligned with ``reference``'s calls by position, or None when the counts differ."""
    if all(name is not None for name, _ in activations):
        grouped: dict[str, list[np.ndarray]] = defaultdict(list)
        for name, value in activations:
            grouped[name].append(value)
        return dict(grouped)
    ordered = in_order(reference)
    if len(ordered) != len(activations):
        return None
    grouped = defaultdict(list)
    for call, (_, value) in zip(ordered, activations):
        grouped[call.name].append(value)
    return dict(grouped)


# ---------------------------------------------------------------------------- comparisons
REPLAYS = 16  # root flips of one batch kept for the replay (each replay is one forward of the model)


@dataclass
class Differences:
    """Integer differences between two sides' activations (free-running) and the root flips of a
    teacher-forced run, accumulated over batches."""

    compared: int = 0
    mismatch: float = 0.0                      # worst fraction of differing integers in one activation
    max_steps: int = 0
    first_mismatch: str | None = None
    root_flips: int = 0
    root_flip_margin: float = 0.0              # the largest distance from a rounding tie among root flips
    first_far_flip: str | None = None          # the first quantizer with a root flip far from any tie
    # the root flips of one batch, up to REPLAYS: (name, call, flat index, +-1 step)
    flips: list = field(default_factory=list)
    forced_max_diff: float = 0.0               # |forced output - the other side's output|
    free_max_diff: float = 0.0                 # |export copy - this side| free-running, output
    matched: set = field(default_factory=set)


def _pairs(calls: list[Call], other: dict[str, list[np.ndarray]]):
    seen: dict[str, int] = defaultdict(int)
    for call in calls:
        index = seen[call.name]
        seen[call.name] += 1
        values = other.get(call.name, ())
        if index < len(values) and values[index].shape == call.value.shape:
            yield call, index, values[index]


def steps_apart(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.rint(np.abs(a.astype(np.float64) - b) / scale)


def compare_free(found: Differences, copy_calls: Captures, other: dict[str, list[np.ndarray]]) -> None:
    """Every matched activation, in steps: the export copy free-running vs the other side."""
    for call, _, value in _pairs(in_order(copy_calls), other):
        found.matched.add(call.name)
        found.compared += 1
        steps = steps_apart(value, call.value, call.scale)
        if steps.any() and found.first_mismatch is None:
            found.first_mismatch = call.name
        found.mismatch = max(found.mismatch, float(np.mean(steps > 0)))
        found.max_steps = max(found.max_steps, int(steps.max(initial=0)))


def compare_forced(found: Differences, forced_calls: Captures, other: dict[str, list[np.ndarray]],
                   tie_tolerance: float) -> None:
    """Root flips: integers the export copy, fed the other side's integers at every activation,
    still rounds differently; each with its distance from a rounding tie."""
    for call, index, value in _pairs(in_order(forced_calls), other):
        difference = value - call.value
        flipped = steps_apart(value, call.value, call.scale) > 0
        if not flipped.any():
            continue
        distance = np.abs(call.codes - np.floor(call.codes) - 0.5)[flipped]
        found.root_flips += int(flipped.sum())
        found.root_flip_margin = max(found.root_flip_margin, float(distance.max()))
        if found.first_far_flip is None and float(distance.max()) > tie_tolerance:
            found.first_far_flip = call.name
        for flat in np.flatnonzero(flipped.reshape(-1))[: max(REPLAYS - len(found.flips), 0)]:
            found.flips.append((call.name, index, int(flat), float(np.sign(difference.reshape(-1)[flat]))))


@dataclass
class Amplification:
    """How far one one-step change travels in the trained model alone (no second runtime)."""

    quantizer: str
    max_steps: int       # the largest integer change it causes in any later activation
    output_relative: float
    worst: str | None    # the activation where that largest change happens
    replayed: int = 1    # how many root flips were replayed, one at a time; this one moved the output most


def amplification(qmodel: nn.Module, args: tuple, flip: tuple[str, int, int, float], output_index: int,
                  baseline: Captures, baseline_output: np.ndarray) -> Amplification:
    """Replay one root flip (one integer, one step) in the trained model and measure what it moves."""
    perturbed, leaves, _ = run_capturing(qmodel, args, trained_quantizer, perturb=flip)
    worst_steps, worst = 0, None
    for call, _, value in _pairs(in_order(baseline), values_of(perturbed)):
        steps = int(steps_apart(value, call.value, call.scale).max(initial=0))
        if steps > worst_steps and call.name != flip[0]:
            worst_steps, worst = steps, call.name
    output = leaves[output_index].detach().double().cpu().numpy()
    scale = max(float(np.abs(baseline_output).max(initial=0.0)), 1e-30)
    return Amplification(flip[0], worst_steps, float(np.abs(output - baseline_output).max(initial=0.0)) / scale, worst)
