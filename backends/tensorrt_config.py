"""TensorRT build inputs shared by the builder, the trtexec fallback and the runner.

Importing TensorRT lazily (:func:`tensorrt_available`), the build options
(:class:`EngineBuildConfig`) and result (:class:`EngineInfo`), what the ONNX file's inputs are and
the optimization profiles they need, atomic replacement of output files, and a TensorRT logger
that forwards to :mod:`logging`. The users of this module are :mod:`.tensorrt` (the Python-API
builder), :mod:`.tensorrt_trtexec` and :mod:`.tensorrt_runner`; it imports none of them.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from qatgraph.atomic_files import atomic_path, write_bytes
from qatgraph.errors import ExportError, did_you_mean

logger = logging.getLogger("qatgraph.backends.tensorrt")  # one logger for the whole builder

INSTALL_HINT = "pip install 'qatgraph[tensorrt]'"
TensorSpec = tuple[str, str, tuple[int, ...]]  # (name, dtype, shape with -1 for dynamic dims)

# TensorRT DataType member names -> numpy/torch dtype names.
_TRT_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8",
                    "UINT8": "uint8", "INT32": "int32", "INT64": "int64", "BOOL": "bool",
                    "FP8": "float8_e4m3fn", "INT4": "int4"}
_ONNX_DTYPE_FIXES = {"float": "float32", "double": "float64"}


@dataclass
class EngineBuildConfig:
    """How to build an engine. ``fp16_fallback`` only applies to weakly typed networks
    (``strongly_typed=False``, TensorRT 10 only); strongly typed networks take every precision
    from the ONNX."""
    workspace_gib: float = 4.0
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    timing_cache: str | None = None
    strongly_typed: bool = True
    fp16_fallback: bool = False
    builder_optimization_level: int | None = None
    verbose: bool = False


@dataclass
class EngineInfo:
    """What was built, by which builder, and how long it took."""
    engine_path: str
    builder: str  # 'python' or 'trtexec'
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    build_seconds: float = 0.0
    trt_version: str = "unknown"


@dataclass
class _OnnxSummary:
    inputs: list[tuple[str, str, list[int | str | None] | None]]  # dim: int, dim_param or None
    outputs: list[TensorSpec]
    node_names: list[str]
    node_ops: list[str]
    has_qdq: bool


def _import_tensorrt() -> tuple[Any | None, str]:
    """(module, "") or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("tensorrt"), ""
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            return None, f"python package 'tensorrt' is not installed ({INSTALL_HINT})"
        return None, f"python package 'tensorrt' failed to import: {exc}"
    except Exception as exc:  # a missing libnvinfer.so raises OSError, not ImportError
        return None, (f"python package 'tensorrt' is installed but failed to import ({exc}); "
                      "check that the TensorRT libraries match your CUDA driver")


def tensorrt_available() -> tuple[bool, str]:
    """Whether engines can be built *and* run here; when not, the precise reason."""
    trt, reason = _import_tensorrt()
    if trt is None:
        return False, reason
    import torch
    if not torch.cuda.is_available():
        why = ("torch is a CPU-only build; EngineRunner needs a CUDA build" if torch.version.cuda
               is None else "torch.cuda.is_available() is False; check nvidia-smi and "
               "CUDA_VISIBLE_DEVICES")
        return False, f"no CUDA GPU visible ({why})"
    return True, ""


def _read_onnx(onnx_path: str | os.PathLike) -> _OnnxSummary:
    import onnx
    if not os.path.isfile(onnx_path):
        raise ExportError(f"ONNX file {str(onnx_path)!r} does not exist; export the model first")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def describe(value_info) -> tuple[str, str, list[int | str | None] | None]:
        tensor_type = value_info.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tensor_type.shape.dim] if tensor_type.HasField("shape") else None
        return value_info.name, _ONNX_DTYPE_FIXES.get(dtype, dtype), dims

    inputs = [describe(vi) for vi in graph.input if vi.name not in initializers]
    ops = [node.op_type for node in graph.node]
    return _OnnxSummary(inputs, [_static(describe(vi)) for vi in graph.output],
                        [node.name for node in graph.node], ops,
                        has_qdq=bool({"QuantizeLinear", "DequantizeLinear"} & set(ops)))


def _static(spec) -> TensorSpec:
    """(name, dtype, dims) -> (name, dtype, shape) with -1 for dynamic dims."""
    name, dtype, dims = spec
    return name, dtype, tuple(d if isinstance(d, int) else -1 for d in dims or ())


def _profile_shapes(summary: _OnnxSummary, config: EngineBuildConfig,
                    onnx_path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], ...]]:
    """name -> (min, opt, max) shapes for inputs with a dynamic batch dim; static inputs omitted."""
    profiles = {}
    for name, _, dims in summary.inputs:
        if dims is None:
            raise ExportError(f"input {name!r} of {str(onnx_path)!r} has no shape (unknown rank); "
                              "export with an example input so the ONNX records input shapes")
        for index, dim in enumerate(dims[1:], start=1):
            if not isinstance(dim, int):
                label = f"{dim!r}" if dim else "unnamed"
                raise ExportError(
                    f"input {name!r} of {str(onnx_path)!r} has a dynamic dim {index} ({label}); "
                    "only dim 0 (batch) may be dynamic for a TensorRT build. Re-export with a fixed "
                    "size for that dim (dynamic_axes={'" + name + "': {0: 'batch'}} only), "
                    "or fix it with onnx.tools.update_model_dims.")
        if dims and not isinstance(dims[0], int):
            rest = tuple(dims[1:])
            profiles[name] = tuple((batch, *rest) for batch in
                                   (config.min_batch, config.opt_batch, config.max_batch))
    return profiles


def _resolve_config(config: EngineBuildConfig | None, overrides: dict[str, Any]) -> EngineBuildConfig:
    config = config or EngineBuildConfig()
    known = [f.name for f in dataclasses.fields(EngineBuildConfig)]
    for key in overrides:
        if key not in known:
            raise ExportError(f"unknown engine build option {key!r}{did_you_mean(key, known)}; "
                              f"EngineBuildConfig fields are: {', '.join(known)}")
    config = dataclasses.replace(config, **overrides)
    if not 1 <= config.min_batch <= config.opt_batch <= config.max_batch:
        raise ExportError(f"batch range must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                          f"{config.min_batch}, {config.opt_batch}, {config.max_batch}")
    if config.workspace_gib * 1024 < 1:
        raise ExportError(f"workspace_gib={config.workspace_gib} is below 1 MiB; use e.g. 4.0")
    if config.fp16_fallback and config.strongly_typed:
        raise ExportError("fp16_fallback=True needs strongly_typed=False: a strongly typed network "
                          "takes FP16 only from FP16 tensors in the ONNX. Set strongly_typed=False "
                          "(TensorRT 10) or export the float parts in FP16.")
    return config


def _replacing(path: str):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds
    (qatgraph's shared atomic writer: ordinary permissions, the temporary file never outlives it)."""
    return atomic_path(path, "engine")


def _atomic_write(path: str, data) -> None:
    write_bytes(path, data, "engine")  # IHostMemory exposes the buffer protocol


def _make_logger(trt, verbose: bool):
    """A trt.ILogger that forwards to `logging` and keeps the last messages for error reports."""
    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # required by the bindings for Python subclasses
            self.messages: collections.deque[str] = collections.deque(maxlen=200)

        def log(self, severity, msg):
            name = getattr(severity, "name", str(severity))
            if name == "VERBOSE" and not verbose:
                return
            self.messages.append(f"[{name}] {msg}")
            level = {"INTERNAL_ERROR": logging.ERROR, "ERROR": logging.ERROR,
                     "WARNING": logging.WARNING, "INFO": logging.INFO}.get(name, logging.DEBUG)
            logger.log(level, "TensorRT: %s", msg)

        def tail(self, count: int = 40) -> str:
            return "\n".join(list(self.messages)[-count:])
    return CapturingLogger()
