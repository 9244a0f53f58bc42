"""The event backend's parity tests once more with ``NUMBA_DISABLE_JIT=1``: the kernels run as
the plain Python they are written in, so their logic is checked apart from numba's compiler
(a compiled kernel and its Python source must agree). In a subprocess, since numba reads the
setting when it is imported."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="this run is without the JIT already")
def test_event_backend_parity_without_the_jit():
    tests = Path(__file__).parent
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(tests / "test_event_backend.py")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tests.parent)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 100, proc.stdout[-2000:]
