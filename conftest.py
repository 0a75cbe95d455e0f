"""pytest configuration shared by every test: `pytest` from the repository root runs the whole suite.

Triton's interpreter must be switched on before `kernels.py` defines its kernels, so it is set here, first.
On a CUDA machine the real compiler is used instead (set TRITON_INTERPRET=1 yourself to force the interpreter).
"""
import os
import sys

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement, but let pytest report it clearly
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ holds a helper module (tests/helpers.py) that test files import as `helpers`.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cpu_only(monkeypatch):
    """Runs of train.main in the test's own process take the CPU path even on a GPU machine (mmsp.init_distributed
    asks torch.cuda.is_available); a test file opts in with pytestmark = pytest.mark.usefixtures("cpu_only")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
