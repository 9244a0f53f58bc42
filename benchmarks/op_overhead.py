"""What calling the event layer through its ``torch.library`` operator costs over calling the
implementation directly: one B = 1 forward of one layer (H = 1024, T = 100, a stacked layer's
sparse input at ≈ 10 % activity), without autograd. The two are timed call for call in turn;
medians of ``--repeats`` calls.

    python benchmarks/op_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from egru import backends
from egru.kernels import event


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    T, H = args.steps, args.hidden
    x = torch.randn(T, 1, H) * (torch.rand(T, 1, H) < 0.1)
    w_ih, w_hh = torch.randn(3 * H, H) / H ** 0.5, torch.randn(3 * H, H) / H ** 0.5
    inputs = event.LayerInputs(x, torch.zeros(1, H), torch.zeros(1, H), w_ih, w_hh,
                               torch.zeros(3 * H), torch.zeros(3 * H), torch.full((H,), 0.3),
                               None, None)
    t = backends.Tuning()
    settings = event.Settings(0.0, 0.7, 1.0, False, t.sparse_input_density,
                              t.sparse_weight_grad_density, t.weight_grad_tile_bytes,
                              t.thread_mode)
    ways = {"implementation": lambda: event._forward(inputs, settings),
            "operator": lambda: torch.ops.egru.event_layer(*inputs, *settings)}
    times = {name: [] for name in ways}
    with torch.no_grad():
        for fn in ways.values():  # compile, warm caches
            for _ in range(5):
                fn()
        for _ in range(args.repeats):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    activity = float((event._forward(inputs, settings)[2] != 0).float().mean())
    print(f"B = 1, H = {H}, T = {T}, activity {activity:.2f}, torch threads "
          f"{torch.get_num_threads()}")
    for name, ms in medians.items():
        print(f"  {name:15s} {ms:.3f} ms")
    print(f"  operator overhead {1e3 * (medians['operator'] - medians['implementation']):.0f} µs"
          f" per call ({medians['operator'] / medians['implementation'] - 1:+.1%})")


if __name__ == "__main__":
    main()
