"""Shared test fixtures. GPU tests carry the ``gpu`` marker and skip cleanly where no GPU is usable.

The GPU kernel tests need CuPy only (plus ml_dtypes for bfloat16). Tests of torch or JAX callers skip
themselves, with a reason, where that library (with CUDA) is missing. ``--without torch`` (repeatable, also
``--without jax``) runs the suite as if a library were not installed, to check exactly that.
"""

import importlib.util
import sys

import pytest

import cuflash

_OPTIONAL = ("cupy", "ml_dtypes", "torch", "jax")


def pytest_addoption(parser):
    parser.addoption("--without", action="append", default=[], metavar="MODULE",
                     help="run as if MODULE (torch, jax, ...) were not installed: importing it fails, and the "
                          "tests that need it skip")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU of compute capability >= 8.0")
    for name in config.getoption("without"):
        if name in sys.modules and sys.modules[name] is not None:
            raise pytest.UsageError(f"--without {name}: {name} is already imported")
        sys.modules[name] = None  # `import name` now raises ModuleNotFoundError


def _present(name) -> str:
    if name in sys.modules and sys.modules[name] is None:
        return "hidden"
    try:
        return "yes" if importlib.util.find_spec(name) is not None else "no"
    except (ImportError, ValueError):
        return "no"


def pytest_report_header(config):
    libs = ", ".join(f"{name} {_present(name)}" for name in _OPTIONAL)
    return f"cuflash: GPU {'yes' if cuflash.gpu_available() else 'no'}; {libs}"


def pytest_collection_modifyitems(config, items):
    if cuflash.gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (compute capability >= 8.0) with CuPy found")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sequence_runs(monkeypatch):
    """Records whether each executor.BoundSequence run launched (a bound call replaying a recorded one:
    attention_with_kvcache, the variable-length functions); every bound call is forgotten before and after."""
    from cuflash import executor
    runs = []
    original = executor.BoundSequence.run

    def spy(self, xs, scalar=0):
        res = original(self, xs, scalar)
        runs.append(res is not None)
        return res
    monkeypatch.setattr(executor.BoundSequence, "run", spy)
    executor.clear()
    yield runs
    executor.clear()
