import importlib.util
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


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
