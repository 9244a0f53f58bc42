"""PNG plots of a run: what people would rather look at than read. Needs matplotlib."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

import egru

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(run_dir, task, model, units: int = 48) -> list:
    """The learning curves (``<metric>.png`` for each of ``task.curves`` that was logged),
    ``activity.png`` (when some layer was not always fully active), ``health.png`` (event
    layers' silent and saturated units, thresholds, and the gradient norm), ``gradient.png``
    (the gradient reaching each time step, at every validation) and ``raster.png`` (when the
    model has event-based layers) in ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    paths = [plot_curve(run_dir, records, metric, yscale, task.title) for metric, yscale in task.curves
             if any(metric in r for r in records if r["split"] in ("train", "valid"))]
    activity = [layer["activity"] for r in records for layer in r.get("layers", {}).values()]
    if any(a < 1 for a in activity):
        paths.append(plot_activity(run_dir, records))
    if any("silent_units" in layer for r in records for layer in r.get("layers", {}).values()):
        paths.append(plot_health(run_dir, records))
    if any("gradient_through_time" in r for r in records):
        paths.append(plot_gradient_through_time(run_dir, records))
    events = [r for r in task.example_records(model) if isinstance(r, egru.LayerRecord)]
    if events:
        paths.append(plot_raster(run_dir, events, units))
    return paths


def plot_curve(run_dir: Path, records: list, metric: str, yscale: str, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        pts = [(r["step"], r[metric]) for r in records if r["split"] == split and metric in r]
        if pts:
            ax.plot(*zip(*pts), style, label=split, markersize=3)
    ax.set(xlabel="step", ylabel=metric, yscale=yscale, title=title)
    ax.legend()
    return _save(fig, run_dir / f"{metric}.png")


def plot_activity(run_dir: Path, records: list) -> Path:
    """Each layer in one colour: training as a line, validation as dashed points."""
    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({name for r in records if r["split"] == "train" for name in r.get("layers", {})})
    for i, name in enumerate(names):
        color = f"C{i % 10}"  # matplotlib's colour cycle
        for split, style in (("train", "-"), ("valid", "o--")):
            pts = [(r["step"], r["layers"][name]["activity"]) for r in records
                   if r["split"] == split and name in r.get("layers", {})]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{name} ({split})", markersize=3)
    ax.set(xlabel="step", ylabel="activity (fraction of units with an event)", title="activity per layer")
    ax.legend(fontsize=7)
    return _save(fig, run_dir / "activity.png")


def plot_health(run_dir: Path, records: list) -> Path:
    """Training's view of the event layers (:mod:`egru.diagnostics`): silent and saturated units,
    the thresholds' median between their 10 % and 90 % quantiles, and the gradient's norm
    before clipping."""
    train = [r for r in records if r["split"] == "train"]
    names = sorted({name for r in train for name, layer in r.get("layers", {}).items() if "silent_units" in layer})
    fig, (units, thresholds, norm) = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        rows = [(r["step"], r["layers"][name]) for r in train if "silent_units" in r["layers"].get(name, {})]
        steps = [step for step, _ in rows]
        units.plot(steps, [layer["silent_units"] for _, layer in rows], "-", color=color, label=f"{name} silent")
        units.plot(steps, [layer["saturated_units"] for _, layer in rows], ":", color=color,
                   label=f"{name} saturated")
        thresholds.plot(steps, [layer["threshold_q50"] for _, layer in rows], color=color, label=name)
        thresholds.fill_between(steps, [layer["threshold_q10"] for _, layer in rows],
                                [layer["threshold_q90"] for _, layer in rows], color=color, alpha=0.2)
    units.set(xlabel="step", ylabel="fraction of units", title="silent (no event) and saturated units")
    units.legend(fontsize=7)
    thresholds.set(xlabel="step", ylabel="threshold", title="thresholds: median, 10–90 %")
    thresholds.legend(fontsize=7)
    pts = [(r["step"], r["grad_norms"]["total"]) for r in train if r.get("grad_norms")]
    if pts:
        norm.plot(*zip(*pts), "-")
    norm.set(xlabel="step", ylabel="‖∇‖ before clipping", yscale="log", title="gradient norm")
    return _save(fig, run_dir / "health.png")


def plot_gradient_through_time(run_dir: Path, records: list) -> Path:
    """``‖∂L/∂s_t‖`` against ``t`` for each layer, one curve per validation (later: darker)."""
    valid = [r for r in records if "gradient_through_time" in r]
    names = sorted(valid[0]["gradient_through_time"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for k, r in enumerate(valid):
            curve = [v if v > 0 else float("nan") for v in r["gradient_through_time"][name]]  # log scale
            ax.plot(range(len(curve)), curve, color=plt.cm.viridis(k / max(len(valid) - 1, 1)),
                    label=f"step {r['step']}" if k in (0, len(valid) - 1) else None)
        ax.set(xlabel="time step t", ylabel="‖∂L/∂s_t‖ (batch mean)", yscale="log",
               title=f"{name}: gradient reaching each step")
        ax.legend(fontsize=7)
    return _save(fig, run_dir / "gradient.png")


def plot_raster(run_dir: Path, layer_records: list, units: int) -> Path:
    steps = layer_records[0].e.shape[0]
    fig, axes = plt.subplots(len(layer_records), 1, figsize=(8, 2 + 1.5 * len(layer_records)), squeeze=False)
    for i, (ax, rec) in enumerate(zip(axes[:, 0], layer_records)):
        events = rec.e[:, 0, :units].cpu()  # (T, units) of the first sequence
        t, u = events.nonzero(as_tuple=True)
        ax.scatter(t.numpy(), u.numpy(), s=4, marker="|", color="black")
        ax.set(ylabel=f"layer {i} unit", xlim=(-1, steps), ylim=(-1, min(units, events.shape[1])))
    axes[-1, 0].set_xlabel("step of a test sequence")
    fig.suptitle(f"events of the first {units} units over {steps} steps of a test sequence")
    return _save(fig, run_dir / "raster.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
