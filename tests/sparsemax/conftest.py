"""The CPU sparsemax kernel splits rows over ``torch.get_num_threads()`` threads: its tests run with two
(the suite's default is one thread per process, tests/conftest.py), so the threaded path is the one tested."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
