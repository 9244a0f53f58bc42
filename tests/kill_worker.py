"""Kills real `egru train classify` processes at their file writes, resumes them, and reports
what each run left, for tests/test_resume.py.

Usage: python kill_worker.py WORK_DIR ARGV_JSON

The worker imports torch and egru once and runs no torch operation itself; every run is a child
forked from it (so each pays no import), running ``egru.cli.main`` on generated sequences. A run
told to stop at write ``n`` counts the renames that :func:`egru.recipes.common.write_atomic`
makes of the run's files (``last.pt``, ``best.pt``, ``results.json``, ``metrics.jsonl``) and, at
the ``n``-th, sends itself a signal:

* ``kill-before``: SIGKILL with the temporary file written and not yet renamed (what a crash
  anywhere in the write leaves);
* ``kill-after``: SIGKILL just after the rename;
* ``interrupt``: SIGINT (Ctrl-C) just before the rename.

Then it resumes the run (``--resume``, no signal) until it exits 0, at most three times. The
first line of stdout is a JSON list of the reference run's writes; then one JSON line per
scenario: ``{"write", "how", "signal", "exits", "files"}``, files: what :func:`snapshot` reads.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from egru import cli
from egru.recipes import classify, common, harness

import egru.recipes.plots  # noqa: F401  (imported once here rather than in every child)


def generated_sequences(data_dir=None, download=False) -> classify.Sequences:
    """48 training and 16 test sequences of 6 steps, 3 features, 4 classes that the mean input
    tells apart (so that validation improves, and best.pt is written, more than once)."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.randn(3, 4, generator=generator)

    def split(n):
        x = torch.randn(n, 6, 3, generator=generator)
        return x, (x.mean(1) @ classes).argmax(1)

    return classify.Sequences({"train": split(48), "test": split(16)}, num_classes=4)


SIGNALS = {"kill-before": signal.SIGKILL, "kill-after": signal.SIGKILL, "interrupt": signal.SIGINT}


def child(argv: list, stop_at: int = 0, how: str = "", writes_file: str = "") -> None:
    """In a forked child: run the command, signalling itself at the ``stop_at``-th write (0:
    never); record the writes' names in ``writes_file``. Exits with the command's status."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the command's summary: this worker's stdout is its report
    torch.set_num_threads(1)
    classify.TASKS["mnist1d"] = generated_sequences
    writes, replace = [], os.replace

    def counted_replace(src, dst):
        name = Path(dst).name
        if name not in harness.RUN_FILES:
            return replace(src, dst)
        writes.append(name)
        stop = len(writes) == stop_at
        if stop and how in ("kill-before", "interrupt"):
            os.kill(os.getpid(), SIGNALS[how])
        replace(src, dst)
        if stop and how == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)

    common.os.replace = counted_replace
    code = cli.main(argv)
    if writes_file:
        Path(writes_file).write_text(json.dumps(writes))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_forked(*args) -> int:
    """Fork, run :func:`child`, wait: the exit status, or minus the signal that ended it."""
    pid = os.fork()
    if pid == 0:
        try:
            child(*args)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def snapshot(run_dir: Path) -> dict:
    """What a finished run left: results (without timings), the validation records, the model of
    last.pt and best.pt (as lists), their positions, leftover temporary files."""
    def model(name):
        ckpt = torch.load(run_dir / name, map_location="cpu", weights_only=False)
        return {"position": ckpt["position"],
                "model": {k: v.tolist() for k, v in ckpt["model"].items()}}

    results = json.loads((run_dir / "results.json").read_text())
    for key in ("train_seconds", "train_tokens_per_second", "train_sequences_per_second"):
        results.pop(key, None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"results": results, "last": model("last.pt"), "best": model("best.pt"),
            "records": [(r["step"], r["split"], r.get("loss")) for r in records],
            "temporaries": sorted(p.name for p in run_dir.glob("*.tmp"))}


def main(work: Path, argv: list) -> None:
    reference = work / "reference"
    writes_file = work / "writes.json"
    assert run_forked(argv + ["--run-dir", str(reference)], 0, "", str(writes_file)) == 0
    writes = json.loads(writes_file.read_text())
    print(json.dumps({"writes": writes, "files": snapshot(reference)}), flush=True)
    for n in range(1, len(writes) + 1):
        for how in SIGNALS:
            run_dir = work / f"{how}-{n}"
            args = argv + ["--run-dir", str(run_dir)]
            exits = [run_forked(args, n, how)]
            while exits[-1] != 0 and len(exits) < 4:
                exits.append(run_forked(args + ["--resume"]))
            files = snapshot(run_dir) if exits[-1] == 0 else None
            print(json.dumps({"write": n, "name": writes[n - 1], "how": how, "exits": exits,
                              "files": files}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
