"""Run exported Q/DQ ONNX models with ONNX Runtime and check them against the PyTorch QAT model.

Expects an ONNX file from :func:`qatgraph.backends.onnx.export_onnx` (or any ONNX model for
:class:`OrtRunner`). Guarantees: :class:`OrtRunner` runs on the CPU execution provider unless
told otherwise and takes numpy arrays or torch tensors; :func:`check_parity` never modifies the
QAT model (it runs it in eval mode without gradients and restores its mode).

What parity means, measured (torch 2.13, onnxruntime 1.32, CPU). On models whose arithmetic
is exact in float32 (power-of-two scales, dyadic inputs and biases) ORT and PyTorch agree bit
for bit, ties included: both round half to even, so the Q/DQ graph computes what the fake-quant
model computes. On real models the two runtimes sum convolutions, GEMMs and LayerNorms in
different orders; a value within ~1e-7 of a rounding boundary then lands on the other side, one
quantized activation moves by one step, and downstream values near their own boundaries follow.
Zoo models, 64 samples, both presets: top-1 agrees on every sample; at worst 0.2-5.5% of one
tensor's integers differ, by 1-6 steps (ViT with the onnxruntime preset is the worst);
float outputs (the unquantized classifier heads) differ by 4e-4 .. 2.4e-2 relative. So the
strict criterion of :class:`ParityReport` (1e-4 relative) fails on deep float-output models for
reasons that are not export errors, while shallow blocks pass it whenever no flip occurs.
``activation_mismatch`` / ``activation_max_steps`` tell the two apart: an export bug (scale,
axis, zero point, folding) moves most integers by many steps.

ORT's default ``WeightBiasQuantization`` transformer rounds float Conv/Gemm biases to int32 at
scale s_x * s_w (neither PyTorch nor TensorRT does; it adds 1e-3 relative on resnet18_like and
13% on a 4-bit-activation block); it is what enables ORT's integer QLinearConv kernels, so
:class:`OrtRunner` keeps it by default and :func:`check_parity` disables it unless
``quantize_bias=True``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from qatgraph.backends import onnx_qdq
from qatgraph.errors import BackendUnavailableError, ExportError, QatgraphError, did_you_mean
from qatgraph.quantizer import FakeQuantizer, iter_quantizers

log = logging.getLogger(__name__)

OPTIMIZATIONS = ("auto", "disabled", "basic", "extended", "all")
BIAS_QUANTIZATION = "WeightBiasQuantization"  # ORT graph transformer that rounds float biases to int32
_LOW_BIT_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
_ORT_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailableError(f"onnxruntime cannot be imported ({exc}); install it with "
                                      "'pip install onnxruntime'") from None
    return onnxruntime


def _has_low_bit_qdq(model: onnx.ModelProto) -> bool:
    return any(init.data_type in _LOW_BIT_TYPES for init in model.graph.initializer)


class OrtRunner:
    """An ONNX Runtime session: ``runner(x)`` or ``runner(a, b)`` -> list of numpy outputs.

    ``optimization``: ``auto`` (``all``, or ``basic`` for models with INT4/UINT4 Q/DQ, whose
    QLinearConv fusion ONNX Runtime 1.32 rejects), ``disabled``, ``basic``, ``extended``,
    ``all``. ``quantize_bias``: keep ORT's ``WeightBiasQuantization`` (the default: it enables
    the integer QLinearConv kernels, 60 vs 83 ms for the U8S8 resnet18_like at batch 32 on one
    thread) or disable it to compute exactly what the Q/DQ graph says (parity checks).
    ``disabled_optimizers``: more ORT transformer names to skip (unknown names are ignored).
    """

    def __init__(self, path: str | os.PathLike | onnx.ModelProto, providers: Sequence[str] | None = None,
                 threads: int | None = None, *, optimization: str = "auto", quantize_bias: bool = True,
                 disabled_optimizers: Sequence[str] = ()) -> None:
        ort = _import_onnxruntime()
        if optimization not in OPTIMIZATIONS:
            raise QatgraphError(f"OrtRunner: unknown optimization {optimization!r}"
                                f"{did_you_mean(optimization, OPTIMIZATIONS)}; use one of {', '.join(OPTIMIZATIONS)}")
        model = path if isinstance(path, onnx.ModelProto) else _load(path)
        if optimization == "auto":
            optimization = "basic" if _has_low_bit_qdq(model) else "all"
        levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization]
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.path = None if isinstance(path, onnx.ModelProto) else os.fspath(path)
        self.optimization = optimization
        self.session = ort.InferenceSession(model.SerializeToString(), options,
                                            providers=list(providers or ["CPUExecutionProvider"]),
                                            disabled_optimizers=list(disabled_optimizers) +
                                            ([] if quantize_bias else [BIAS_QUANTIZATION]))
        self._inputs = self.session.get_inputs()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        if len(inputs) != len(self._inputs):
            raise QatgraphError(f"OrtRunner({self.path or 'model'}): got {len(inputs)} input(s), the model takes "
                                f"{len(self._inputs)}: {', '.join(self.input_names)}")
        feed = {spec.name: _as_numpy(value, spec.type) for spec, value in zip(self._inputs, inputs)}
        return self.session.run(None, feed)


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    if not os.path.isfile(path):
        raise ExportError(f"ONNX file {os.fspath(path)!r} does not exist; export the model first "
                          "(qatgraph.backends.onnx.export_onnx)")
    return onnx.load(os.fspath(path))


def _as_numpy(value: Any, ort_type: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    wanted = _ORT_NUMPY_TYPES.get(ort_type)
    return np.ascontiguousarray(array.astype(wanted, copy=False) if wanted is not None else array)


@dataclass
class ParityReport:
    """PyTorch fake-quant model vs ONNX Runtime on the same inputs (see the module docstring).

    ``passed``: top-1 agrees on every row (2-D outputs) and the output differs by at most one
    output quantization step, or by ``relative_error <= 1e-4`` when the output is not quantized
    (``output_step`` None). ``activation_mismatch``: the largest fraction of differing integers
    over all quantized activations; ``activation_max_steps``: the largest integer difference;
    ``first_mismatch``: the first quantizer (execution order) whose integers differ.
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

    def __str__(self) -> str:
        steps = f" ({self.max_diff_in_steps:.3g} output steps)" if self.max_diff_in_steps is not None else ""
        top1 = f", top-1 agreement {self.top1_agreement:.2%}" if self.top1_agreement is not None else ""
        text = (f"ORT parity {'PASSED' if self.passed else 'FAILED'} on {self.num_samples} samples: max |diff| "
                f"{self.max_abs_diff:.3g}{steps}, relative {self.relative_error:.3g}{top1}")
        if self.activation_mismatch is not None:
            text += (f"; quantized activations: {self.activation_mismatch:.3%} of integers differ at worst, by at "
                     f"most {self.activation_max_steps} step(s)")
            text += f", first in {self.first_mismatch}" if self.first_mismatch else ""
        return text


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


def _run_torch(model: nn.Module, args: tuple, output_index: int) -> tuple[np.ndarray, float | None]:
    """(output ``output_index`` as numpy, its quantization step if an enabled quantizer made it)."""
    produced: list[tuple[torch.Tensor, FakeQuantizer]] = []  # keeps outputs alive: ids are not reused

    def remember(module, _inputs, output):
        produced.append((output, module))

    hooks = [q.register_forward_hook(remember) for _, q in iter_quantizers(model) if q.is_enabled]
    try:
        output = tree_leaves(model(*args))[output_index]
    finally:
        for hook in hooks:
            hook.remove()
    quantizer = next((q for out, q in produced if out is output), None)
    step = float(quantizer.scale.detach().min()) if quantizer is not None else None  # per channel: finest step
    return output.detach().float().cpu().numpy(), step


def check_parity(qmodel: nn.Module, onnx_path: str | os.PathLike, inputs: Any, *, output_index: int = 0,
                 runner: OrtRunner | None = None, quantize_bias: bool = False, compare_activations: bool = True,
                 step_tolerance: float = 1.0, relative_tolerance: float = 1e-4) -> ParityReport:
    """Compare ``qmodel`` (eval, fake-quant) with ONNX Runtime on ``onnx_path`` over ``inputs``.

    ``runner`` reuses a session (``quantize_bias`` is then the runner's business).
    ``inputs``: a tensor or a tuple of forward's tensors (one batch), or a list of those.
    ``compare_activations`` also compares every quantized activation, in quantization steps,
    between ORT and the export-ready copy of ``qmodel`` (BN folded, as in the file).
    """
    batches = _batches(inputs)
    model_proto = _load(onnx_path)
    runner = runner or OrtRunner(model_proto, quantize_bias=quantize_bias)
    device = next((p.device for p in qmodel.parameters()), None)
    was_training = qmodel.training
    qmodel.eval()
    max_diff, max_ref, agree, rows, samples, step = 0.0, 0.0, 0, 0, 0, None
    try:
        for batch in batches:
            with torch.no_grad():
                reference, step = _run_torch(qmodel, _torch_args(batch, device), output_index)
            result = runner(*batch)[output_index].astype(np.float32)
            if result.shape != reference.shape:
                raise QatgraphError(f"check_parity: ONNX output {output_index} has shape {result.shape}, PyTorch "
                                    f"{reference.shape}; pass the output_index of the same tensor")
            max_diff = max(max_diff, float(np.abs(result - reference).max(initial=0.0)))
            max_ref = max(max_ref, float(np.abs(reference).max(initial=0.0)))
            samples += reference.shape[0] if reference.ndim else 1
            if reference.ndim == 2:
                agree += int((result.argmax(-1) == reference.argmax(-1)).sum())
                rows += reference.shape[0]
    finally:
        qmodel.train(was_training)
    activations = _compare_activations(qmodel, model_proto, runner, batches, device) if compare_activations \
        else (None, None, None)
    return _report(max_diff, max_ref, step, agree / rows if rows else None, samples, activations,
                   step_tolerance, relative_tolerance)


def _report(max_diff: float, max_ref: float, step: float | None, top1: float | None, samples: int,
            activations: tuple, step_tolerance: float, relative_tolerance: float) -> ParityReport:
    relative = max_diff / max_ref if max_ref > 0 else max_diff
    steps = max_diff / step if step else None
    close = steps <= step_tolerance if steps is not None else relative <= relative_tolerance
    passed = close and (top1 is None or top1 == 1.0)
    return ParityReport(max_diff, steps, relative, top1, samples, passed, step, *activations)


def _compare_activations(qmodel: nn.Module, model_proto: onnx.ModelProto, runner: OrtRunner, batches: list[tuple],
                         device: torch.device | None) -> tuple[float | None, int | None, str | None]:
    """Every quantized activation, in steps: ORT (the DequantizeLinear after each QuantizeLinear)
    vs the export-ready PyTorch copy. Both exporters emit nodes in execution order, so the i-th
    QuantizeLinear is the i-th Q/DQ call; shapes are checked, and a model that cannot be aligned
    reports None."""
    opset = max((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), default=17)
    module, _ = onnx_qdq.prepare_for_export(qmodel, opset)
    probed = onnx.ModelProto()
    probed.CopyFrom(model_proto)
    dequantized = _activation_dq_outputs(probed)
    known = {o.name for o in probed.graph.output}
    probed.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dequantized if name not in known)
    probe = OrtRunner(probed, optimization=runner.optimization, quantize_bias=False)
    index = {name: i for i, name in enumerate(probe.output_names)}
    worst_fraction, worst_steps, first = 0.0, 0, None
    for batch in batches:
        calls = _torch_qdq_outputs(module, _torch_args(batch, device))
        ort_outputs = probe(*batch)
        if len(calls) != len(dequantized):
            log.warning("check_parity: %d activation Q/DQ pairs in the ONNX but %d in PyTorch; activations not "
                        "compared", len(dequantized), len(calls))
            return None, None, None
        for (name, reference, step), tensor in zip(calls, dequantized):
            result = ort_outputs[index[tensor]]
            if result.shape != reference.shape:
                log.warning("check_parity: cannot align %s with ONNX tensor %s; activations not compared", name, tensor)
                return None, None, None
            steps = np.rint(np.abs(result.astype(np.float64) - reference) / step)
            if steps.any() and first is None:
                first = name
            worst_fraction = max(worst_fraction, float(np.mean(steps > 0)))
            worst_steps = max(worst_steps, int(steps.max(initial=0)))
    return worst_fraction, worst_steps, first


def _activation_dq_outputs(model: onnx.ModelProto) -> list[str]:
    """Output of the DequantizeLinear that reads each activation QuantizeLinear, in graph order."""
    readers = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            readers.setdefault(node.input[0], node.output[0])
    return [readers[n.output[0]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] in readers]


def _torch_qdq_outputs(module: nn.Module, args: tuple) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(Q/DQ module name, its float64 output, its scale broadcastable to the output) per call."""
    calls: list[tuple[str, np.ndarray, np.ndarray]] = []

    def record(name: str):
        def hook(qdq, _inputs, output):
            shape = [1] * output.dim()
            if qdq.axis is not None:
                shape[qdq.axis % output.dim()] = -1
            step = qdq.scale.detach().double().reshape(shape).cpu().numpy()
            calls.append((name, output.detach().double().cpu().numpy(), step))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in module.named_modules()
             if isinstance(m, onnx_qdq.QuantizeDequantize)]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return calls
