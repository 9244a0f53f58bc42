"""Wall-clock and peak memory of ``egru.EGRU`` backends against ``torch.nn.GRU`` / ``nn.LSTM``.

For each batch size B and hidden size H (input size I = H unless ``--input-size`` says
otherwise, T steps), the EGRU's thresholds are
searched so that the layer reaches a target activity on the benchmark input; the activity
reported is the one measured from the record. Times are medians of repeated runs:
forward (``torch.no_grad``, eval mode) and forward+backward (loss = sum of the output,
gradients for every parameter).

Two input modes (``--input``), reported as separate rows:

* ``dense``: the first layer of a network. The input is data, a dense random normal
  ``(T, B, H)`` tensor that needs no gradient (as when training on data), so the input product
  ``W_ih x`` and its weight gradient are dense whatever the layer's activity.
* ``sparse``: a stacked layer, whose input is the previous layer's output: events at the same
  activity as the layer's target (random normal values at a random ``activity`` fraction of
  the entries), and the input needs a gradient (it flows on to the layer below).

``--weight-density D ...`` prunes the EGRU's weights (``weight_ih`` and ``weight_hh``, each to
density D by magnitude with :mod:`egru.prune`; 1.0: not pruned), one row per density; the
nn.GRU timed alongside stays dense. The threshold is searched on the pruned model.

``nn.GRU`` and ``nn.LSTM`` do the same dense work for any input values, so each has one row per
(B, H) and input-gradient setting; besides, nn.GRU is timed again alongside every EGRU row, call
for call in turn with it, and the row's ratio is to those times (the machine's speed drifts
between rows).

Peak memory of forward+backward: the peak of the bytes held by torch's CPU allocator during
one forward+backward, above what was held before, from the profiler's memory events
(``torch.profiler``, ``profile_memory=True``). Resident-set measurements proved useless here
(the C library reuses freed pages, so most deltas read zero).

    python benchmarks/speed.py --out speed.json           # the full table
    python benchmarks/speed.py --quick                    # a small subset
    python benchmarks/speed.py --support-k 10 ...         # a narrower surrogate support
    python benchmarks/speed.py --markdown speed.json      # a results file as a markdown table
    python benchmarks/speed.py --busy 2 ...               # beside two CPU-bound processes
    python benchmarks/speed.py --input-size 1 --steps 784 # sequential MNIST's shape
    python benchmarks/speed.py --weight-density 0.1 1.0   # pruned to 10 % of the weights too
    python benchmarks/speed.py --load-table q.json b.json # quiet against busy forward times

``--device cuda`` times on a GPU: the EGRU's ``triton`` and ``reference`` backends against cuDNN's
``nn.GRU`` and ``nn.LSTM``, every call followed by ``torch.cuda.synchronize()``, peak memory from
``torch.cuda.max_memory_allocated``:

    python benchmarks/speed.py --device cuda --batch 1 8 64 --hidden 512 1350 2048 --steps 70 \
        --activity 1.0 0.2 0.05 --input dense --out speed-cuda.json

``--busy N`` starts N processes that spin on the CPU (another job using the cores) before the
timings and stops them after: a user's machine is rarely idle, and code that synchronises its
threads often can stall whenever one of them is descheduled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import time

import torch

import egru


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_cores(n: int):
    """``n`` CPU-bound competitor processes for the duration of the block."""
    ctx = multiprocessing.get_context("spawn")  # not a fork of this process's thread pools
    procs = [ctx.Process(target=_spin, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
            proc.join()


DEVICE = torch.device("cpu")  # where the models and inputs live (--device)


def _synchronized(fn):
    """``fn`` followed by a wait for the GPU's queue (nothing on the CPU)."""
    if DEVICE.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


def median_times(fns, repeats: int, warmup: int = 1) -> list:
    """Median wall-clock seconds of each of ``fns``, called in turn (one call of each per
    round), so that functions timed together see the same state of the machine, after
    ``warmup`` calls of each (numba compilation, the allocator, and the event backward's
    choice of thread mode, which times each mode twice before it settles)."""
    fns = [_synchronized(fn) for fn in fns]
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def peak_memory(fn) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn`` above what was held before.

    From the profiler's memory events (allocations positive, frees negative, in time order).
    The event kernels' own numpy scratch buffers are O(B·H) and not counted. On a GPU: the peak
    of ``torch.cuda.max_memory_allocated`` above what was allocated before.
    """
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _synchronized(fn)()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # each operator's own bytes (its total repeats its children's), in time order
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    held = peak = 0
    for e in events:
        held += e.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def measure_activity(model, x) -> float:
    with torch.no_grad():
        _, _, records = model(x, record=True)
    return egru.model_stats(records).activity


def set_activity(model, x, target: float) -> float:
    """Bisect one threshold for all units until the measured activity is near ``target``."""
    if target >= 1.0:
        value = -10.0  # below every candidate state: every unit fires at every step
    else:
        low, high = -1.0, 2.0
        for _ in range(25):
            value = (low + high) / 2
            with torch.no_grad():
                for threshold in model.thresholds():
                    threshold.fill_(value)
            activity = measure_activity(model, x)
            if abs(activity - target) <= 0.02 * target:
                break
            low, high = (value, high) if activity > target else (low, value)
    with torch.no_grad():
        for threshold in model.thresholds():
            threshold.fill_(value)
    return measure_activity(model, x)


def _calls(model, x, input_grad: bool):
    """The forward (no_grad) and forward+backward callables of ``model`` on ``x``."""
    xg = x.clone().requires_grad_(input_grad)

    def forward():
        with torch.no_grad():
            model(x)

    def step():
        model.zero_grad(set_to_none=True)
        xg.grad = None
        out = model(xg)[0]
        out.sum().backward()

    return forward, step


def time_model(model, x, repeats: int, *, input_grad: bool, memory: bool = True,
               alongside=None) -> dict:
    """Times (and peak memory) of ``model``. ``alongside=(gru, x_gru)``: nn.GRU is timed in
    turn with the model, call for call, and its times are stored with the row (``gru_*``), so
    the ratio compares the two over the same seconds: this machine's speed drifts by up to
    ±30 % over minutes, nn.GRU's as much as anyone's."""
    model.eval()
    forward, step = _calls(model, x, input_grad)
    fwd_fns, step_fns = [forward], [step]
    if alongside is not None:
        gru_forward, gru_step = _calls(alongside[0].eval(), alongside[1], input_grad)
        fwd_fns.append(gru_forward)
        step_fns.append(gru_step)
    fwd_times = median_times(fwd_fns, repeats)
    step_times = median_times(step_fns, max(1, repeats // 2 + 1), warmup=5)
    result = {"forward_s": fwd_times[0], "forward_backward_s": step_times[0]}
    if alongside is not None:
        result.update(gru_forward_s=fwd_times[1], gru_forward_backward_s=step_times[1])
    if isinstance(model, egru.EGRU) and model.backend != "reference" and DEVICE.type == "cpu":
        # fraction of the dense W_hᵀδ MACs the backward pass did (1.0: dense mode, see event.py)
        from egru.kernels import event

        event.runtime.counters.reset()
        step()
        H, T, B = model.hidden_size, x.shape[0], x.shape[1]
        result["backward_recurrent_fraction"] = event.runtime.counters.backward_recurrent / (3 * H * H * T * B)
    if memory:
        model.zero_grad(set_to_none=True)
        result["peak_memory_bytes"] = peak_memory(step)
    return result


def sparse_events(shape, activity: float, seed: int = 1) -> torch.Tensor:
    """A stacked layer's input: random normal values at a random ``activity`` fraction of entries."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < activity)


def pruned(model, density: float):
    """``model`` with every recurrent weight pruned to ``density`` by magnitude (1.0: as it is)."""
    if density < 1.0:
        from egru import prune

        prune.magnitude(model, 1.0 - density)
    return model


def compressed_fraction(model) -> float:
    """Bytes of a pruned layer's weights as the event kernels keep them (compressed rows:
    values, column indices and row starts, per presynaptic unit) over their dense float32
    bytes."""
    from egru.kernels import event

    event.runtime.kernels()
    keep_all = event.Settings(zoneout_p=0.0, gamma=1.0, k=1.0, dense_forward=False,
                              sparse_input_density=0.0, sparse_weight_grad_density=0.0,
                              weight_grad_tile_bytes=1, thread_mode="serial", sparse_weight_density=1.0)
    stored = dense = 0
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0"):
            w, mask = getattr(model, name + "_orig") * getattr(model, name + "_mask"), getattr(model, name + "_mask")
            rows, _ = event.runtime.compressed_rows(w, mask, keep_all)
            stored += rows.start.nbytes + rows.idx.nbytes + rows.vals.nbytes
            dense += w.numel() * 4
    return stored / dense


def run(batches, hiddens, activities, backends, steps, repeats, reference_max_hidden, inputs,
        support_k=1.0, weight_densities=(1.0,), input_size=None):
    rows = []
    for H in hiddens:
        I = input_size or H
        for B in batches:
            torch.manual_seed(0)
            x_dense = torch.randn(steps, B, I).to(DEVICE)
            gru = torch.nn.GRU(I, H).to(DEVICE)
            lstm = torch.nn.LSTM(I, H).to(DEVICE)
            for mode in inputs:
                input_grad = mode == "sparse"  # a stacked layer passes its gradient down
                base = {"B": B, "H": H, "I": I, "T": steps, "input": mode, "input_grad": input_grad}
                gru_row = {**base, "model": "nn.GRU",
                           **time_model(gru, x_dense, repeats, input_grad=input_grad)}
                rows.append(gru_row)
                print(_fmt(gru_row, gru_row), flush=True)
                if mode == "dense":
                    rows.append({**base, "model": "nn.LSTM",
                                 **time_model(lstm, x_dense, repeats, input_grad=input_grad)})
                    print(_fmt(rows[-1], gru_row), flush=True)
                for target in activities:
                    x = x_dense if mode == "dense" else sparse_events(x_dense.shape, target).to(DEVICE)
                    for density in weight_densities:
                        for backend in backends:
                            if backend == "reference" and H > reference_max_hidden:
                                continue
                            model = pruned(egru.EGRU.from_gru(
                                gru, backend=backend, pseudo_derivative_support=support_k), density)
                            set_threshold_like(model, (mode, target, density), gru, x, target)
                            row = {**base, "model": f"EGRU[{backend}]", "support_k": support_k,
                                   "target_activity": target, "weight_density": density,
                                   "activity": measure_activity(model, x),
                                   **({"compressed_weight_fraction": compressed_fraction(model)}
                                      if density < 1.0 else {}),
                                   **time_model(model, x, repeats, input_grad=input_grad,
                                                alongside=(gru, x_dense))}
                            rows.append(row)
                            print(_fmt(row, gru_row), flush=True)
    return rows


_thresholds: dict = {}


def set_threshold_like(model, key, gru, x, target) -> None:
    """Give ``model`` the threshold found for (gru, key) on ``x``, searching it once (key ends
    with the weight density the probe is pruned to)."""
    key = (id(gru), key)
    if key not in _thresholds:
        probe = pruned(egru.EGRU.from_gru(gru, backend="event").cpu(), key[1][-1])  # searched on the CPU
        set_activity(probe, x.cpu(), target)
        _thresholds[key] = probe.threshold_l0.detach().clone()
    with torch.no_grad():
        for threshold in model.thresholds():
            threshold.copy_(_thresholds[key])


def ratios(row, gru_row) -> tuple:
    """nn.GRU's time over the row's, forward and forward+backward: against nn.GRU timed
    alongside the row where it was, else against the nn.GRU row of the same (B, H, input)."""
    gru_fwd = row.get("gru_forward_s", gru_row["forward_s"])
    gru_fb = row.get("gru_forward_backward_s", gru_row["forward_backward_s"])
    return gru_fwd / row["forward_s"], gru_fb / row["forward_backward_s"]


def _fmt(row, gru_row) -> str:
    name = row["model"]
    if "activity" in row:
        name += f" act={row['activity']:.3f}"
    if row.get("weight_density", 1.0) < 1.0:
        name += f" wd={row['weight_density']:.2f}"
    fwd, fb = row["forward_s"], row["forward_backward_s"]
    r_fwd, r_fb = ratios(row, gru_row)
    mem = row.get("peak_memory_bytes", 0) / 2**20
    bwd = row.get("backward_recurrent_fraction")
    return (f"B={row['B']:<3} H={row['H']:<5} {row['input']:<6} {name:<28} fwd {fwd * 1e3:9.1f} ms "
            f"({r_fwd:5.2f}x GRU)  fwd+bwd {fb * 1e3:9.1f} ms "
            f"({r_fb:5.2f}x GRU)  peak {mem:7.1f} MiB"
            + ("" if bwd is None else f"  bwd W_h^T.delta {bwd:4.2f} of dense")
            + ("" if "compressed_weight_fraction" not in row
               else f"  weights stored {row['compressed_weight_fraction']:.1%} of dense f32"))


def markdown_table(rows) -> str:
    """The rows of a results file as the markdown table of docs/speed.md (ratios: see
    :func:`ratios`)."""
    lines = ["| input | B | H | model | act | fwd ms | ×GRU | fwd+bwd ms | ×GRU | peak MiB | bwd W_hᵀδ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    grus = {(r["B"], r["H"], r["input"]): r for r in rows if r["model"] == "nn.GRU"}
    for r in rows:
        r_fwd, r_fb = ratios(r, grus[(r["B"], r["H"], r["input"])])
        act = f"{r['activity']:.3f}" if "activity" in r else ""
        if r.get("weight_density", 1.0) < 1.0:
            act += f", weights {r['weight_density']:.2f}"
        bwd = r.get("backward_recurrent_fraction")
        lines.append(
            f"| {r['input']} | {r['B']} | {r['H']} | {r['model']} | {act} | "
            f"{r['forward_s'] * 1e3:.1f} | {r_fwd:.2f} | {r['forward_backward_s'] * 1e3:.1f} | "
            f"{r_fb:.2f} | {r.get('peak_memory_bytes', 0) / 2**20:.1f} | "
            f"{'' if bwd is None else f'{bwd:.2f}'} |")
    return "\n".join(lines)


def load_table(pairs) -> str:
    """Forward times of runs without and with ``--busy`` as a markdown table: per row, the quiet
    and busy times of each (quiet, busy) pair of result files, the busy/quiet ratio of each pair,
    and the busy EGRU's speed against nn.GRU timed alongside it."""
    runs = []
    for quiet, busy in pairs:
        with open(quiet) as fq, open(busy) as fb:
            runs.append((json.load(fq)["rows"], json.load(fb)["rows"]))

    def key(r):
        return r["B"], r["H"], r["input"], r["model"], r.get("target_activity")

    lines = ["| B | H | input | model | act | fwd quiet ms | fwd busy ms | busy / quiet | ×nn.GRU busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in runs[0][0]:
        matches = [({key(r): r for r in q}[key(row)], {key(r): r for r in b}[key(row)]) for q, b in runs]
        quiet = [q["forward_s"] * 1e3 for q, _ in matches]
        busy = [b["forward_s"] * 1e3 for _, b in matches]
        against = [b["gru_forward_s"] / b["forward_s"] for _, b in matches if "gru_forward_s" in b]
        act = f"{row['activity']:.3f}" if "activity" in row else ""
        lines.append(
            f"| {row['B']} | {row['H']} | {row['input']} | {row['model']} | {act} | "
            + " | ".join([", ".join(f"{v:.1f}" for v in quiet), ", ".join(f"{v:.1f}" for v in busy),
                          ", ".join(f"{b / q:.1f}×" for q, b in zip(quiet, busy)),
                          ", ".join(f"{v:.1f}×" for v in against)]) + " |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            **({"gpu": torch.cuda.get_device_name()} if DEVICE.type == "cuda" else {})}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--activity", type=float, nargs="+", default=[1.0, 0.5, 0.1, 0.01],
                        help="target activities (1 − sparsity)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="EGRU backends (default: event auto reference; on CUDA triton reference)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (default: cpu)")
    parser.add_argument("--input", nargs="+", choices=["dense", "sparse"], default=["dense", "sparse"],
                        help="dense: a first layer's data input; sparse: a stacked layer's event input")
    parser.add_argument("--support-k", type=float, default=1.0,
                        help="the surrogate's pseudo_derivative_support k (support half-width 1/k)")
    parser.add_argument("--weight-density", type=float, nargs="+", default=[1.0],
                        help="fractions of the EGRU's weights kept, pruned by magnitude with "
                             "egru.prune (1.0: not pruned); nn.GRU stays dense")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--input-size", type=int, default=None,
                        help="input features (default: H); sequential MNIST has 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-max-hidden", type=int, default=256,
                        help="largest H the (slow) reference backend is timed at")
    parser.add_argument("--quick", action="store_true", help="H=256, activities 0.5 and 0.1, 3 repeats")
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="time beside N CPU-bound competitor processes (default 0: none)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", metavar="JSON", help="print a results file as a markdown table and exit")
    parser.add_argument("--load-table", metavar="JSON", nargs="+",
                        help="QUIET BUSY [QUIET BUSY ...]: result files without and with --busy "
                             "as a markdown table of forward times, and exit")
    args = parser.parse_args(argv)
    if args.load_table:
        files = args.load_table
        if len(files) % 2:
            parser.error("--load-table takes pairs of files: QUIET BUSY [QUIET BUSY ...]")
        print(load_table(list(zip(files[::2], files[1::2]))))
        return
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_table(json.load(f)["rows"]))
        return
    if args.quick:
        args.hidden, args.activity, args.repeats = [256], [0.5, 0.1], 3
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.backends is None:
        args.backends = ["triton", "reference"] if DEVICE.type == "cuda" else ["event", "auto", "reference"]
    torch.set_num_threads(args.threads)
    try:
        import numba

        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    info = {**machine(), "busy_processes": args.busy}
    print(json.dumps(info))
    with busy_cores(args.busy):
        rows = run(args.batch, args.hidden, args.activity, args.backends, args.steps, args.repeats,
                   args.reference_max_hidden, args.input, args.support_k, args.weight_density,
                   args.input_size)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
