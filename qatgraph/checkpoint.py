"""QAT checkpoints for the command line: how to rebuild the model, the policy, and the state.

A compiled model is a torch.fx GraphModule, which does not pickle portably, so a checkpoint holds
what is needed to *recompile* it (model factory ``package.module:factory``, optional FP weights,
the policy as a dict, the example input shape) plus the compiled model's ``state_dict`` (weights,
scales, quantizer flags). Loading uses ``torch.load(weights_only=True)``: no code is unpickled.
Files are written atomically (temporary file, then rename), under ``torch.distributed`` by rank 0
while the other ranks wait for the finished file.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qatgraph.policy import Policy

from .atomic_files import torch_save as atomic_torch_save
from .distributed import run_on_main, unwrap
from .errors import QatgraphError
from .pipeline import compile as compile_model

FORMAT = "qatgraph-checkpoint/1"


@dataclass
class ModelSource:
    factory: str
    weights: str | None
    input_shape: tuple[int, ...]

    def build(self) -> nn.Module:
        model = load_factory(self.factory)()
        if not isinstance(model, nn.Module):
            raise QatgraphError(f"{self.factory} returned {type(model).__name__}, not an nn.Module")
        if self.weights:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise QatgraphError(f"weights {self.weights!r} do not fit {self.factory}: {exc}") from None
        return model.eval()

    def example_input(self) -> torch.Tensor:
        return torch.randn(*self.input_shape)


def load_factory(spec: str):
    """Import ``package.module:factory`` and return the callable."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise QatgraphError(f"model {spec!r} must look like 'package.module:factory' (a callable returning an nn.Module)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise QatgraphError(f"cannot import {module_name!r} for model {spec!r}: {exc}. Is it installed or on "
                            "PYTHONPATH?") from None
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise QatgraphError(f"{module_name!r} has no callable {attribute!r} (model {spec!r})")
    return factory


def save_checkpoint(path: str | os.PathLike, qmodel: nn.Module, source: ModelSource, policy: Policy) -> None:
    """Write the checkpoint atomically; under ``torch.distributed`` rank 0 writes it and every rank
    returns once the file is complete (call it on every rank)."""
    def write() -> None:
        payload: dict[str, Any] = {
            "format": FORMAT, "factory": source.factory, "weights": source.weights,
            "input_shape": list(source.input_shape), "policy": policy.to_dict(),
            "state_dict": unwrap(qmodel).state_dict(),
        }
        atomic_torch_save(payload, path)

    run_on_main(write, f"saving the checkpoint {os.fspath(path)!r}")


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, ModelSource, Policy]:
    """Recompile the model described by a checkpoint and load its state."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QatgraphError(f"checkpoint {os.fspath(path)!r} does not exist") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise QatgraphError(f"{os.fspath(path)!r} is not a qatgraph checkpoint (make one with `qatgraph compile`)")
    source = ModelSource(payload["factory"], payload["weights"], tuple(payload["input_shape"]))
    policy = Policy.from_dict(payload["policy"])
    qmodel = compile_model(source.build(), policy, example_inputs=(source.example_input(),))
    qmodel.load_state_dict(payload["state_dict"])
    return qmodel, source, policy

