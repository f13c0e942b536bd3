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
Shared build inputs (config, ONNX inputs, profiles, atomic writes) are in backends/tensorrt_config.py,
the trtexec fallback in backends/tensorrt_trtexec.py, :class:`EngineRunner` and
:func:`compare_with_onnxruntime` in backends/tensorrt_runner.py; all are importable from here.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from qatgraph.backends.tensorrt_config import (  # noqa: F401 - re-exported: the public names of the backend
    _TRT_DTYPE_NAMES,
    INSTALL_HINT,
    EngineBuildConfig,
    EngineInfo,
    TensorSpec,
    _atomic_write,
    _import_tensorrt,
    _make_logger,
    _OnnxSummary,
    _profile_shapes,
    _read_onnx,
    _replacing,
    _resolve_config,
    tensorrt_available,
)
from qatgraph.backends.tensorrt_runner import EngineRunner, compare_with_onnxruntime  # noqa: F401
from qatgraph.backends.tensorrt_trtexec import (  # noqa: F401
    _build_with_trtexec,
    _find_trtexec,
    trtexec_command,
)
from qatgraph.errors import BackendUnavailableError, ExportError

logger = logging.getLogger(__name__)


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
