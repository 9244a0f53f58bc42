"""``torch.compile(model, fullgraph=True)`` against eager: the first compiled call, then medians
of forward passes (no autograd) and of training steps (forward + backward), the two called in
turn. A 2-layer EGRU, I = 64, H = 256, T = 100, thresholds 0.3, default backend.

    python benchmarks/compile.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import egru


def _medians_ms(ways: dict, repeats: int) -> dict:
    """Median milliseconds of each way, the ways called in turn (the machine drifts)."""
    times = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for B in args.batch:
        torch._dynamo.reset()
        model = egru.EGRU(64, 256, num_layers=2)
        with torch.no_grad():
            for threshold in model.thresholds():
                threshold.fill_(0.3)
        x = torch.randn(100, B, 64)
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        first = time.perf_counter() - start
        compiled(x)[0].sum().backward()  # compiles the training graph too
        ways = {"eager": model, "compiled": compiled}
        with torch.no_grad():
            forward = _medians_ms({n: (lambda f=f: f(x)) for n, f in ways.items()}, args.repeats)
        steps = _medians_ms({n: (lambda f=f: f(x)[0].sum().backward()) for n, f in ways.items()},
                            max(args.repeats // 3, 1))
        print(f"B = {B}: first compiled call {first:.1f} s; forward eager {forward['eager']:.2f} ms, "
              f"compiled {forward['compiled']:.2f} ms; training step eager {steps['eager']:.1f} ms, "
              f"compiled {steps['compiled']:.1f} ms")


if __name__ == "__main__":
    main()
