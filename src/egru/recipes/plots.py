"""PNG plots of a run: what people would rather look at than read. Needs matplotlib."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _records(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_language_model_run(run_dir, model, corpus, device, units: int = 48, tokens: int = 120) -> list:
    """perplexity.png, activity.png (EGRU) and raster.png (EGRU) in ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    records = _records(run_dir)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        pts = [(r["step"], r["perplexity"]) for r in records if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts), style, label=split, markersize=3)
    ax.set(xlabel="step", ylabel="perplexity", yscale="log", title=f"{model.cfg.model} on {model.cfg.dataset}")
    ax.legend()
    paths.append(_save(fig, run_dir / "perplexity.png"))

    if model.cfg.model != "egru":
        return paths
    fig, ax = plt.subplots(figsize=(6, 4))
    for split, style in (("train", "-"), ("valid", "o--")):
        pts = [(r["step"], r["layers"]) for r in records if r["split"] == split and "layers" in r]
        for name in (pts[0][1] if pts else {}):
            ax.plot([p[0] for p in pts], [p[1][name]["activity"] for p in pts], style,
                    label=f"{name} ({split})", markersize=3)
    ax.set(xlabel="step", ylabel="activity (fraction of units with an event)", title="activity per layer")
    ax.legend(fontsize=7)
    paths.append(_save(fig, run_dir / "activity.png"))

    model.eval()
    with torch.no_grad():
        text = corpus.test[:tokens].view(-1, 1).to(device)
        _, _, layer_records = model(text, model.initial_state(1), record=True)
    fig, axes = plt.subplots(len(layer_records), 1, figsize=(8, 2 + 1.5 * len(layer_records)), squeeze=False)
    for i, (ax, rec) in enumerate(zip(axes[:, 0], layer_records)):
        events = rec.e[:, 0, :units].cpu().T  # (units, T)
        t, u = torch.nonzero(events.T, as_tuple=True)
        ax.scatter(t.numpy(), u.numpy(), s=4, marker="|", color="black")
        ax.set(ylabel=f"layer {i} unit", xlim=(-1, tokens), ylim=(-1, min(units, events.shape[0])))
    axes[-1, 0].set_xlabel("test token")
    fig.suptitle(f"events of the first {units} units over {tokens} test tokens")
    paths.append(_save(fig, run_dir / "raster.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
