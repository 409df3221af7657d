"""Shared test fixtures; the digits example (``examples/digits.py``) imports as ``digits``, as the zoo
(``tests/zoo.py``) does as ``zoo``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: extra intra-op threads only add overhead (and stall on a busy shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_one_thread(one_thread):
    """One thread and no warnings (solver and tracing warnings are expected in fusion tests)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
