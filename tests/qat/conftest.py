"""QAT tests use tiny shapes: one intra-op thread is faster than two there (measured 3.4 s
vs 30 s for 100 W4A8 seeds on a busy 2-core machine: the threads only add synchronisation)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
