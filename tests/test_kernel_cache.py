"""numba's on-disk cache of the event kernels, across processes.

Each process below starts with what earlier ones left in one fresh cache directory, in orders
that users produce (a script, then a notebook, then ``torchrun`` workers): kernels compiled in
one process are loaded by the next, in float32 and float64, with one and two numba threads,
and two processes compile into an empty cache at once. Every process must exit 0 with the
reference backend's results (``tests/cache_worker.py``). A cached kernel without
``parallel=True`` that called a cached parallel one used to crash the third process below with
a segmentation fault (the parallel code ran before numba had started its threads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

WORKER = Path(__file__).with_name("cache_worker.py")

# (scenario, dtypes, numba threads[, threading layer]), run one after the other on one cache
SEQUENCE = [
    ("one-layer-train", "float32", 2),  # fills the cache with the backward's sparse helpers
    ("stacked-infer", "float32", 2),    # compiles the sparse input product against them
    ("stacked-infer", "float32", 2),    # loads that from the cache (crashed before)
    ("stacked-train", "float64", 1, "workqueue"),  # a stacked layer first, one thread, another layer
    ("one-layer-train", "float64,float32", 2),  # both dtypes' kernels from the cache
]


def _env(cache_dir: Path, threads: int, threading_layer: str | None) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), NUMBA_NUM_THREADS=str(threads))
    env.pop("NUMBA_DISABLE_JIT", None)  # the cache is what is tested
    if threading_layer is not None:
        env["NUMBA_THREADING_LAYER"] = threading_layer
    return env


def _start(cache_dir: Path, scenario: str, dtype: str, threads: int,
           threading_layer: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), scenario, dtype],
                            env=_env(cache_dir, threads, threading_layer),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, what) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and output.strip().endswith("ok"), \
        f"{what} exited {proc.returncode}:\n{output[-3000:]}"


def test_processes_in_sequence_share_the_cache(tmp_path):
    for step, process in enumerate(SEQUENCE):
        _finish(_start(tmp_path, *process), (step, *process))


def test_processes_compiling_into_one_empty_cache_at_once(tmp_path):
    """Two workers compile the same kernels for two dtypes into an empty cache at the same time
    (numba numbers a function's entries without a lock); then a third loads both."""
    procs = [_start(tmp_path, "stacked-train", dtype, 2) for dtype in ("float32", "float64")]
    for proc, dtype in zip(procs, ("float32", "float64")):
        _finish(proc, ("concurrent", dtype))
    _finish(_start(tmp_path, "stacked-train", "float32,float64", 2), "after")
