"""TensorRT backend: build an engine from a Q/DQ ONNX file, run it, compare it with ONNX Runtime.

Expects an ONNX file from :mod:`qatgraph.backends.onnx` (explicit quantization: Q/DQ, opset >= 13)
whose inputs are static except, optionally, dim 0 (the batch). Guarantees:
- :func:`build_engine` uses the TensorRT Python API when ``import tensorrt`` works, else the
  ``trtexec`` binary ($TRTEXEC or PATH), else raises :class:`BackendUnavailableError` naming both.
- Networks are strongly typed by default: precision comes from the ONNX Q/DQ nodes and tensor
  types, so no INT8/FP16 builder flag is set (TensorRT rejects them on strongly typed networks;
  TensorRT 11 builds nothing else). No INT8 calibrator is ever used (deprecated; the scales are
  already in the Q/DQ nodes). EXPLICIT_BATCH is not passed: TensorRT 10 ignores it.
- Each input with a dynamic dim 0 gets one optimization-profile entry (min, opt, max batch); any
  other dynamic dim is an error naming the input and the dim.
- Engine and timing cache are written atomically (temporary file in the same directory, then
  os.replace), so a failed build never clobbers a good engine.
``tensorrt`` and ``torch.cuda`` are used lazily: this module imports on machines without them.
The trtexec fallback is in backends/tensorrt_trtexec.py, :class:`EngineRunner` and
:func:`compare_with_onnxruntime` in backends/tensorrt_runner.py; both are importable from here.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from qatgraph.errors import BackendUnavailableError, ExportError, did_you_mean

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def _replacing(path: str):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.
    Same directory, so os.replace is an atomic rename; the temporary file never outlives the block."""
    fd, partial = tempfile.mkstemp(dir=os.path.dirname(path) or ".",
                                   prefix=f".{os.path.basename(path)}.", suffix=".partial")
    os.close(fd)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _atomic_write(path: str, data) -> None:
    with _replacing(path) as partial:
        Path(partial).write_bytes(memoryview(data))  # IHostMemory exposes the buffer protocol


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


def _parser_errors(parser, summary: _OnnxSummary) -> str:
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        # node_name()/node_operator() exist from TensorRT 10; older: look the index up in the ONNX
        name, op = (summary.node_names[node], summary.node_ops[node]) \
            if 0 <= node < len(summary.node_names) else ("", "")
        name = error.node_name() if hasattr(error, "node_name") else name
        op = error.node_operator() if hasattr(error, "node_operator") else op
        where = f"node {node} {name!r} ({op})" if node >= 0 else "graph"
        lines.append(f"  {where}: {error.code()}: {error.desc()}")
    return "\n".join(lines)


def _configure(trt, builder, build_config, config: EngineBuildConfig, summary, profiles) -> None:
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                       int(config.workspace_gib * (1 << 30)))
    if config.builder_optimization_level is not None:
        build_config.builder_optimization_level = config.builder_optimization_level
    if not config.strongly_typed:  # strongly typed: precision flags are rejected, see docstring
        wanted = (["INT8"] if summary.has_qdq else []) + (["FP16"] if config.fp16_fallback else [])
        for flag_name in wanted:
            flag = getattr(trt.BuilderFlag, flag_name, None)
            if flag is None:
                raise ExportError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag_name} "
                                  "(weakly typed networks were removed); use strongly_typed=True")
            build_config.set_flag(flag)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (min_shape, opt_shape, max_shape) in profiles.items():
            profile.set_shape(name, min_shape, opt_shape, max_shape)
        build_config.add_optimization_profile(profile)
    if config.timing_cache:
        cached = Path(config.timing_cache).read_bytes() if os.path.isfile(config.timing_cache) else b""
        cache = build_config.create_timing_cache(cached)
        if not build_config.set_timing_cache(cache, False):
            logger.warning("timing cache %s does not match this TensorRT/GPU; starting a new one",
                           config.timing_cache)
            build_config.set_timing_cache(build_config.create_timing_cache(b""), False)


def _build_with_python(trt, summary: _OnnxSummary, profiles: dict, onnx_path: str,
                       engine_path: str, config: EngineBuildConfig) -> EngineInfo:
    start = time.perf_counter()
    trt_logger = _make_logger(trt, config.verbose)
    try:
        builder = trt.Builder(trt_logger)
    except Exception as exc:  # no GPU / driver: the binding's factory returns nullptr
        raise BackendUnavailableError(f"TensorRT {trt.__version__} could not create a builder "
                                      f"({exc}); is a CUDA GPU visible? Log:\n{trt_logger.tail()}")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if config.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(onnx_path):
        details = _parser_errors(parser, summary) or trt_logger.tail()
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path!r}:\n{details}\nFix or "
                          "remove the named node(s); run the qatgraph ONNX linter for Q/DQ "
                          "placement problems.")
    build_config = builder.create_builder_config()
    _configure(trt, builder, build_config, config, summary, profiles)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path!r}; "
                          f"{engine_path!r} was left as it was. Builder log:\n{trt_logger.tail()}")
    _atomic_write(engine_path, serialized)
    if config.timing_cache:
        _atomic_write(config.timing_cache, build_config.get_timing_cache().serialize())
    return EngineInfo(engine_path, "python",
                      [_trt_spec(network.get_input(i)) for i in range(network.num_inputs)],
                      [_trt_spec(network.get_output(i)) for i in range(network.num_outputs)],
                      time.perf_counter() - start, trt.__version__)


def _trt_spec(tensor) -> TensorSpec:
    dtype = _TRT_DTYPE_NAMES.get(tensor.dtype.name, tensor.dtype.name.lower())
    return tensor.name, dtype, tuple(int(d) for d in tensor.shape)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 config: EngineBuildConfig | None = None, **overrides: Any) -> EngineInfo:
    """Build a TensorRT engine file from a Q/DQ ONNX file (see the module docstring).
    ``overrides`` replace fields of ``config``, e.g. ``build_engine(a, b, max_batch=64)``."""
    config = _resolve_config(config, overrides)
    onnx_path, engine_path = str(onnx_path), str(engine_path)
    summary = _read_onnx(onnx_path)
    profiles = _profile_shapes(summary, config, onnx_path)
    for path in (engine_path, config.timing_cache):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    trt, trt_reason = _import_tensorrt()
    if trt is not None:
        info = _build_with_python(trt, summary, profiles, onnx_path, engine_path, config)
    else:
        trtexec = _find_trtexec()
        if trtexec is None:
            raise BackendUnavailableError(
                f"cannot build a TensorRT engine from {onnx_path!r}: {trt_reason}, and no `trtexec` "
                "binary was found on PATH or in $TRTEXEC. Install either one: the Python API with "
                f"`{INSTALL_HINT}`, or TensorRT's trtexec (put its bin/ directory, e.g. "
                "/usr/src/tensorrt/bin, on PATH or set TRTEXEC=/path/to/trtexec).")
        info = _build_with_trtexec(trtexec, summary, profiles, onnx_path, engine_path, config)
    logger.info("built %s with %s in %.1f s", engine_path, info.builder, info.build_seconds)
    return info


# The trtexec fallback and the runner build on the definitions above, so they are imported last.
from qatgraph.backends.tensorrt_runner import EngineRunner, compare_with_onnxruntime  # noqa: E402,F401
from qatgraph.backends.tensorrt_trtexec import (  # noqa: E402,F401
    _build_with_trtexec,
    _find_trtexec,
    trtexec_command,
)
