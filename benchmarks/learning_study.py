"""What makes the EGRU learn as well as the GRU: the study of docs/sequences.md.

Every run is an ordinary ``egru train classify`` command on the 196-step proxy of sequential MNIST
(four pixels per step, 128 units, batch 64, AdamW 2e-3 at a constant rate, clipping at 0.25,
1,000 training images held out and validated every 100 steps); the EGRU's candidates change one
thing at a time against the recipe's EGRU, and the GRU and LSTM run on the same budget.
``commands`` prints them, ``run`` trains the missing ones (``--jobs`` at a time, one thread
each, resuming interrupted ones), ``report`` tabulates validation accuracy at fixed step budgets
with activity sparsity and draws the learning curves.

    export EGRU_DATA_DIR=../shared/data
    python benchmarks/learning_study.py run --jobs 2
    python benchmarks/learning_study.py report --plot docs/learning-study.png
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studies  # noqa: E402  (benchmarks/studies.py: how a study's runs are trained)

RECIPE = "classify"

PROXY = ["--task", "smnist", "--pixels-per-step", "4", "--hidden-size", "128", "--batch-size", "64",
         "--lr", "2e-3", "--threshold-lr", "2e-3", "--clip", "0.25", "--constant-fraction", "1", "--valid-size", "1000", "--eval-every", "100", "--test-size", "2000",
         "--neurobench", "0"]
STEPS = 600  # each run's budget in optimizer steps (--steps changes it)
STEPS_PER_EPOCH = 922  # ⌈59,000 training images / 64⌉: the epochs a budget needs (the rate is constant)
BUDGETS = (200, 400, 600, 900, 2000)  # the report's columns, those a run reached

# The recipe's EGRU on this task (cpu-smnist's core), and each candidate as what it changes.
EGRU = ["--model", "egru", "--readout", "mean", "--pseudo-derivative-support", "1.0"]
CANDIDATES = {
    "egru": [],
    "egru-last": ["--readout", "last"],
    "egru-gamma3.6": ["--dampening-factor", "3.6"],
    "egru-threshold0.3": ["--threshold-mean", "0.3"],
    "egru-gamma0.3": ["--dampening-factor", "0.3"],
    "egru-gamma3.6-k3.6": ["--dampening-factor", "3.6", "--pseudo-derivative-support", "3.6"],
    "egru-k2": ["--pseudo-derivative-support", "2.0"],
    "egru-evnn": ["--init", "evnn"],
    "egru-lr1e-3": ["--lr", "1e-3", "--threshold-lr", "1e-3"],
    "egru-sigmoid": ["--threshold-parametrization", "sigmoid"],
    "egru-k3": ["--pseudo-derivative-support", "3.0"],
    "egru-k5": ["--pseudo-derivative-support", "5.0"],
    "egru-k10": ["--pseudo-derivative-support", "10.0"],
    "egru-k3-threshold0.3": ["--pseudo-derivative-support", "3.0", "--threshold-mean", "0.3"],
    "egru-threshold0.3-k2": ["--threshold-mean", "0.3", "--pseudo-derivative-support", "2.0"],
}
BASELINES = {"gru-last": ["--model", "gru", "--readout", "last"],
             "gru-mean": ["--model", "gru", "--readout", "mean"]}


def runs(steps: int = STEPS, seeds=(0,)) -> dict:
    """Run name → the arguments of its ``egru train classify`` command."""
    grid = {}
    for seed in seeds:
        tail = ["--epochs", str(-(-steps // STEPS_PER_EPOCH)), "--max-steps", str(steps), "--seed", str(seed)]
        suffix = f"-s{seed}" if seed else ""
        for name, changes in BASELINES.items():
            grid[name + suffix] = PROXY + changes + tail
        for name, changes in CANDIDATES.items():
            grid[name + suffix] = PROXY + EGRU + changes + tail
    return grid


def measure(run_dir: Path) -> dict:
    """The validation curve (step → accuracy), the gradient through time at the last validation
    that logged one, the final test accuracy and activity."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    valid = [r for r in records if r["split"] == "valid"]
    gradients = [r["gradient_through_time"]["layer0"] for r in valid if "gradient_through_time" in r]
    out = {"curve": {r["step"]: r["accuracy"] for r in valid}, "gradient": gradients[-1] if gradients else None,
           "test": None, "activity": None}
    results = run_dir / "results.json"
    if results.exists():
        result = json.loads(results.read_text())
        layers = list(result["test"]["layers"].values())
        out.update(test=result["test"]["accuracy"], activity=sum(l["activity"] for l in layers) / len(layers),
                   tokens_per_second=result["train_tokens_per_second"])
    return out


def report(root: Path, plot, grid: dict) -> None:
    rows = {name: measure(root / name) for name in grid if (root / name / "metrics.jsonl").exists()}
    print("| run | " + " | ".join(f"valid @{b}" for b in BUDGETS) + " | test | activity sparsity |")
    print("|---|" + "---|" * (len(BUDGETS) + 2))
    for name, m in rows.items():
        cells = [f"{m['curve'][b]:.1%}" if b in m["curve"] else "" for b in BUDGETS]
        test = f"{m['test']:.1%}" if m["test"] is not None else ""
        sparsity = f"{1 - m['activity']:.1%}" if m["activity"] is not None and "egru" in name else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {test} | {sparsity} |")
    print("\nMean over the seeds run (valid accuracy; activity sparsity of the EGRUs):\n")
    print("| run | seeds | " + " | ".join(f"valid @{b}" for b in BUDGETS) + " | test | activity sparsity |")
    print("|---|---|" + "---|" * (len(BUDGETS) + 2))
    for base, members in seed_groups(rows).items():
        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        cells = [mean([m["curve"].get(b) for m in members]) for b in BUDGETS]
        cells = [f"{c:.1%}" if c is not None else "" for c in cells]
        test, activity = mean([m["test"] for m in members]), mean([m["activity"] for m in members])
        sparsity = f"{1 - activity:.1%}" if activity is not None and "egru" in base else ""
        print(f"| {base} | {len(members)} | " + " | ".join(cells) + f" | {'' if test is None else f'{test:.1%}'} | "
              f"{sparsity} |")
    if plot:
        draw(rows, plot)


def seed_groups(rows: dict) -> dict:
    """Runs grouped by name without their seed suffix (``-s1``, ``-s2``)."""
    groups = {}
    for name, m in rows.items():
        base = re.sub(r"-s\d+$", "", name)
        groups.setdefault(base, []).append(m)
    return groups


def draw(rows: dict, path) -> None:
    """Validation accuracy against steps, and the gradient reaching each time step at the last
    validation (EGRU beside GRU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gradients) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, (name, m) in enumerate(rows.items()):
        style = "-" if name.startswith("egru") else "--"
        steps = sorted(m["curve"])
        curves.plot(steps, [m["curve"][s] for s in steps], style, marker="o", ms=3, color=f"C{i % 10}", label=name)
        if m["gradient"]:
            gradients.plot([v if v > 0 else float("nan") for v in m["gradient"]], style, color=f"C{i % 10}",
                           label=name)
    curves.set(xlabel="training step (batch 64)", ylabel="validation accuracy",
               title="sequential MNIST, 4 pixels per step (196 steps), 128 units")
    curves.legend(fontsize=7, ncol=2)
    curves.grid(alpha=0.3)
    gradients.set(xlabel="time step t", ylabel="‖∂L/∂s_t‖ at the last validation", yscale="log",
                  title="the gradient reaching each step")
    gradients.legend(fontsize=7, ncol=2)
    gradients.grid(alpha=0.3)
    studies.save(fig, path)


def main(argv=None) -> None:
    parser = studies.arguments(__doc__, "folder of the runs (default: runs/learning-study)")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="seeds (default: 0)")
    args = parser.parse_args(argv)
    args.root = args.root or Path("runs/learning-study")
    grid = {name: a for name, a in runs(args.steps, args.seeds).items() if not args.only or name in args.only}
    studies.act(args, RECIPE, grid, lambda: report(args.root, args.plot, grid))


if __name__ == "__main__":
    sys.exit(main())
