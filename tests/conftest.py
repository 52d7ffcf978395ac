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


# System packages some tests need, as their skip reasons name them, and the Debian package that provides each.
SYSTEM_PACKAGES = {"chromium": "chromium", "espeak-ng": "espeak-ng", "ffmpeg": "ffmpeg"}


def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run for tests skipped for want of a system package, with the command that installs
    them, so a fresh machine does not skip them silently (pip installs everything else: requirements-dev.txt)."""
    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for name, package in SYSTEM_PACKAGES.items():
            if name in reason.lower():
                missing[package] = missing.get(package, 0) + 1
    if missing:
        counts = ", ".join(f"{n} need{'s' if n == 1 else ''} {p}" for p, n in sorted(missing.items()))
        terminalreporter.write_line(f"skipped for want of system packages ({counts}); install them with: "
                                    f"apt-get install -y {' '.join(sorted(missing))}", yellow=True)
