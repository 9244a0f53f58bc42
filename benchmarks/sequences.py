"""The results table of classification runs (docs/sequences.md) from their ``results.json``.

    python benchmarks/sequences.py runs/smnist-egru runs/smnist-gru ...

One row per run: task, model, readout (last step or mean over steps), test accuracy, activity and backward sparsity per layer, forward
MACs per step against the same task's dense GRU (the GRU row of the same task and sizes, else
the EGRU's own dense count, which is the GRU's), training sequences per second, wall time, and
NeuroBench's figures where the run measured them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STEPS = {"smnist": 784, "psmnist": 784, "synthetic-dvs": 68, "dvs-gesture": 68, "mnist1d": 40, "fsdd": 64}


def load(run_dir) -> dict:
    result = json.loads((Path(run_dir) / "results.json").read_text())
    result["run"] = Path(run_dir).name
    return result


def row(result: dict, dense_gru_macs: float) -> list:
    cfg, test = result["config"], result["test"]
    layers = list(test["layers"].values())
    macs = sum(layer["effective_macs_per_token"] for layer in layers)
    per_second = result.get("train_sequences_per_second",
                            result["train_tokens_per_second"] / STEPS.get(cfg["task"], 1))
    cells = [cfg["task"], cfg["model"], cfg.get("readout", "last"), f"{test['accuracy']:.1%}",
             " / ".join(f"{1 - layer['activity']:.1%}" for layer in layers),
             " / ".join(f"{1 - layer['backward_activity']:.1%}" for layer in layers),
             f"{macs:,.0f} ({macs / dense_gru_macs:.2f})", f"{per_second:,.1f}",
             f"{result['train_seconds'] / 60:.0f} min"]
    nb = result.get("neurobench")
    if nb:
        ops = nb["SynapticOperations"]
        cells += [f"{nb['ActivationSparsity']:.1%}", f"{ops['Effective_MACs']:,.0f} of {ops['Dense']:,.0f}"]
    else:
        cells += ["", ""]
    return cells


def table(results: list) -> str:
    def dense_gru(result):
        """The dense GRU's forward MACs per step for the run's task and sizes."""
        same = [r for r in results if r["config"]["model"] == "gru" and r["config"]["task"] == result["config"]["task"]
                and r["config"]["hidden_size"] == result["config"]["hidden_size"]]
        source = same[0] if same else result
        return sum(layer["dense_macs_per_token"] for layer in source["test"]["layers"].values())

    head = ["task", "model", "readout", "test accuracy", "activity sparsity", "backward sparsity",
            "MACs per step (vs dense GRU)", "training sequences/s", "training time",
            "NeuroBench activation sparsity", "NeuroBench MACs per sequence (effective of dense)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row(r, dense_gru(r))) + " |" for r in results]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories of egru train classify")
    args = parser.parse_args(argv)
    print(table([load(r) for r in args.runs]))


if __name__ == "__main__":
    main()
