"""Every exception qatgraph raises on purpose.

Each message says what was wrong, where (module, node, quantizer or option) and what to do.
Catch :class:`QatgraphError` to handle all of them.
"""
from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterable


class QatgraphError(Exception):
    """Base class of every error raised by qatgraph."""


class PolicyError(QatgraphError, ValueError):
    """The quantization policy is invalid: unknown key, bad value, impossible combination,
    or a rule that matches nothing."""


class TraceError(QatgraphError):
    """The model could not be traced with torch.fx (and partial tracing could not help)."""


class CalibrationError(QatgraphError):
    """Calibration could not produce scales: empty data, NaN/Inf values, bad batch shape."""


class NotCalibratedError(QatgraphError, RuntimeError):
    """A quantizer was asked to fake-quantize before it had a scale."""


class UsageError(QatgraphError, ValueError):
    """qatgraph was called with something it cannot use: a path that is a directory, a file of the
    wrong kind, inputs whose shape or structure does not fit the model, an already compiled model."""


class StateMismatchError(QatgraphError, RuntimeError):
    """A ``state_dict`` or checkpoint does not fit the model it is loaded into: a quantizer's format
    (bits, signedness, symmetry, axis, channels) differs, or the two were compiled with policies
    that quantize different layers."""


class ExportError(QatgraphError):
    """Exporting the QAT model (ONNX, engine) failed."""


class BackendUnavailableError(QatgraphError, RuntimeError):
    """An optional backend (TensorRT, a GPU, Triton) is not available on this machine."""


class SensitivityError(QatgraphError):
    """Sensitivity analysis got input it cannot work with."""


class DistributedError(QatgraphError, RuntimeError):
    """Processes of a ``torch.distributed`` group disagree (different data, steps or models), or a
    step failed on another rank."""


class QatgraphWarning(UserWarning):
    """Warnings qatgraph emits (nothing quantized, fewer calibration batches than asked, ...)."""


_ROOT = os.path.dirname(os.path.abspath(__file__))
# passes/ and backends/ are installed inside the package (and linked into it in a source checkout)
_PACKAGE_DIRS = tuple({os.path.realpath(os.path.join(_ROOT, sub)) + os.sep for sub in ("", "passes", "backends")})


_DECORATOR_FILES = (os.sep + os.path.join("torch", "utils", "_contextlib.py"), os.sep + "contextlib.py")


def _inside_qatgraph(filename: str) -> bool:
    """qatgraph's own files, and the decorator wrappers (``torch.no_grad``) around its functions."""
    return filename.endswith(_DECORATOR_FILES) or os.path.realpath(filename).startswith(_PACKAGE_DIRS)


def warn(message: str, category: type[Warning] = QatgraphWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside qatgraph (the user's line), not to
    the qatgraph function that noticed the problem."""
    frame, level = sys._getframe(0), 1  # level 1 is this function
    while frame is not None and _inside_qatgraph(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def did_you_mean(value: str, choices: Iterable[str], limit: int = 3) -> str:
    """A short suffix suggesting close matches, e.g. `` (did you mean 'layer1.conv1'?)``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=limit, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 sample``, ``2 samples``, ``1 batch``, ``3 batches``."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {plural_form or (noun + 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else noun + 's')}"


def listing(choices: Iterable[str], limit: int = 12) -> str:
    """Comma-separated list of at most ``limit`` items, with a count of the rest."""
    items = sorted(str(c) for c in choices)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown
