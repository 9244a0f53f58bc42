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
