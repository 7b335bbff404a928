"""Shared test fixtures. GPU tests carry the ``gpu`` marker and skip cleanly where no GPU is usable."""

import pytest

import cuflash


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU of compute capability >= 8.0")


def pytest_collection_modifyitems(config, items):
    if cuflash.gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (compute capability >= 8.0) with CuPy found")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
