"""Every format test sweeps the MIN_SQNR_DB keys: each default format plus named variants."""

from __future__ import annotations

import pytest

from lowbit.testing import MIN_SQNR_DB


@pytest.fixture(params=sorted(MIN_SQNR_DB))
def format_name(request) -> str:
    return request.param
