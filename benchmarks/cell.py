"""Time of the event-driven backend's elementwise cell, per step and per unit, on one thread.

Calls the dense mode's per-step cell kernel (``forward_cell_step``: gates, candidate state,
events, outputs and reset for every sample of one step) over a whole sequence, as the dense
forward loop does, with every unit firing. Prints the median over repeated sequences.

    python benchmarks/cell.py                      # B = 32, H = 256, T = 100, float32 and float64
    python benchmarks/cell.py --batch 1 --hidden 1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def time_cell(batch: int, hidden: int, steps: int, dtype, repeats: int) -> float:
    """Median seconds per step of ``forward_cell_step`` over ``steps`` steps."""
    from egru.kernels import _event_numba as K

    T, B, H, G = steps, batch, hidden, 3 * hidden
    rng = np.random.default_rng(0)
    gates_in = rng.standard_normal((T, B, G)).astype(dtype)
    gh = rng.standard_normal((B, G)).astype(dtype)
    theta = np.full(H, -10.0, dtype)  # below every candidate state: every unit fires
    lengths = np.full(B, T, np.int64)
    zmask = np.zeros((1, 1, 1), dtype)
    y_prev, c = np.zeros((B, H), dtype), np.zeros((B, H), dtype)
    out = K.ForwardOutputs(*(np.zeros((T, B, H), dtype) for _ in range(4)), y_prev, c)
    rec = K.Recurrence(np.zeros((H, G), dtype), np.zeros(G, dtype), theta, lengths)
    zoneout = K.Zoneout(K.ZONEOUT_NONE, zmask, 0.0)

    def sequence() -> float:
        gates = gates_in.copy()  # the kernel turns the gates into (r, z, n) in place
        start = time.perf_counter()
        for t in range(T):
            K.forward_cell_step(t, gates, gh, rec, zoneout, y_prev, c, out)
        return time.perf_counter() - start

    sequence()  # compilation
    return statistics.median(sequence() for _ in range(repeats)) / T


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    for dtype in (np.float32, np.float64):
        per_step = time_cell(args.batch, args.hidden, args.steps, dtype, args.repeats)
        per_unit = per_step / (args.batch * args.hidden)
        print(f"{np.dtype(dtype).name}: {per_step * 1e6:.1f} µs per step, "
              f"{per_unit * 1e9:.2f} ns per unit (B={args.batch}, H={args.hidden}, one thread)")


if __name__ == "__main__":
    main()
