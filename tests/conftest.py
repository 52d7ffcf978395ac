"""Shared fixtures: tiny random checkpoints built by transformers itself and saved to temp dirs."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny ops (the speech stacks): on a shared, busy CPU, one thread avoids OpenMP contention (100x seen).
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
