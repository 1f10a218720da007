"""Shared pytest setup: a reproducible seed per test, and the `cuda` marker's skip.

The markers (`cuda`, `slow`) are declared in pyproject.toml. A test marked `cuda` is
skipped only when this machine has no usable CUDA device; anywhere else it runs (and a
failure there is a failure, never a skip).
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Seeds torch and random from the test's id: every test draws its own fresh inputs,
    and a failure reproduces by rerunning that test alone. Returns the seed."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    random.seed(value)
    return value
