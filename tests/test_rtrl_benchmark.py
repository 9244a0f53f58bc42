"""benchmarks/rtrl.py --quick: rows for sparse RTRL, dense RTRL and BPTT, fewer MACs for the
sparse learner at low activity, and memory that grows with T for BPTT only (behaviour, not
timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("rtrl")


def test_quick_run(bench, tmp_path, capsys):
    out = tmp_path / "rtrl.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] == 1 and data["args"]["dtype"] == "float32"
    configs = {}
    for row in data["rows"]:
        key = (row["B"], row["H"], row["input"], row["weight_sparsity"], row["target"])
        configs.setdefault(key, {})[row["method"]] = row
    assert {key[3] for key in configs} == {0.0, 0.8} and {key[4] for key in configs} == {0.1, 0.5}
    for key, by in configs.items():
        assert set(by) == {"rtrl-sparse", "rtrl-dense", "bptt"}, key
        sparse, dense = by["rtrl-sparse"], by["rtrl-dense"]
        assert 0 < sparse["g_fraction"] < 1 and sparse["activity"] <= sparse["g_fraction"] + 1e-9
        assert sparse["macs_per_step"] < dense["macs_per_step"], key
        if sparse["g_fraction"] <= 0.25:  # low activity: a small fraction of the dense MACs
            assert sparse["macs_per_step"] < dense["macs_per_step"] / 3, key
        if key[3] > 0:  # pruned weights have no column in the sparse learner
            assert sparse["columns"] < dense["columns"]
        else:
            assert sparse["columns"] == dense["columns"]
        assert all(r["step_s"] > 0 for r in by.values())
    memory = {(r["method"], r["T"]): r for r in data["memory"]}
    steps = sorted({T for _, T in memory})
    assert len(steps) >= 2 and {m for m, _ in memory} == {"rtrl-sparse", "rtrl-dense", "bptt"}
    short, long = steps[0], steps[-1]
    for method in ("rtrl-sparse", "rtrl-dense"):  # fixed memory, however long the sequence
        assert memory[method, short]["held_bytes"] == memory[method, long]["held_bytes"]
        assert memory[method, long]["peak_bytes"] < 1.5 * memory[method, short]["peak_bytes"]
        assert memory[method, long]["held_bytes"] >= memory[method, long]["influence_bytes"] > 0
    growth = long / short  # BPTT's graph holds every step
    assert memory["bptt", long]["held_bytes"] > 0.8 * growth * memory["bptt", short]["held_bytes"]
    assert memory["bptt", long]["peak_bytes"] > 0.5 * growth * memory["bptt", short]["peak_bytes"]

    capsys.readouterr()
    bench.main(["--markdown", str(out)])
    tables = capsys.readouterr().out
    assert "dense/sparse MACs" in tables and "BPTT peak MiB" in tables
    assert len([line for line in tables.splitlines() if line.startswith("| 1 | 16 |")]) == len(configs) + 2
