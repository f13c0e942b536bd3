"""The parity verdict and how it reads: :class:`ParityReport`, built by :func:`verdict` from what
:mod:`qatgraph.backends.parity` measured (see that module for what is compared and why)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qatgraph.backends.parity_capture import Amplification, Differences
from qatgraph.errors import plural

if TYPE_CHECKING:
    from qatgraph.backends.parity import _Evidence


@dataclass(frozen=True)
class Tolerances:
    """``step``: output steps when an enabled quantizer makes the output; ``relative``: relative to
    max |output| otherwise; ``tie``: how close to a rounding tie a root flip must lie."""

    step: float = 1.0
    relative: float = 1e-4
    tie: float = 1e-3

    def close(self, diff: float, reference: float, output_step: float | None) -> tuple[bool, float | None, float]:
        """(within tolerance?, diff in output steps or None, relative diff)."""
        relative = diff / reference if reference > 0 else diff
        steps = diff / output_step if output_step else None
        return (steps <= self.step if steps is not None else relative <= self.relative), steps, relative

    def absolute(self, output_step: float | None, reference: float) -> float:
        return self.step * output_step if output_step else self.relative * reference


@dataclass
class Saturation:
    """The trained model's most clipped activation quantizer: how much of its input lies outside
    the range (``clipped``) and by how much at most (``overflow`` = max |x| / clipping threshold)."""

    quantizer: str
    clipped: float
    overflow: float


@dataclass
class ParityReport:
    """The trained QAT model vs ONNX Runtime on the same inputs (see :mod:`qatgraph.backends.parity`).

    Free-running, trained model vs ORT: ``max_abs_diff``, ``max_diff_in_steps`` (when an enabled
    quantizer makes the output, ``output_step``), ``relative_error`` (max |diff| / max |output|),
    ``top1_agreement`` (2-D outputs; ``top1_flips`` rows differ, ``top1_unexplained`` of them
    beyond what near-tie roundings explain). Runtime link, export copy vs ORT:
    ``activation_mismatch`` (largest fraction of differing integers in one activation),
    ``activation_max_steps``, ``first_mismatch``; teacher-forced: ``forced_relative_error`` /
    ``forced_diff_in_steps``, ``root_flips`` and ``root_flip_margin`` (their largest distance from
    a rounding tie, in steps). Export link, trained model vs its export copy in PyTorch:
    ``export_copy_relative_error`` (free-running), ``export_copy_forced_relative_error``,
    ``export_copy_root_flips``, ``export_copy_root_flip_margin``, ``export_copy_first_difference``.
    ``amplification``: the root flip (of the worst batch's, up to 16, each replayed alone in the
    trained model) that moves the output most; ``saturation``:
    its most clipped activation; ``baked_branches``: data-dependent branches the export kept one
    side of; ``reasons``: why it failed; ``explanation``: what the free-running difference is.

    ``strict_passed``: the free-running output differs by at most ``step_tolerance`` output steps
    (``relative_tolerance`` when the output is not quantized), and top-1 agrees on every row whose
    margin exceeds that tolerance. ``passed``: strict, or both links hold teacher-forced (each
    forced output within the tolerance, each root flip within ``tie_tolerance`` of a tie) and
    every top-1 flip is explained: the export computes what was trained, and the free-running
    differences are near-tie roundings carried forward by the model.
    """

    max_abs_diff: float
    max_diff_in_steps: float | None
    relative_error: float
    top1_agreement: float | None
    num_samples: int
    passed: bool
    output_step: float | None = None
    activation_mismatch: float | None = None
    activation_max_steps: int | None = None
    first_mismatch: str | None = None
    strict_passed: bool | None = None
    forced_relative_error: float | None = None
    forced_diff_in_steps: float | None = None
    root_flips: int | None = None
    root_flip_margin: float | None = None
    top1_flips: int | None = None
    top1_unexplained: int | None = None
    export_copy_relative_error: float | None = None
    export_copy_forced_relative_error: float | None = None
    export_copy_root_flips: int | None = None
    export_copy_root_flip_margin: float | None = None
    export_copy_first_difference: str | None = None
    amplification: Amplification | None = None
    saturation: Saturation | None = None
    baked_branches: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    explanation: str = ""

    def __str__(self) -> str:
        steps = f" ({self.max_diff_in_steps:.3g} output steps)" if self.max_diff_in_steps is not None else ""
        top1 = f", top-1 agreement {self.top1_agreement:.2%}" if self.top1_agreement is not None else ""
        verdict_text = "PASSED" if self.passed else "FAILED"
        if self.passed and self.strict_passed is False:
            verdict_text += " (teacher-forced)"
        text = (f"ORT parity {verdict_text} on {plural(self.num_samples, 'sample')}: max |diff| "
                f"{self.max_abs_diff:.3g}{steps}, relative {self.relative_error:.3g}{top1}")
        if self.activation_mismatch is not None:
            text += (f"; quantized activations: {self.activation_mismatch:.3%} of integers differ at worst, by at "
                     f"most {plural(self.activation_max_steps, 'step')}")
            text += f", first in {self.first_mismatch}" if self.first_mismatch else ""
        if self.forced_relative_error is not None:
            forced = (f"{self.forced_diff_in_steps:.3g} output steps" if self.forced_diff_in_steps is not None
                      else f"relative {self.forced_relative_error:.3g}")
            text += f"; teacher-forced: output {forced}, {plural(self.root_flips, 'root flip')}"
            text += f" within {self.root_flip_margin:.2g} step of a tie" if self.root_flips else ""
        if self.export_copy_forced_relative_error is not None:
            text += (f"; trained model vs export copy (PyTorch): output relative {self.export_copy_relative_error:.3g}, "
                     f"teacher-forced {self.export_copy_forced_relative_error:.3g}, "
                     f"{plural(self.export_copy_root_flips, 'root flip')}")
            text += f" within {self.export_copy_root_flip_margin:.2g} step of a tie" if self.export_copy_root_flips else ""
        if self.reasons:
            text += ". Why: " + "; ".join(self.reasons)
        text += "."
        if self.explanation:
            text += " " + self.explanation
        return text


def _link_ok(link: Differences | None, close: bool, tolerances: Tolerances) -> bool:
    return link is not None and link.compared > 0 and close and link.root_flip_margin <= tolerances.tie


def verdict(evidence: _Evidence, tolerances: Tolerances, replayed: Amplification | None,
            branches: Any = None) -> ParityReport:
    max_ref, step = evidence.max_ref, evidence.step
    close, steps, relative = tolerances.close(evidence.max_diff, max_ref, step)
    allowance = 2 * tolerances.absolute(step, max_ref)
    strict = close and all(margin <= allowance for margin in evidence.row_margins)
    top1 = (1.0 - evidence.top1_flips / evidence.rows) if evidence.rows else None
    runtime, export = evidence.runtime, evidence.export
    report = ParityReport(evidence.max_diff, steps, relative, top1, evidence.samples, strict, step,
                          strict_passed=strict, top1_flips=evidence.top1_flips if evidence.rows else None,
                          top1_unexplained=evidence.top1_unexplained if evidence.rows else None,
                          amplification=replayed, saturation=evidence.saturation,
                          baked_branches=_branches(branches))
    runtime_close = export_close = False
    if runtime is not None and runtime.compared:
        runtime_close, report.forced_diff_in_steps, report.forced_relative_error = tolerances.close(
            runtime.forced_max_diff, max_ref, step)
        report.activation_mismatch, report.activation_max_steps = runtime.mismatch, runtime.max_steps
        report.first_mismatch, report.root_flips, report.root_flip_margin = (
            runtime.first_mismatch, runtime.root_flips, runtime.root_flip_margin)
    if export is not None and export.compared:
        export_close, _, report.export_copy_forced_relative_error = tolerances.close(export.forced_max_diff, max_ref,
                                                                                     step)
        report.export_copy_relative_error = tolerances.close(export.free_max_diff, max_ref, step)[2]
        report.export_copy_root_flips, report.export_copy_root_flip_margin = export.root_flips, export.root_flip_margin
        report.export_copy_first_difference = export.first_far_flip or export.first_mismatch
    runtime_ok, export_ok = _link_ok(runtime, runtime_close, tolerances), _link_ok(export, export_close, tolerances)
    report.passed = strict or (runtime_ok and export_ok and evidence.top1_unexplained == 0)
    if not report.passed:
        report.reasons = _reasons(report, evidence, tolerances, close, runtime_ok, export_ok)
    elif not strict:
        report.explanation = _explanation(report)
    if report.saturation is not None and report.saturation.clipped >= 0.01 and not strict:
        report.explanation += (" " if report.explanation else "") + _saturation_note(report.saturation, replayed)
    return report


def _branches(value: Any) -> list[str]:
    import json

    try:
        return list(json.loads(value)) if value else []
    except (TypeError, ValueError):
        return [str(value)]


def _reasons(report: ParityReport, evidence: _Evidence, tolerances: Tolerances, close: bool, runtime_ok: bool,
             export_ok: bool) -> list[str]:
    reasons = []
    export, runtime = evidence.export, evidence.runtime
    if export is not None and export.compared and not export_ok:
        far = f", {export.root_flips} integer(s) up to {export.root_flip_margin:.2g} step from any tie, first in " \
              f"{export.first_far_flip}" if export.first_far_flip else ""
        reasons.append(f"the export copy computes something else than the trained model inside PyTorch (fed the "
                       f"trained model's integers, its output differs by {report.export_copy_forced_relative_error:.3g} "
                       f"relative{far}): the file does not hold the model that was trained")
    if runtime is not None and runtime.compared and not runtime_ok:
        far = f", root flips up to {runtime.root_flip_margin:.2g} step from any tie, first in {runtime.first_far_flip}" \
            if runtime.first_far_flip else ""
        reasons.append(f"ONNX Runtime computes something else than the export copy (fed ORT's integers, PyTorch's "
                       f"output differs by {report.forced_relative_error:.3g} relative{far})")
    if (runtime is None or not runtime.compared) and not close:
        reasons.append("the free-running output differs beyond the tolerance and the activations could not be "
                       "compared to tell why")
    if evidence.top1_unexplained:
        reasons.append(f"top-1 differs on {plural(evidence.top1_unexplained, 'row')} beyond what near-tie roundings "
                       "explain")
    if not reasons and not close:
        reasons.append("the free-running output differs beyond the tolerance")
    if report.baked_branches:
        reasons.append("the export kept only one branch of data-dependent code (" + "; ".join(report.baked_branches)
                       + "): inputs that take another branch compute something else in the file")
    return reasons


def _explanation(report: ParityReport) -> str:
    roundings = (report.root_flips or 0) + (report.export_copy_root_flips or 0)
    if roundings == 0 and not report.activation_mismatch:
        return ("The export computes what was trained: with its activation Q/DQ pairs kept apart, ONNX Runtime "
                "gives the same integers at every quantizer; the free-running difference comes from the session as "
                "given, whose fused integer kernels (MatMulIntegerToFloat, QLinearMatMul, QLinearConv) accumulate "
                "and rescale in another order and so round other near-ties.")
    text = (f"The export computes what was trained; the free-running difference comes from "
            f"{plural(roundings, 'rounding')} of values within "
            f"{max(report.root_flip_margin or 0.0, report.export_copy_root_flip_margin or 0.0):.2g} step of a tie "
            "(float summation order), carried forward by the model")
    amplified = report.amplification
    if amplified is not None:
        which = (f"of the {amplified.replayed} root flips replayed one at a time, the one at {amplified.quantizer}"
                 if amplified.replayed > 1 else f"one step at {amplified.quantizer}")
        text += (f": replayed in the trained model alone, {which} moves later integers by "
                 f"up to {plural(amplified.max_steps, 'step')}"
                 + (f" (in {amplified.worst})" if amplified.worst else "")
                 + f" and the output by {amplified.output_relative:.3g} relative")
    return text + "."


AMPLIFIED_STEPS = 8  # a replayed one-step change this large is worth explaining


def _saturation_note(saturation: Saturation, replayed: Amplification | None) -> str:
    text = (f"Its activations outgrew their calibrated ranges: {saturation.clipped:.1%} of {saturation.quantizer}'s "
            f"inputs are clipped (max |x| = {saturation.overflow:.1f}x its range)")
    if replayed is not None and replayed.max_steps >= AMPLIFIED_STEPS:
        text += ("; ranges that stayed fixed while training grew the activations are what makes one step grow this "
                 "much (measured: recalibrating examples/resnet_qat.py after QAT took the same replay from 127 to 4 "
                 "steps)")
    return text + ". Calibrate again after training (qatgraph.calibrate) or train with learnable scales."
