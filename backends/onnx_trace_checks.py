"""What the exporters silently get wrong or say unreadably, caught and put in one paragraph.

Used by :func:`qatgraph.backends.onnx.export_onnx`. An ONNX graph has no Python ``if``: the
TorchScript exporter (opset <= 17) traces the model once and keeps only the branch the example
inputs took, warning with a ``TracerWarning`` ("Converting a tensor to a Python boolean ...")
that scrolls by; inputs that take the other branch then compute something else in ONNX Runtime.
The tracer also warns about conditions on shapes (``if x.shape[-1] % 32:``), whose sizes it traces
as tensors although they are fixed in the export: :class:`ValueConditions` runs the model once in
eager mode and records where a tensor's *values* decide a Python ``bool`` (``Tensor.__bool__``),
and :func:`recording_branches` keeps only the tracer's warnings at those lines (the other warnings
are passed on unchanged); :func:`describe_branch` names the file, line, source and module of each. The dynamo exporter
(opset >= 18) refuses the same model with a 26-line error full of ANSI colour codes and graph
dumps: :func:`qatgraph.graph.frontends.quiet_dynamo` keeps its chatter off the terminal and :func:`exporter_failure`
turns its exceptions into an :class:`~qatgraph.errors.ExportError` naming the line and the fix.
"""
from __future__ import annotations

import contextlib
import linecache
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qatgraph.errors import ExportError

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED_AT = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+)')
_BRANCH_WARNING = "Converting a tensor to a Python boolean"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
FIX = ("Write the choice as tensor operations (torch.where(condition, a, b), masking) so that both paths are in the "
       "graph")


@dataclass(frozen=True)
class Branch:
    """A data-dependent Python branch: where it is, its source line and the module whose forward has it."""

    filename: str
    lineno: int
    module: str

    @property
    def source(self) -> str:
        return linecache.getline(self.filename, self.lineno).strip()

    def __str__(self) -> str:
        code = f" `{self.source}`" if self.source else ""
        return f"{self.filename}:{self.lineno}{code} (in {self.module})"


def describe_branch(model: nn.Module, filename: str, lineno: int) -> Branch:
    """The branch at ``filename:lineno``, attributed to the module whose ``forward`` contains it."""
    for name, module in model.named_modules():
        code = getattr(type(module).forward, "__code__", None)
        if code is None or code.co_filename != filename:
            continue
        lines = [line for *_, line in code.co_lines() if line is not None]
        if lines and min(lines) <= lineno <= max(lines):
            return Branch(filename, lineno, f"{name or '<root>'}, {type(module).__name__}.forward")
    return Branch(filename, lineno, "a function called by forward")


class ValueConditions(TorchFunctionMode):
    """While active, records the (file, line) of every Python ``bool`` taken of a tensor's value,
    attributed to the first frame outside torch (the ``if`` that asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: set[tuple[str, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                frame = frame.f_back
            if frame is not None:
                self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_branches(model: nn.Module, value_lines: set[tuple[str, int]]) -> Iterator[list[Branch]]:
    """Collect the data-dependent branches the TorchScript tracer reports inside the block (each
    location once, and only where ``value_lines`` saw a tensor's value decide); every other
    warning is re-issued as it was."""
    branches: list[Branch] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield branches
    seen = set()
    for item in caught:
        if issubclass(item.category, torch.jit.TracerWarning) and _BRANCH_WARNING in str(item.message):
            if (item.filename, item.lineno) not in value_lines:
                log.debug("shape-only condition at %s:%d, fixed in the export", item.filename, item.lineno)
            elif (item.filename, item.lineno) not in seen:
                seen.add((item.filename, item.lineno))
                branches.append(describe_branch(model, item.filename, item.lineno))
        elif not issubclass(item.category, DeprecationWarning):  # the TorchScript exporter's, chosen on purpose
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


def baked_branches_error(branches: list[Branch]) -> ExportError:
    listed = "; ".join(str(b) for b in branches[:5]) + (f"; and {len(branches) - 5} more" if len(branches) > 5 else "")
    return ExportError(
        f"the model's forward branches on tensor values ({listed}). An ONNX graph has no Python `if`: the export "
        "would keep only the branch the example inputs took, and inputs taking the other branch would compute "
        f"something else in ONNX Runtime and TensorRT. Nothing was written. {FIX}; or, if every deployed input takes "
        "the same branch as the example, pass allow_data_dependent_branches=True (the branches are then recorded in "
        "the file and check_parity names them) and check parity on inputs from every branch.")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def exporter_failure(exc: BaseException, exporter: str, opset: int, model: nn.Module) -> ExportError:
    """A one-paragraph :class:`ExportError` for an exception raised inside ``torch.onnx.export``."""
    text = _ANSI.sub("", "\n".join(str(e) for e in _chain(exc)))
    log.debug("torch.onnx.export (%s, opset %d) failed:\n%s", exporter, opset, text)
    data_dependent = any(type(e).__name__ == "GuardOnDataDependentSymNode" for e in _chain(exc)) or \
        "data-dependent expression" in text
    where = _RAISED_AT.search(text)
    if data_dependent:
        location = str(describe_branch(model, where.group(1), int(where.group(2)))) if where else "its forward"
        return ExportError(
            f"the model's forward branches on tensor values at {location}, which torch.export (the exporter for "
            f"opset >= 18) cannot put into a graph. Nothing was written. {FIX}. (At opset 17 the TorchScript "
            "exporter would keep only the branch the example inputs take.)")
    summary = _summary_line(text)
    return ExportError(
        f"torch.onnx.export ({exporter} exporter, opset {opset}) failed: {summary}. Nothing was written. If it names "
        "a dynamic dimension, retry with dynamic_batch=False; to try the other exporter pass exporter='dynamo' "
        "(opset >= 18) or exporter='torchscript' (opset <= 20); logging at DEBUG level shows the exporter's report.")


def _summary_line(text: str) -> str:
    """The most telling line of an exporter's report: its exception summary, else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("## Exception summary") and index + 1 < len(lines):
            return lines[index + 1][:400]
    return (lines[0] if lines else "no message")[:400]
