"""QAT checkpoints for the command line: how to rebuild the model, the policy, and the state.

A compiled model is a torch.fx GraphModule, which does not pickle portably, so a checkpoint holds
what is needed to *recompile* it (the model factory ``package.module:factory``, the policy as a
dict, the example input shape) plus the compiled model's ``state_dict``: every weight (the ones
the model was built from, as trained since), every scale and quantizer flag, and each quantizer's
format. A checkpoint is self-contained: loading calls the factory for the architecture only and
never reads the ``--weights`` file again, so the checkpoint can move and the weights file can go.
Loading uses ``torch.load(weights_only=True)`` (no code is unpickled) and refuses, in words, a
state that does not fit the recompiled model. Files are written atomically, with the permissions
``open()`` would give (:mod:`qatgraph.atomic_files`), under ``torch.distributed`` by rank 0 while
the other ranks wait for the finished file.

Formats (``payload["format"]``):

* ``qatgraph-checkpoint/2`` (written now): ``factory``, ``input_shape``, ``policy``,
  ``state_dict`` (with the quantizer formats as ``*._extra_state``), ``weights_source`` (the
  ``--weights`` path the model was built from, a record only), ``factory_file`` (where the
  factory's module was imported from, named when it cannot be imported) and ``qatgraph_version``;
* ``qatgraph-checkpoint/1``: the same without formats and version, and ``weights`` instead of
  ``weights_source``. Still loads; its weights path is not read either.
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qatgraph.policy import Policy

from .atomic_files import torch_save
from .distributed import run_on_main, unwrap
from .errors import QatgraphError, StateMismatchError, UsageError
from .pipeline import compile as compile_model

FORMAT = "qatgraph-checkpoint/2"
READABLE_FORMATS = ("qatgraph-checkpoint/1", FORMAT)


@dataclass
class ModelSource:
    """How the float model is built: ``factory()``, then (at compile time only) ``weights``."""

    factory: str
    weights: str | None
    input_shape: tuple[int, ...]
    origin: str | None = None  # the factory module's file when the checkpoint was written (for error messages)

    def build(self, load_weights: bool = True) -> nn.Module:
        try:
            model = load_factory(self.factory, self.origin)()
        except QatgraphError:
            raise
        except Exception as exc:
            raise UsageError(f"calling the model factory {self.factory}() failed: {type(exc).__name__}: {exc}. "
                             "It must be callable without arguments and return an nn.Module.") from exc
        if not isinstance(model, nn.Module):
            raise UsageError(f"{self.factory} returned {type(model).__name__}, not an nn.Module")
        if self.weights and load_weights:
            _load_weights(model, self.weights, self.factory)
        return model.eval()

    def example_input(self) -> torch.Tensor:
        return torch.randn(*self.input_shape)


def _load_weights(model: nn.Module, path: str, factory: str) -> None:
    state = read_torch_file(path, "weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"weights file {path!r} holds a {type(state).__name__}, not a state dict of tensors; save "
                         "it with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0] if first else ""
        raise UsageError(f"weights {path!r} do not fit the model {factory} builds: {detail[:400]}. Give the weights "
                         "of this architecture (the state_dict of the same model class).") from None


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-paragraph errors for the usual mistakes."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"the {what} {path!r} is a directory; give the file inside it")
    if not os.path.exists(path):
        raise UsageError(f"the {what} {path!r} does not exist (paths are relative to the current directory, "
                         f"{os.getcwd()!r})")
    if not zipfile.is_zipfile(path):
        hint = " It looks like an ONNX model: use `qatgraph lint` or `qatgraph parity` for ONNX files." \
            if path.endswith(".onnx") else ""
        raise UsageError(f"the {what} {path!r} is not a file written by torch.save.{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        blocked = re.search(r"GLOBAL ([\w.]+)", " ".join(reason))
        found = f"e.g. a {blocked.group(1)}" if blocked else "not only tensors"
        raise UsageError(f"the {what} {path!r} holds Python objects other than tensors ({found}), and qatgraph "
                         "loads files with weights_only=True because unpickling arbitrary objects runs code. Save "
                         "only tensors: torch.save(model.state_dict(), path).") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UsageError(f"the {what} {path!r} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'truncated'}); is it complete?") \
            from None


def load_factory(spec: str, origin: str | None = None):
    """Import ``package.module:factory`` and return the callable (``origin``: where it was found before)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"model {spec!r} must look like 'package.module:factory' (a callable returning an nn.Module)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        before = f" When the checkpoint was written it came from {origin!r}: run from the directory that holds " \
                 "it (or its package), or add that directory to PYTHONPATH." if origin else ""
        raise UsageError(f"cannot import {module_name!r} for model {spec!r}: {exc}. Is it installed, on PYTHONPATH, "
                         f"or (for the qatgraph command) in the current directory?{before}") from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{module_name!r} has no callable {attribute!r} (model {spec!r})")
    return factory


def save_checkpoint(path: str | os.PathLike, qmodel: nn.Module, source: ModelSource, policy: Policy) -> None:
    """Write the checkpoint atomically; under ``torch.distributed`` rank 0 writes it and every rank
    returns once the file is complete (call it on every rank)."""
    from . import __version__

    module = sys.modules.get(source.factory.partition(":")[0])

    def write() -> None:
        payload: dict[str, Any] = {
            "format": FORMAT, "factory": source.factory, "weights_source": source.weights,
            "factory_file": getattr(module, "__file__", None) or source.origin,
            "input_shape": list(source.input_shape), "policy": policy.to_dict(),
            "state_dict": unwrap(qmodel).state_dict(), "qatgraph_version": __version__,
        }
        atomic_torch_save(payload, path)

    run_on_main(write, f"saving the checkpoint {os.fspath(path)!r}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    torch_save(obj, path, "checkpoint")


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, ModelSource, Policy]:
    """Recompile the model described by a checkpoint and load its state (see the module docstring)."""
    payload = read_torch_file(path, "checkpoint")
    name = os.fspath(path)
    version = payload.get("format") if isinstance(payload, dict) else None
    if version not in READABLE_FORMATS:
        newer = isinstance(version, str) and version.startswith("qatgraph-checkpoint/")
        raise UsageError(f"{name!r} is a checkpoint of a newer qatgraph ({version}); upgrade qatgraph to read it"
                         if newer else f"{name!r} is not a qatgraph checkpoint (make one with `qatgraph compile`)")
    weights = payload.get("weights_source", payload.get("weights"))
    source = ModelSource(payload["factory"], weights, tuple(payload["input_shape"]), payload.get("factory_file"))
    policy = Policy.from_dict(payload["policy"])
    qmodel = compile_model(source.build(load_weights=False), policy, example_inputs=(source.example_input(),))
    try:
        qmodel.load_state_dict(payload["state_dict"])
    except StateMismatchError as exc:
        raise StateMismatchError(f"checkpoint {name!r} does not fit the model {source.factory} builds now: {exc}") \
            from None
    except RuntimeError as exc:
        raise StateMismatchError(f"checkpoint {name!r} does not fit the model {source.factory} builds now (was the "
                                 f"model's code changed since?): {str(exc).strip()[:600]}") from None
    controller = getattr(qmodel, "qatgraph_freeze", None)
    if controller is not None:
        controller.refresh()  # EfQAT's selection follows the loaded weights, not the factory's initial ones
    return qmodel, source, policy


__all__ = [
    "FORMAT",
    "ModelSource",
    "atomic_torch_save",
    "load_checkpoint",
    "load_factory",
    "read_torch_file",
    "save_checkpoint",
]
