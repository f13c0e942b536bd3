"""Parity of an exported Q/DQ ONNX model with the QAT model the user trained.

:func:`check_parity` never modifies the QAT model (it runs it in eval mode without gradients and
restores its mode). What ships must compute what was trained, so two links are checked:

* **export link** — the trained model (eval: ``bn: train`` BatchNorm uses its running statistics)
  against its export copy inside PyTorch (``onnx_qdq.prepare_for_export``: BN folded into the
  weights, weights as integers, quantizers as Q/DQ ops). Folding rescales each channel's weight
  scale, which is exact up to float rounding, so with the trained model's integers fed in at every
  activation the copy must reproduce the trained output, and any integer it still rounds
  differently must lie at a rounding tie. A state of another format, a wrong fold or a weight
  that moved shows up here, in PyTorch, before any runtime is involved;
* **runtime link** — the export copy against ONNX Runtime on the file: free-running (each
  runtime on its own) and teacher-forced (the copy fed ORT's integers at every activation Q/DQ).

Activations are matched by the quantizer they come from (``parity_capture``), so dead code the
exporter dropped and duplicated outputs do not stop the comparison. They come from a second
session of the file with every activation DequantizeLinear exposed as an output, which keeps ONNX
Runtime from fusing those Q/DQ pairs into integer kernels (MatMulIntegerToFloat, QLinearMatMul);
the free-running output difference is measured on the session as given (``runner``), whose fused
kernels accumulate in integers and so round other near-ties (on all-MiniLM-L6-v2 the two sessions
measured 0.0 % and 0.59 % against the same fake-quant output).

What parity means, measured (torch 2.13, onnxruntime 1.32, CPU). On models whose arithmetic is
exact in float32 (power-of-two scales, dyadic inputs and biases) ORT and PyTorch agree bit for
bit, ties included. On real models the runtimes sum in different orders (and the trained model
and its folded copy compute BN differently), so a value within ~1e-5 step of a rounding tie lands
on the other side: a root flip. The model then carries that one-step change forward; how far
depends on the model, not on the runtime. :class:`ParityReport` measures it: it replays the root
flips of the batch that differs most (up to 16), one at a time, in the trained model alone and
reports the one that moves the output most: how many steps it moves later activations and the
output. (One flip of several can carry the whole difference: on all-MiniLM-L6-v2, one of 6 root
flips, at a layer-3 V projection, alone moves the embedding 4.6 %, the other five move nothing.)
A model whose activations outgrew the ranges calibrated before QAT (the scales stay fixed while
BatchNorm gains grow) amplifies most: in ``examples/resnet_qat.py`` after QAT, one
step at the first quantizer became 127 steps and 3 % of the output in PyTorch alone, with 18-63 %
of some activations clipped; recalibrating after training brought the same replay to 4 steps.
Teacher-forced, every op agrees to <8e-7 relative on the test zoo and each root flip lies within
3.2e-5 step of a tie; an export bug leaves root flips far from ties or a forced output off.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qatgraph.backends import onnx_qdq
from qatgraph.backends.onnx import BAKED_BRANCHES
from qatgraph.backends.onnx_graph import load_onnx
from qatgraph.backends.onnxruntime import OrtRunner
from qatgraph.backends.parity_capture import (
    Amplification,
    Differences,
    OrtProbe,
    amplification,
    by_name,
    compare_forced,
    compare_free,
    export_quantizer,
    run_capturing,
    trained_quantizer,
    values_of,
)
from qatgraph.backends.parity_report import ParityReport, Saturation, Tolerances, verdict
from qatgraph.errors import QatgraphError, UsageError
from qatgraph.quant.calibrate import check_compiled

log = logging.getLogger(__name__)

__all__ = ["ParityReport", "check_parity"]


def _batches(inputs: Any) -> list[tuple]:
    """A tensor or tuple = one batch of forward arguments; a list = several batches."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    if isinstance(inputs, list) and inputs:
        return [b if isinstance(b, tuple) else (b,) for b in inputs]
    raise QatgraphError("check_parity: inputs must be a tensor, a tuple of forward's tensors (one batch) or a "
                        f"non-empty list of those (several batches), not {type(inputs).__name__}")


def _torch_args(batch: tuple, device: torch.device | None) -> tuple:
    tensors = [a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a)) for a in batch]
    return tuple((t.float() if t.is_floating_point() else t).to(device) for t in tensors)


@dataclass
class _Evidence:
    """Everything measured over the batches; turned into a ParityReport by ``parity_report.verdict``."""

    max_diff: float = 0.0          # trained vs ORT, free-running
    max_ref: float = 0.0
    step: float | None = None
    samples: int = 0
    rows: int = 0
    top1_flips: int = 0
    top1_unexplained: int = 0
    runtime: Differences | None = None   # export copy vs ORT
    export: Differences | None = None    # export copy vs the trained model
    saturation: Saturation | None = None
    replay: tuple | None = None          # (args, trained captures, trained output, its root flips): worst batch
    worst_batch_diff: float = -1.0
    row_margins: list = field(default_factory=list)  # trained top-1 margins of flipped rows (strict check)


def check_parity(qmodel: nn.Module, onnx_path: str | os.PathLike, inputs: Any, *, output_index: int = 0,
                 runner: OrtRunner | None = None, quantize_bias: bool = False, compare_activations: bool = True,
                 step_tolerance: float = 1.0, relative_tolerance: float = 1e-4,
                 tie_tolerance: float = 1e-3) -> ParityReport:
    """Compare the trained ``qmodel`` (eval, fake-quant) with ONNX Runtime on ``onnx_path``.

    ``inputs``: a tensor or a tuple of forward's tensors (one batch), or a list of those.
    ``runner`` reuses a session (``quantize_bias`` is then the runner's business).
    ``compare_activations`` also checks both links through the export copy, activation by
    activation (see the module docstring and :class:`ParityReport` for the criteria).
    """
    check_compiled(qmodel, "check_parity")
    batches = _batches(inputs)
    model_proto = load_onnx(onnx_path)
    runner = runner or OrtRunner(model_proto, quantize_bias=quantize_bias)
    tolerances = Tolerances(step_tolerance, relative_tolerance, tie_tolerance)
    device = next((p.device for p in qmodel.parameters()), None)
    opset = max((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), default=17)
    evidence = _Evidence()
    was_training = qmodel.training
    qmodel.eval()
    try:
        copy = onnx_qdq.prepare_for_export(qmodel, opset, _torch_args(batches[0], device))[0] \
            if compare_activations else None
        probe = OrtProbe(model_proto, runner.optimization) if copy is not None else None
        if probe is not None and not probe.exposed:
            copy = probe = None  # no activation Q/DQ in the file: nothing to match
        if copy is not None:
            evidence.runtime, evidence.export = Differences(), Differences()
        for number, batch in enumerate(batches, 1):
            _compare_batch(qmodel, copy, probe, runner, batch, number, device, output_index, tolerances, evidence)
    finally:
        qmodel.train(was_training)
    strictly_close = tolerances.close(evidence.max_diff, evidence.max_ref, evidence.step)[0]
    replayed = None if strictly_close else _replay(qmodel, evidence, output_index)
    branches = next((p.value for p in model_proto.metadata_props if p.key == BAKED_BRANCHES), None)
    return verdict(evidence, tolerances, replayed, branches)


def _run_trained(qmodel: nn.Module, args: tuple, number: int):
    try:
        return run_capturing(qmodel, args, trained_quantizer, ranges=True)
    except QatgraphError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model on the user's inputs: say which batch and what it held
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"check_parity: running the model on batch {number} (shape {shapes}) failed: "
                         f"{type(exc).__name__}: {first}. Pass inputs of the shape the model was compiled for.") \
            from None


def _compare_batch(qmodel, copy, probe, runner, batch, number, device, output_index, tolerances, evidence) -> None:
    args = _torch_args(batch, device)
    trained_calls, trained_leaves, steps_of = _run_trained(qmodel, args, number)
    trained_tensor = trained_leaves[output_index]
    reference = trained_tensor.detach().double().cpu().numpy()
    evidence.step = steps_of.get(id(trained_tensor), evidence.step)
    # The output as the session computes it; the activations (and the output the teacher-forced run
    # is held against) from the probe, whose exposed Q/DQ outputs keep ONNX Runtime from fusing
    # them into integer kernels (MatMulIntegerToFloat, QLinearMatMul), which round differently.
    outputs = runner(*batch)
    probed, activations = probe(*batch) if probe is not None else (outputs, [])
    result = outputs[output_index].astype(np.float64)
    probed_result = probed[output_index].astype(np.float64)
    if result.shape != reference.shape:
        raise QatgraphError(f"check_parity: ONNX output {output_index} has shape {result.shape}, PyTorch "
                            f"{reference.shape}; pass the output_index of the same tensor")
    difference = float(np.abs(result - reference).max(initial=0.0))
    evidence.max_diff = max(evidence.max_diff, difference)
    evidence.max_ref = max(evidence.max_ref, float(np.abs(reference).max(initial=0.0)))
    evidence.samples += reference.shape[0] if reference.ndim else 1
    _saturation(evidence, trained_calls)
    forced_ort, flips = None, []
    if copy is not None:
        if evidence.runtime is not None:
            evidence.runtime.flips = []  # this batch's root flips, for the replay
        forced_ort = _compare_links(copy, args, trained_calls, reference, activations, probed_result, output_index,
                                    tolerances, evidence)
        if evidence.runtime is not None:
            flips = evidence.runtime.flips
    if reference.ndim == 2:
        _top1(evidence, reference, result, forced_ort, tolerances, probed_result)
    if flips and difference > evidence.worst_batch_diff:
        evidence.worst_batch_diff = difference
        evidence.replay = (args, trained_calls, reference, flips)


def _compare_links(copy, args, trained_calls, reference, activations, result, output_index, tolerances,
                   evidence) -> np.ndarray | None:
    """Both teacher-forced links for one batch; returns the copy's output on ORT's integers."""
    copy_calls, copy_leaves, _ = run_capturing(copy, args, export_quantizer)
    ort_values = by_name(activations, copy_calls)
    trained_values = values_of(trained_calls)
    export, runtime = evidence.export, evidence.runtime
    compare_free(export, copy_calls, trained_values)
    copy_output = copy_leaves[output_index].detach().double().cpu().numpy()
    export.free_max_diff = max(export.free_max_diff, float(np.abs(copy_output - reference).max(initial=0.0)))
    forced_calls, forced_leaves, _ = run_capturing(copy, args, export_quantizer, forced=trained_values, codes=True)
    compare_forced(export, forced_calls, trained_values, tolerances.tie)
    forced = forced_leaves[output_index].detach().double().cpu().numpy()
    export.forced_max_diff = max(export.forced_max_diff, float(np.abs(forced - reference).max(initial=0.0)))
    if ort_values is None:
        log.warning("check_parity: the ONNX file's activation Q/DQ carry no quantizer names and their number differs "
                    "from PyTorch's; activations not compared with ONNX Runtime (export the model again)")
        evidence.runtime = None
        return None
    if runtime is None:
        return None
    compare_free(runtime, copy_calls, ort_values)
    forced_calls, forced_leaves, _ = run_capturing(copy, args, export_quantizer, forced=ort_values, codes=True)
    compare_forced(runtime, forced_calls, ort_values, tolerances.tie)
    forced = forced_leaves[output_index].detach().double().cpu().numpy()
    runtime.forced_max_diff = max(runtime.forced_max_diff, float(np.abs(result - forced).max(initial=0.0)))
    return forced


def _top1(evidence: _Evidence, reference: np.ndarray, result: np.ndarray, forced_ort: np.ndarray | None,
          tolerances: Tolerances, probed: np.ndarray | None = None) -> None:
    """Rows whose top-1 differs; a flip is explained when PyTorch, fed ORT's integers, ranks ORT's
    class at least as high as the trained model's top-1 (up to the forced tolerance): the decision
    then comes from the integers, i.e. from near-tie roundings, not from an op. The integers are the
    probe's; where the session as given (its integer kernels) and the probe rank the row
    differently, ONNX Runtime itself sits at a tie there, which explains the flip too."""
    trained_top, ort_top = reference.argmax(-1), result.argmax(-1)
    evidence.rows += reference.shape[0]
    for row in np.flatnonzero(trained_top != ort_top):
        evidence.top1_flips += 1
        t, o = trained_top[row], ort_top[row]
        evidence.row_margins.append(float(reference[row, t] - reference[row, o]))
        allowance = 2 * tolerances.absolute(evidence.step, evidence.max_ref)
        explained = forced_ort is not None and forced_ort[row, o] >= forced_ort[row, t] - allowance
        explained = explained or (forced_ort is not None and probed is not None and probed[row].argmax() != o)
        evidence.top1_unexplained += 0 if explained else 1


def _saturation(evidence: _Evidence, trained_calls) -> None:
    worst = max((call for calls in trained_calls.values() for call in calls), key=lambda c: c.clipped, default=None)
    if worst is not None and (evidence.saturation is None or worst.clipped > evidence.saturation.clipped):
        evidence.saturation = Saturation(worst.name, worst.clipped, worst.overflow)


def _replay(qmodel: nn.Module, evidence: _Evidence, output_index: int) -> Amplification | None:
    """Replay each root flip of the batch that differs most, one at a time, in the trained model
    alone; the one that moves the output most (then later integers) is the answer."""
    if evidence.replay is None or evidence.max_diff == 0.0:
        return None
    args, trained_calls, reference, flips = evidence.replay
    was_training = qmodel.training
    qmodel.eval()
    try:
        replays = [amplification(qmodel, args, flip, output_index, trained_calls, reference) for flip in flips]
    finally:
        qmodel.train(was_training)
    worst = max(replays, key=lambda found: (found.output_relative, found.max_steps))
    worst.replayed = len(replays)
    return worst
