import importlib.util
import os
import signal
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton's kernels run in its interpreter on the CPU (tests/test_triton.py); this
# must be set before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_raises():
    """Python's own Ctrl-C (KeyboardInterrupt) for the tests that send themselves SIGINT, also
    when the suite was started in the background, where the shell has SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def data_dir() -> Path | None:
    """The shared data directory from ``EGRU_DATA_DIR``, or None."""
    path = os.environ.get("EGRU_DATA_DIR")
    return Path(path) if path and Path(path).is_dir() else None


@pytest.fixture(scope="session")
def load_benchmark():
    """Import a script of benchmarks/ by name (the scripts are not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
