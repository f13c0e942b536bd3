"""Run exported Q/DQ ONNX models with ONNX Runtime (the embedded default backend, CPU).

Expects an ONNX file from :func:`qatgraph.backends.onnx.export_onnx` (or any ONNX model).
Guarantees: :class:`OrtRunner` runs on the CPU execution provider unless told otherwise, says so
(a :class:`~qatgraph.errors.QatgraphWarning`) when a requested provider is not available here and
it runs on fewer, takes numpy arrays or torch tensors, and names the input when a shape or the
number of inputs does not fit the model. Unreadable ONNX files raise :class:`ExportError`. The parity check against the PyTorch QAT model lives in
:mod:`qatgraph.backends.parity`, which builds on this module.

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
from typing import Any

import numpy as np
import onnx
import torch

from qatgraph.backends.onnx_graph import load_onnx
from qatgraph.errors import (
    BackendUnavailableError,
    QatgraphError,
    UsageError,
    did_you_mean,
    warn,
)

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
                                            providers=_available_providers(ort, providers),
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
        for spec in self._inputs:
            self._check_shape(spec, feed[spec.name].shape)
        try:
            return self.session.run(None, feed)
        except (ValueError, RuntimeError) as exc:  # ORT's InvalidArgument/Fail derive from RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"ONNX Runtime could not run {self.path or 'the model'} on inputs of shape "
                             f"{', '.join(str(tuple(v.shape)) for v in feed.values())}: {first}") from None

    def _check_shape(self, spec, shape: tuple[int, ...]) -> None:
        expected = list(spec.shape or [])
        fits = len(expected) == len(shape) and all(not isinstance(e, int) or e == s for e, s in zip(expected, shape))
        if not fits:
            wanted = "(" + ", ".join(str(e) if isinstance(e, int) else str(e or "?") for e in expected) + ")"
            raise UsageError(f"OrtRunner({self.path or 'model'}): input {spec.name!r} has shape {tuple(shape)}, the "
                             f"model takes {wanted}; pass inputs of the shape the model was exported with")


def _available_providers(ort, requested: Sequence[str] | None) -> list[str]:
    """The requested execution providers this ONNX Runtime has; warns about the others (ORT would
    fall back to the CPU with only its own generic warning)."""
    requested = list(requested or ["CPUExecutionProvider"])
    available = set(ort.get_available_providers())
    usable = [p for p in requested if (p[0] if isinstance(p, tuple) else p) in available]
    missing = [p for p in requested if p not in usable]
    if missing:
        usable = usable or ["CPUExecutionProvider"]
        warn(f"OrtRunner: this ONNX Runtime ({ort.__version__}) has no {', '.join(map(str, missing))}; running on "
             f"{', '.join(map(str, usable))} instead (available: {', '.join(sorted(available))}). For the GPU, "
             "install onnxruntime-gpu in place of onnxruntime.")
    return usable


def _load(path: str | os.PathLike) -> onnx.ModelProto:
    return load_onnx(path)


def _as_numpy(value: Any, ort_type: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    wanted = _ORT_NUMPY_TYPES.get(ort_type)
    return np.ascontiguousarray(array.astype(wanted, copy=False) if wanted is not None else array)
