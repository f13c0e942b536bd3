"""Shared test setup: the test model zoo (tests/models.py) importable as ``models``."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("QATGRAPH_NO_PROGRESS", "1")
torch.set_num_threads(1)  # small ops: one thread is fastest and steady on a shared 2-core box


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
