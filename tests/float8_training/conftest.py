"""Float8 training tests use small shapes: one intra-op thread avoids the synchronisation cost of
two on a busy 2-core machine (the small GEMMs and casts here gain nothing from a second thread)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
