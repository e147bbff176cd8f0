"""Test set-up: without a GPU, Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
