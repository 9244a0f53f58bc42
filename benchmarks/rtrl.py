"""Cost of exact sparse RTRL (``egru.rtrl``) per step, and its memory, against dense RTRL and BPTT.

Two measurements, on one thread by default (``--threads``), in float32 by default (``--dtype``):

1. **Per influence update.** For each hidden size H, weight sparsity (the cell pruned with
   ``egru.prune.magnitude``) and target, one :class:`egru.EGRUCell` (input size ``--input-size``)
   is made and its threshold (one value for all units) is calibrated so that the fraction of
   units in G, the units with an event or inside the surrogate's support (those whose output
   depends on the parameters), is about the target (``--calibrate activity``: the fraction of
   units with an event instead). The sparse learner (``RTRL(cell)``) and the dense one
   (``RTRL(cell, sparse=False)``) then run side by side over the same stream of inputs, one
   ``step`` of each in turn (so both see the same state of the machine), each step followed by
   ``accumulate`` with a random ``∂L/∂y``: ``--warmup`` steps, then ``--steps`` timed steps.
   Reported per learner: the median wall time of ``step`` (the influence update, forward
   included) and of ``accumulate``, and the mean MACs per step (the learner's ``macs``
   counter, whose counting rule is in ``egru.rtrl``'s docstring; ``accumulate`` is not
   counted). BPTT on the same cell and inputs: forward over ``--bptt-steps`` steps with
   ``egru.functional.egru_layer`` and backward with autograd (loss ``Σ_t ⟨w_t, y_t⟩``,
   gradients for every parameter), median of ``--repeats`` sequences, divided by the number
   of steps. Activity and G fraction are measured on the timed steps (G of the previous
   step, which is what sets a step's cost) and printed with the threshold found.
   Dense RTRL is skipped above ``--dense-max-hidden`` (at H = 256 its influence matrix has
   57 M entries and one step does about 15 GMAC). Ratios, each above 1 where sparse RTRL is
   the cheaper: dense/sparse time of ``step`` and dense/sparse MACs; BPTT's time per step over
   sparse RTRL's ``step`` + ``accumulate`` (both give the gradient of every step's loss).

2. **Peak memory against sequence length T** (``--memory-steps``, at ``--memory-hidden``, the
   first target, ``--memory-weight-sparsity``): the peak of the bytes held by torch's CPU
   allocator during one whole sequence, above what was held before, from the profiler's raw
   memory events (``torch.profiler``, ``profile_memory=True``; as ``benchmarks/speed.py``'s
   ``peak_memory``, but from each allocation and free rather than each operator's net bytes,
   which also catches the peaks inside an operator and is fast enough for T = 10000). RTRL:
   a fresh learner, ``reset``, then T times ``step`` + ``accumulate``; BPTT: forward over the
   T steps + backward. Besides, the bytes a learner holds after the sequence (influence
   matrix, state, slopes, column tables) and the bytes BPTT's autograd graph saves (unique
   storages saved for backward, parameters and inputs left out). The profiler slows an RTRL
   step to about 10 ms (H = 32, B = 1), so T = 10000 takes a minute or two per learner, and it
   keeps every event: for dense RTRL at T = 10000 that outgrew 24 GiB (``--memory-methods
   rtrl-sparse bptt`` leaves it out). ``--memory-steps`` with no value skips the measurement.

Inputs (``--input``): ``dense``, random normal; ``sparse``, random normal values at a random
``--input-density`` fraction of the entries (a stacked layer's events). The surrogate is the
cell's triangle with ``--support-k`` (half-width 1/k): with the cell's default k = 1 the
support covers nearly all candidate states of a fresh cell, so a G fraction much below 1
comes only with silent units; the default k = 10 leaves room for both events and G.

    python benchmarks/rtrl.py --out rtrl.json                  # the full grid (H 16..128)
    python benchmarks/rtrl.py --quick --out /tmp/q.json        # H=16, a few steps (smoke test)
    python benchmarks/rtrl.py --hidden 256 --dense-max-hidden 128 --out rtrl256.json
    python benchmarks/rtrl.py --batch 1 8 --input dense sparse --target 0.05 0.1 0.5 1.0
    python benchmarks/rtrl.py --calibrate activity --target 0.05 0.2   # targets are activities
    python benchmarks/rtrl.py --memory-steps 100 1000 10000 --memory-hidden 32 64
    python benchmarks/rtrl.py --markdown rtrl.json             # a results file as markdown tables
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import sys
from pathlib import Path

import torch

import egru
from egru import functional
from egru.rtrl import RTRL
from egru.state import EGRUState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import machine  # noqa: E402  (benchmarks/speed.py: the machine a result was measured on)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
LEARNERS = ("rtrl-sparse", "rtrl-dense")


# --- the cell and its inputs ---------------------------------------------------------------

def make_cell(I: int, H: int, weight_sparsity: float, support_k: float, dtype, seed: int = 0):
    """A fresh cell (the same weights for a given seed and size), pruned by magnitude."""
    torch.manual_seed(seed)
    cell = egru.EGRUCell(I, H, dtype=dtype, pseudo_derivative_support=support_k)
    if weight_sparsity > 0:
        egru.prune.magnitude(cell, weight_sparsity)
    return cell


def effective(cell, name: str) -> torch.Tensor:
    """The weight the cell computes with (``_orig · _mask`` when pruned), in the graph."""
    if hasattr(cell, name + "_orig"):
        return getattr(cell, name + "_orig") * getattr(cell, name + "_mask")
    return getattr(cell, name)


def inputs(T: int, B: int, I: int, mode: str, density: float, dtype, seed: int) -> torch.Tensor:
    """(T, B, I) random normal inputs; ``sparse``: nonzero at a random ``density`` fraction."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=gen, dtype=dtype)
    if mode == "sparse":
        x = x * (torch.rand(T, B, I, generator=gen) < density).to(dtype)
    return x


def run_layer(cell, xs):
    """The cell over the sequence ``xs`` without gradients: egru.functional.LayerOutput."""
    B = xs.shape[1]
    with torch.no_grad():
        return functional.egru_layer(
            xs, EGRUState.zeros(B, cell.hidden_size, dtype=xs.dtype), effective(cell, "weight_ih"),
            effective(cell, "weight_hh"), cell.bias_ih, cell.bias_hh, cell.threshold, cell.surrogate)


def in_g(cell, out) -> torch.Tensor:
    """(T, B, H) True where a unit is in G after the step: an event, or inside the surrogate's
    support (the learner's test: ``∂y/∂ĉ`` or ``∂y/∂ϑ`` nonzero)."""
    slope = cell.surrogate.derivative(out.c_hat - cell.threshold.detach())
    return (out.e != 0) | (out.c_hat * slope != 0)


def stream_stats(cell, xs, first: int) -> tuple[float, float]:
    """Activity of steps ``first..T-1`` and the mean fraction of units in G of the step before
    each (``G_{t-1}``, which sets the cost of step t; the initial state has none)."""
    out = run_layer(cell, xs)
    g = in_g(cell, out).to(torch.float64).mean(dim=(1, 2))
    g_prev = torch.cat([g.new_zeros(1), g[:-1]])
    return float(out.e[first:].to(torch.float64).mean()), float(g_prev[first:].mean())


def calibrate(cell, xs, target: float, what: str, burn_in: int) -> tuple[float, float, float]:
    """Bisect one threshold for all units until the measured fraction (``g``: units in G,
    ``activity``: units with an event) over ``xs`` after ``burn_in`` steps is near ``target``.
    Sets the cell's threshold; returns (threshold, activity, g fraction)."""

    def measure(value):
        with torch.no_grad():
            cell.threshold.fill_(value)
        out = run_layer(cell, xs)
        act = float(out.e[burn_in:].to(torch.float64).mean())
        g = float(in_g(cell, out)[burn_in:].to(torch.float64).mean())
        return act, g

    low, high = -1.0, 3.0  # both fractions fall as the threshold rises
    best = None
    for _ in range(30):
        value = (low + high) / 2
        act, g = measure(value)
        got = g if what == "g" else act
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (value, got)
        if abs(got - target) <= 0.02 * target:
            break
        low, high = (value, high) if got > target else (low, value)
    value = best[0]
    return (value, *measure(value))


# --- per-step cost --------------------------------------------------------------------------

def time_learners(cell, xs, grads, warmup: int, learners: dict) -> dict:
    """Run the learners side by side over ``xs`` (one ``step`` + ``accumulate`` of each in
    turn, the order alternating from step to step); per learner, the median seconds of
    ``step`` and of ``accumulate`` and the mean MACs of ``step`` over the steps after
    ``warmup``."""
    B = xs.shape[1]
    for learner in learners.values():
        learner.reset(B)
    spent = {name: {"step": [], "accumulate": [], "macs": []} for name in learners}
    order = list(learners)
    for t in range(xs.shape[0]):
        for name in (order if t % 2 == 0 else order[::-1]):
            learner = learners[name]
            macs = learner.macs
            start = time.perf_counter()
            learner.step(xs[t])
            middle = time.perf_counter()
            learner.accumulate(grads[t])
            end = time.perf_counter()
            if t >= warmup:
                spent[name]["step"].append(middle - start)
                spent[name]["accumulate"].append(end - middle)
                spent[name]["macs"].append(learner.macs - macs)
    cell.zero_grad(set_to_none=True)
    return {name: {"step_s": statistics.median(s["step"]),
                   "accumulate_s": statistics.median(s["accumulate"]),
                   "macs_per_step": statistics.mean(s["macs"]),
                   "columns": learners[name].num_columns,
                   "influence_bytes": learners[name].influence_bytes()}
            for name, s in spent.items()}


def bptt_call(cell, xs, ws):
    """One BPTT pass: forward over ``xs`` with egru_layer, backward of ``Σ ⟨w_t, y_t⟩``."""
    B = xs.shape[1]

    def call():
        cell.zero_grad(set_to_none=True)
        out = functional.egru_layer(
            xs, EGRUState.zeros(B, cell.hidden_size, dtype=xs.dtype), effective(cell, "weight_ih"),
            effective(cell, "weight_hh"), cell.bias_ih, cell.bias_hh, cell.threshold, cell.surrogate)
        (out.y * ws).sum().backward()

    return call


def time_bptt(cell, xs, ws, repeats: int) -> dict:
    """Median seconds of a BPTT pass over ``xs`` (after one warm-up pass), and per step."""
    call = bptt_call(cell, xs, ws)
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    cell.zero_grad(set_to_none=True)
    sequence = statistics.median(times)
    return {"sequence_s": sequence, "step_s": sequence / xs.shape[0], "bptt_steps": xs.shape[0]}


# --- memory ---------------------------------------------------------------------------------

_CPU = {torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN, torch.autograd.DeviceType.IDEEP}


def peak_memory(fn) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn`` above what was held before, from
    the profiler's raw memory events (allocations positive, frees negative, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() in _CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def held_bytes(learner) -> int:
    """Bytes of every tensor a learner holds: influence, state, slopes, column tables."""
    tensors = [v for v in vars(learner).values() if isinstance(v, torch.Tensor)]
    tensors += [t for block in learner.blocks for t in block if isinstance(t, torch.Tensor)
                and t is not block.param]
    tensors += [m for m in learner.masks.values() if m is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_rtrl(cell, xs, grads, sparse: bool) -> dict:
    learner = None

    def sequence():
        nonlocal learner
        learner = RTRL(cell, sparse=sparse)
        learner.reset(xs.shape[1])
        for x, g in zip(xs, grads):
            learner.step(x)
            learner.accumulate(g)

    start = time.perf_counter()
    peak = peak_memory(sequence)
    seconds = time.perf_counter() - start
    cell.zero_grad(set_to_none=True)
    return {"peak_bytes": peak, "held_bytes": held_bytes(learner),
            "influence_bytes": learner.influence_bytes(), "seconds": seconds}


def memory_bptt(cell, xs, ws) -> dict:
    """Peak bytes of a BPTT pass, and the bytes its graph saves for backward (unique storages,
    the parameters and the inputs left out)."""
    outside = {t.untyped_storage().data_ptr() for t in (*cell.parameters(), *cell.buffers(), xs, ws)}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in outside:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    call = bptt_call(cell, xs, ws)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peak = peak_memory(call)
    seconds = time.perf_counter() - start
    cell.zero_grad(set_to_none=True)
    return {"peak_bytes": peak, "held_bytes": sum(saved.values()), "seconds": seconds}


# --- the grid -------------------------------------------------------------------------------

def run_steps(args, dtype) -> list:
    rows = []
    I = args.input_size
    for H in args.hidden:
        for s in args.weight_sparsity:
            cell = make_cell(I, H, s, args.support_k, dtype, args.seed)
            for B in args.batch:
                for mode in args.input:
                    for target in args.target:
                        rows += measure_config(args, cell, H, B, mode, s, target, dtype)
    return rows


def calibrated(args, cell, B, mode, target, dtype):
    """Calibrate the cell's threshold for ``target`` on its own stream; returns the base row."""
    xs = inputs(args.calibration_steps, B, args.input_size, mode, args.input_density, dtype, args.seed + 1)
    burn_in = min(args.warmup, args.calibration_steps // 4)  # as the timed steps follow a warm-up
    threshold, act, g = calibrate(cell, xs, target, args.calibrate, burn_in)
    print(f"  calibrated H={cell.hidden_size} B={B} input={mode} target {args.calibrate}={target:g}: "
          f"threshold {threshold:.4f} -> activity {act:.3f}, G fraction {g:.3f} "
          f"(calibration stream, {args.calibration_steps} steps)", flush=True)
    return threshold


def measure_config(args, cell, H, B, mode, s, target, dtype) -> list:
    threshold = calibrated(args, cell, B, mode, target, dtype)
    T = args.warmup + args.steps
    xs = inputs(max(T, args.bptt_steps), B, args.input_size, mode, args.input_density, dtype, args.seed + 2)
    gen = torch.Generator().manual_seed(args.seed + 3)
    grads = torch.randn(max(T, args.bptt_steps), B, H, generator=gen, dtype=dtype)
    activity, g = stream_stats(cell, xs[:T], args.warmup)
    base = {"B": B, "H": H, "I": args.input_size, "input": mode,
            **({"input_density": args.input_density} if mode == "sparse" else {}),
            "weight_sparsity": s, "target": target, "calibrate": args.calibrate,
            "support_k": args.support_k, "threshold": threshold, "activity": activity, "g_fraction": g,
            "dtype": args.dtype, "threads": args.threads}
    learners = {"rtrl-sparse": RTRL(cell, sparse=True)}
    if H <= args.dense_max_hidden:
        learners["rtrl-dense"] = RTRL(cell, sparse=False)
    timed = time_learners(cell, xs[:T], grads[:T], args.warmup, learners)
    rows = [{**base, "method": name, "steps": args.steps, **result} for name, result in timed.items()]
    rows.append({**base, "method": "bptt",
                 **time_bptt(cell, xs[:args.bptt_steps], grads[:args.bptt_steps], args.repeats)})
    print(step_line(rows), flush=True)
    return rows


def run_memory(args, dtype) -> list:
    rows = []
    I, B, mode, target = args.input_size, args.batch[0], args.input[0], args.target[0]
    for H in args.memory_hidden:
        for s in args.memory_weight_sparsity:
            cell = make_cell(I, H, s, args.support_k, dtype, args.seed)
            threshold = calibrated(args, cell, B, mode, target, dtype)
            for T in args.memory_steps:
                xs = inputs(T, B, I, mode, args.input_density, dtype, args.seed + 2)
                grads = torch.randn(T, B, H, generator=torch.Generator().manual_seed(args.seed + 3), dtype=dtype)
                base = {"B": B, "H": H, "I": I, "input": mode, "weight_sparsity": s, "target": target,
                        "calibrate": args.calibrate, "threshold": threshold, "T": T, "dtype": args.dtype}
                for method in args.memory_methods:
                    if method == "rtrl-dense" and H > args.dense_max_hidden:
                        continue
                    if method == "bptt":
                        result = memory_bptt(cell, xs, grads)
                    else:
                        result = memory_rtrl(cell, xs, grads, sparse=method == "rtrl-sparse")
                    rows.append({**base, "method": method, **result})
                    print(memory_line(rows[-1]), flush=True)
    return rows


# --- output ---------------------------------------------------------------------------------

def _key(row) -> tuple:
    return row["B"], row["H"], row["input"], row["weight_sparsity"], row["target"]


def step_line(rows) -> str:
    """One config's rows (sparse, dense if timed, BPTT) as one line."""
    by = {r["method"]: r for r in rows}
    sp, dn, bp = by["rtrl-sparse"], by.get("rtrl-dense"), by["bptt"]
    line = (f"B={sp['B']:<2} H={sp['H']:<4} {sp['input']:<6} wsp={sp['weight_sparsity']:.2f} "
            f"target {sp['calibrate']}={sp['target']:g}: act {sp['activity']:.3f} G {sp['g_fraction']:.3f} | "
            f"sparse {sp['step_s'] * 1e3:8.3f} ms (+acc {sp['accumulate_s'] * 1e3:.3f}) "
            f"{sp['macs_per_step']:10.4g} MAC")
    if dn is not None:
        line += (f" | dense {dn['step_s'] * 1e3:8.3f} ms {dn['macs_per_step']:10.4g} MAC | dense/sparse "
                 f"time {dn['step_s'] / sp['step_s']:6.2f}x MACs {dn['macs_per_step'] / sp['macs_per_step']:6.2f}x")
    else:
        line += " | dense skipped"
    return line + (f" | BPTT {bp['step_s'] * 1e3:.3f} ms/step (T={bp['bptt_steps']}), "
                   f"{bp['step_s'] / (sp['step_s'] + sp['accumulate_s']):.2f}x sparse step+acc")


def memory_line(row) -> str:
    return (f"B={row['B']:<2} H={row['H']:<4} wsp={row['weight_sparsity']:.2f} T={row['T']:<6} "
            f"{row['method']:<12} peak {row['peak_bytes'] / 2**20:9.3f} MiB  held/saved "
            f"{row['held_bytes'] / 2**20:9.3f} MiB  ({row['seconds']:.1f} s profiled)")


def _mib(row, field) -> str:
    return "" if row is None else f"{row[field] / 2**20:.3f}"


def markdown_tables(data) -> str:
    """The results file's two tables: per-step cost, and peak memory against T."""
    rows = data["rows"]
    configs = {}
    for r in rows:
        configs.setdefault(_key(r), {})[r["method"]] = r
    header = ("| B | H | input | w. sparsity | target | ϑ | activity | G | cols sparse | cols dense "
              "| sparse ms | +acc ms | dense ms | dense/sparse time | sparse MACs | dense MACs "
              "| dense/sparse MACs | BPTT ms/step | BPTT/(sparse+acc) time |")
    lines = [header, "|" + "---|" * 19]
    for by in configs.values():
        sp, dn, bp = by["rtrl-sparse"], by.get("rtrl-dense"), by.get("bptt")
        dense = ([""] * 5 if dn is None else  # columns, ms, time ratio, MACs, MAC ratio
                 [f"{dn['columns']}", f"{dn['step_s'] * 1e3:.3f}", f"{dn['step_s'] / sp['step_s']:.2f}×",
                  f"{dn['macs_per_step']:.4g}", f"{dn['macs_per_step'] / sp['macs_per_step']:.2f}×"])
        cells = [str(sp["B"]), str(sp["H"]), sp["input"], f"{sp['weight_sparsity']:.2f}",
                 f"{sp['calibrate']} {sp['target']:g}", f"{sp['threshold']:.3f}", f"{sp['activity']:.3f}",
                 f"{sp['g_fraction']:.3f}", str(sp["columns"]), dense[0],
                 f"{sp['step_s'] * 1e3:.3f}", f"{sp['accumulate_s'] * 1e3:.3f}", dense[1], dense[2],
                 f"{sp['macs_per_step']:.4g}", dense[3], dense[4],
                 "" if bp is None else f"{bp['step_s'] * 1e3:.3f}",
                 "" if bp is None else f"{bp['step_s'] / (sp['step_s'] + sp['accumulate_s']):.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    memory = data.get("memory") or []
    if memory:
        header = ("| B | H | w. sparsity | T | RTRL sparse peak MiB | held MiB | RTRL dense peak MiB "
                  "| held MiB | BPTT peak MiB | saved MiB | BPTT/RTRL sparse peak |")
        lines += ["", header, "|" + "---|" * 11]
        groups = {}
        for r in memory:
            groups.setdefault((r["B"], r["H"], r["weight_sparsity"], r["T"]), {})[r["method"]] = r
        for (B, H, s, T), by in groups.items():
            sp, dn, bp = by.get("rtrl-sparse"), by.get("rtrl-dense"), by.get("bptt")
            ratio = "" if sp is None or bp is None else f"{bp['peak_bytes'] / sp['peak_bytes']:.2f}×"
            lines.append(f"| {B} | {H} | {s:.2f} | {T} | {_mib(sp, 'peak_bytes')} | {_mib(sp, 'held_bytes')} "
                         f"| {_mib(dn, 'peak_bytes')} | {_mib(dn, 'held_bytes')} | {_mib(bp, 'peak_bytes')} "
                         f"| {_mib(bp, 'held_bytes')} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--target", type=float, nargs="+", default=[0.1, 0.5],
                        help="target fractions of units in G (or with an event, --calibrate activity)")
    parser.add_argument("--calibrate", choices=["g", "activity"], default="g",
                        help="what the threshold is calibrated on (default g: units in G)")
    parser.add_argument("--support-k", type=float, default=10.0,
                        help="the triangle surrogate's pseudo_derivative_support k (half-width 1/k)")
    parser.add_argument("--weight-sparsity", type=float, nargs="+", default=[0.0, 0.8],
                        help="fractions of each weight matrix pruned by magnitude (egru.prune)")
    parser.add_argument("--input", nargs="+", choices=["dense", "sparse"], default=["dense"])
    parser.add_argument("--input-density", type=float, default=0.1, help="nonzero fraction of sparse inputs")
    parser.add_argument("--steps", type=int, default=30, help="timed RTRL steps (median)")
    parser.add_argument("--warmup", type=int, default=20, help="RTRL steps before the timed ones (>= 1)")
    parser.add_argument("--bptt-steps", type=int, default=100, help="sequence length of the timed BPTT pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed BPTT passes (median)")
    parser.add_argument("--calibration-steps", type=int, default=200)
    parser.add_argument("--dense-max-hidden", type=int, default=128, help="largest H dense RTRL runs at")
    parser.add_argument("--memory-steps", type=int, nargs="*", default=[100, 1000, 10000],
                        help="sequence lengths of the memory measurement (none: skip it)")
    parser.add_argument("--memory-hidden", type=int, nargs="+", default=[32])
    parser.add_argument("--memory-weight-sparsity", type=float, nargs="+", default=[0.0])
    parser.add_argument("--memory-methods", nargs="+", choices=[*LEARNERS, "bptt"],
                        default=[*LEARNERS, "bptt"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="H=16, 5+5 steps, BPTT over 20 steps, memory at T 20 and 60")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", metavar="JSON", help="print a results file as markdown tables and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_tables(json.load(f)))
        return
    if args.quick:
        args.hidden, args.memory_hidden, args.steps, args.warmup = [16], [16], 5, 5
        args.bptt_steps, args.repeats, args.calibration_steps, args.memory_steps = 20, 2, 60, [20, 60]
    if args.warmup < 1:
        parser.error("--warmup must be at least 1")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    info = machine()
    print(json.dumps(info), flush=True)
    rows = run_steps(args, dtype)
    memory = run_memory(args, dtype) if args.memory_steps else []
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": rows, "memory": memory}, f, indent=1)


if __name__ == "__main__":
    main()
