"""Fixtures shared by the test files: a seeded generator, and the backend under test."""

from __future__ import annotations

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fixed per test, different across tests."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def backend(request):
    """The backend object a test runs on, named by its ``backend`` parameter (tests that
    take it are parametrised with tests/backends.py's each_backend / each_backend_and_case)."""
    import backends  # here, not at the top: most test files never touch a GPU or emulator

    return backends.get(request.param)
