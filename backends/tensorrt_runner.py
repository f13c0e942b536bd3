"""Run a TensorRT engine on the GPU and compare it with ONNX Runtime (see backends/tensorrt.py).

Buffers are torch CUDA tensors (no pycuda dependency). ``tensorrt`` and CUDA are imported lazily.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qatgraph.backends.tensorrt_config import (
    _TRT_DTYPE_NAMES,
    _make_logger,
    _read_onnx,
    tensorrt_available,
)
from qatgraph.errors import BackendUnavailableError, ExportError


class EngineRunner:
    """Runs a serialized engine on the current CUDA device, using torch CUDA tensors as buffers."""

    def __init__(self, engine_path: str | os.PathLike):
        if not os.path.isfile(engine_path):
            raise ExportError(f"engine file {str(engine_path)!r} does not exist; build it with "
                              "qatgraph.backends.tensorrt.build_engine")
        ok, reason = tensorrt_available()
        if not ok:
            raise BackendUnavailableError(f"cannot run TensorRT engine {str(engine_path)!r}: {reason}")
        import tensorrt as trt
        self._trt_logger = _make_logger(trt, verbose=False)  # must outlive the engine
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise ExportError(f"could not load engine {str(engine_path)!r} (built by another "
                              f"TensorRT version or GPU?); rebuild it. Log:\n{self._trt_logger.tail()}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    def _torch_dtype(self, name: str):
        import torch
        return getattr(torch, _TRT_DTYPE_NAMES[self.engine.get_tensor_dtype(name).name])

    def __call__(self, *inputs) -> list[np.ndarray]:
        import torch
        if len(inputs) != len(self.input_names):
            raise ExportError(f"engine takes {len(self.input_names)} input(s) "
                              f"({', '.join(self.input_names)}), got {len(inputs)}")
        device = torch.device("cuda", torch.cuda.current_device())
        keep_alive = []
        for name, value in zip(self.input_names, inputs):
            tensor = torch.as_tensor(value).to(device, self._torch_dtype(name)).contiguous()
            keep_alive.append(tensor)  # TensorRT holds raw pointers: keep buffers until sync
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                allowed = self.engine.get_tensor_profile_shape(name, 0)
                raise ExportError(f"input {name!r} has shape {tuple(tensor.shape)}, outside the "
                                  f"engine's profile (min, opt, max) = {allowed}; rebuild with a "
                                  "wider min_batch/max_batch")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(dim < 0 for dim in shape):
                raise ExportError(f"output {name!r} has a data-dependent shape {shape}; "
                                  "EngineRunner supports shape-inferable outputs only")
            outputs.append(torch.empty(shape, dtype=self._torch_dtype(name), device=device))
            self.context.set_tensor_address(name, outputs[-1].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"TensorRT execution failed. Log:\n{self._trt_logger.tail()}")
        stream.synchronize()
        return [(out.float() if out.dtype == torch.bfloat16 else out).cpu().numpy() for out in outputs]


def _run_onnxruntime(onnx_path: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    # ORT refuses e.g. float64 for a float input: cast to the ONNX input types
    typed = {name: np.asarray(feeds[name], dtype=dtype)
             for name, dtype, _ in _read_onnx(onnx_path).inputs}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, typed)))


def _compare_outputs(reference: Mapping[str, np.ndarray],
                     candidate: Mapping[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Per output: max/mean |difference| and top-1 agreement (argmax over the last axis, rows are
    all other axes; None for outputs of rank < 2)."""
    report = {}
    for name, expected in reference.items():
        expected = np.asarray(expected, dtype=np.float64)
        actual = np.asarray(candidate[name], dtype=np.float64)
        if expected.shape != actual.shape:
            raise ExportError(f"output {name!r}: shapes differ, reference {expected.shape} vs "
                              f"engine {actual.shape}")
        diff, classes = np.abs(expected - actual), expected.shape[-1] if expected.ndim else 0
        top1 = float(np.mean(expected.reshape(-1, classes).argmax(-1) == actual.reshape(
            -1, classes).argmax(-1))) if expected.ndim >= 2 and expected.size else None
        report[name] = {"max_abs_diff": float(diff.max(initial=0.0)),
                        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                        "top1_agreement": top1}
    return report


def compare_with_onnxruntime(engine_path: str | os.PathLike, onnx_path: str | os.PathLike,
                             inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray]) -> dict:
    """Run the engine and ONNX Runtime (CPU) on the same inputs (positional in ONNX input order,
    or by name); returns ``{output: {max_abs_diff, mean_abs_diff, top1_agreement}}``."""
    runner = EngineRunner(engine_path)
    if not isinstance(inputs, Mapping):
        inputs = dict(zip([name for name, _, _ in _read_onnx(onnx_path).inputs], inputs))
    if missing := [name for name in runner.input_names if name not in inputs]:
        raise ExportError(f"no value for engine input(s) {missing}; given: {sorted(inputs)}")
    engine_outputs = runner(*[np.asarray(inputs[name]) for name in runner.input_names])
    reference = _run_onnxruntime(str(onnx_path), inputs)
    return _compare_outputs(reference, dict(zip(runner.output_names, engine_outputs)))
