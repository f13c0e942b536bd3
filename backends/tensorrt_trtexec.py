"""The trtexec fallback of the TensorRT builder (see backends/tensorrt.py).

:func:`~qatgraph.backends.tensorrt.build_engine` uses this when ``import tensorrt`` fails:
:func:`_find_trtexec` looks for the binary ($TRTEXEC, which must be executable, else PATH),
:func:`trtexec_command` gives the exact argument list for a build (strongly typed by default, one
--minShapes/--optShapes/--maxShapes entry per input with a dynamic batch dim), and
:func:`_build_with_trtexec` runs it. Guarantees: the engine and timing cache are written to
temporary files beside their targets and renamed over them only on success, so a failed build
never clobbers a good engine; a failure raises :class:`~qatgraph.errors.ExportError` with the
exit code and the tail of trtexec's stderr and stdout. Config types, ONNX reading and the atomic
rename come from ``qatgraph.backends.tensorrt``, which re-exports :func:`trtexec_command`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time

from qatgraph.backends.tensorrt_config import (
    EngineBuildConfig,
    EngineInfo,
    _OnnxSummary,
    _profile_shapes,
    _read_onnx,
    _replacing,
    _resolve_config,
    _static,
)
from qatgraph.errors import BackendUnavailableError, ExportError

logger = logging.getLogger("qatgraph.backends.tensorrt")  # one logger for the whole builder


def _find_trtexec() -> str | None:
    override = os.environ.get("TRTEXEC")
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise BackendUnavailableError(f"$TRTEXEC={override!r} is not an executable file; point it "
                                      "at TensorRT's bin/trtexec or unset it")
    return shutil.which("trtexec")


def _format_shapes(profiles: dict[str, tuple[tuple[int, ...], ...]], which: int) -> str:
    def quoted(name: str) -> str:  # trtexec splits on ':' and ','; it accepts 'quoted' names
        return f"'{name}'" if ":" in name or "," in name else name
    return ",".join(f"{quoted(name)}:" + "x".join(str(d) for d in shapes[which])
                    for name, shapes in profiles.items())


def _trtexec_args(summary: _OnnxSummary, profiles: dict, onnx_path, engine_path,
                  config: EngineBuildConfig, trtexec: str) -> list[str]:
    args = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if config.strongly_typed:
        args.append("--stronglyTyped")
    else:  # weak typing: --int8 only switches on the explicit Q/DQ layers (no calibration)
        args += (["--int8"] if summary.has_qdq else []) + (["--fp16"] if config.fp16_fallback else [])
    args.append(f"--memPoolSize=workspace:{int(round(config.workspace_gib * 1024))}M")
    if profiles:
        args += [f"--{kind}Shapes={_format_shapes(profiles, i)}"
                 for i, kind in enumerate(("min", "opt", "max"))]
    if config.timing_cache:
        args.append(f"--timingCacheFile={config.timing_cache}")
    if config.builder_optimization_level is not None:
        args.append(f"--builderOptimizationLevel={config.builder_optimization_level}")
    return args + ["--skipInference"] + (["--verbose"] if config.verbose else [])


def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                    config: EngineBuildConfig | None = None, trtexec: str = "trtexec") -> list[str]:
    """The trtexec argument list that builds ``engine_path`` from ``onnx_path`` (reads input names
    and shapes from the ONNX file; runs nothing)."""
    config = _resolve_config(config, {})
    summary = _read_onnx(onnx_path)
    return _trtexec_args(summary, _profile_shapes(summary, config, onnx_path), str(onnx_path),
                         str(engine_path), config, trtexec)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _trtexec_version(output: str) -> str:
    match = re.search(r"TensorRT v(\d+)", output)  # e.g. v100800 -> 10.8.0, v8601 -> 8.6.1
    number = int(match.group(1)) if match else 0
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}" if match else "unknown"


def _build_with_trtexec(trtexec: str, summary: _OnnxSummary, profiles: dict, onnx_path: str,
                        engine_path: str, config: EngineBuildConfig) -> EngineInfo:
    start = time.perf_counter()
    cache = config.timing_cache
    # trtexec rewrites --timingCacheFile in place: give it a copy, renamed back only on success
    with _replacing(engine_path) as partial, \
            (_replacing(cache) if cache else contextlib.nullcontext()) as partial_cache:
        if cache and os.path.isfile(cache):
            shutil.copyfile(cache, partial_cache)
        args = _trtexec_args(summary, profiles, onnx_path, partial,
                             dataclasses.replace(config, timing_cache=partial_cache), trtexec)
        logger.info("building %s with %s", engine_path, " ".join(args))
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise ExportError(f"trtexec failed (exit code {result.returncode}) building "
                              f"{engine_path!r} from {onnx_path!r}; {engine_path!r} was left as it "
                              f"was.\nstderr:\n{_tail(result.stderr)}\nstdout:\n{_tail(result.stdout)}")
        if os.path.getsize(partial) == 0:
            raise ExportError(f"trtexec exited 0 but wrote no engine for {onnx_path!r}; "
                              f"stdout:\n{_tail(result.stdout)}")
    return EngineInfo(engine_path, "trtexec", [_static(i) for i in summary.inputs], summary.outputs,
                      time.perf_counter() - start, _trtexec_version(result.stdout + result.stderr))
