"""Checkpoints written by earlier versions still load and compute the same function.

``data/checkpoint_v1_pre_rooms.pt`` was written by ``qatgraph.checkpoint.save_checkpoint`` before
the package was regrouped into rooms (flat ``qatgraph/*.py``, format ``qatgraph-checkpoint/1``):
``checkpoint_models:small_residual`` compiled with the ``tensorrt`` preset (``min_channels: 0``),
calibrated on two random batches; ``_io.pt`` holds an input and the model's eval output then.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qatgraph.checkpoint import load_checkpoint

DATA = Path(__file__).with_name("data")


def test_checkpoint_from_before_the_rooms_loads_and_matches():
    qmodel, source, policy = load_checkpoint(DATA / "checkpoint_v1_pre_rooms.pt")
    reference = torch.load(DATA / "checkpoint_v1_pre_rooms_io.pt", weights_only=True)
    assert source.factory == "checkpoint_models:small_residual" and policy.min_channels == 0
    qmodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(reference["x"]), reference["y"], rtol=0, atol=0)
