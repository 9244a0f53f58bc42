"""What the studies (``prune_study.py``, ``online_study.py``) share: every run is an ordinary
``egru train <recipe>`` command in its own folder under the study's root, trained side by side
on one thread each, and resumed from its ``last.pt`` when it was interrupted."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def command(recipe: str, name: str, args: list, root: Path) -> list:
    """The command line of run ``name``: ``egru train <recipe> <args>`` into ``root/name``."""
    return ["egru", "train", recipe, *args, "--run-dir", str(root / name), "--no-progress"]


def train(recipe: str, name: str, args: list, root: Path) -> str:
    """Train run ``name`` unless it has finished (resuming it when it has begun); one line on
    how it went."""
    run_dir = root / name
    if (run_dir / "results.json").exists():
        return f"{name}: done before"
    cmd = command(recipe, name, args, root)
    beside = Path(sys.executable).with_name("egru")  # this environment's, activated or not
    if beside.exists():
        cmd[0] = str(beside)
    if (run_dir / "last.pt").exists():
        cmd.append("--resume")
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    with open(run_dir / "log.txt", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return f"{name}: {'finished' if code == 0 else f'failed ({code}), see {run_dir}/log.txt'}"


def train_all(recipe: str, grid: dict, root: Path, jobs: int) -> None:
    """Train every run of ``grid`` (name → arguments), ``jobs`` at a time."""
    with ThreadPoolExecutor(jobs) as pool:
        for line in pool.map(lambda item: train(recipe, *item, root), grid.items()):
            print(line, flush=True)


def arguments(doc: str, root_help: str) -> argparse.ArgumentParser:
    """A study's command line: ``commands``, ``run`` or ``report``, and where the runs are."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "report", "commands"))
    parser.add_argument("--root", type=Path, help=root_help)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side (one thread each)")
    parser.add_argument("--only", nargs="*", help="run names to train (default: all of them)")
    parser.add_argument("--plot", help="where report draws the figure (PNG)")
    return parser


def act(args, recipe: str, grid: dict, report) -> None:
    """Print the commands of, train (``--only`` those named) or report (``report()``) a study."""
    grid = {name: a for name, a in grid.items() if not args.only or name in args.only}
    if args.action == "commands":
        for name, run_args in grid.items():
            print(" ".join(command(recipe, name, run_args, args.root)))
    elif args.action == "run":
        train_all(recipe, grid, args.root, args.jobs)
    else:
        report()


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
