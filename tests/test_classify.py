"""Sequence classification through the harness, on tiny generated data (never skipped): exact
resume, Ctrl-C, a validation split choosing best.pt, the command and the demo."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egru import cli
from egru.recipes import classify

from test_harness import CLASSIFY, classify_run, generated_sequences, records


@pytest.fixture(autouse=True)
def _generated_data(monkeypatch):
    monkeypatch.setitem(classify.TASKS, "mnist1d", generated_sequences)


def without_timings(run_dir):
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records(run_dir)]


def same_models(a, b):
    for name in ("last.pt", "best.pt"):
        x, y = (torch.load(d / name, weights_only=False) for d in (a, b))
        assert x["position"] == y["position"], name
        for key, value in x["model"].items():
            assert torch.equal(y["model"][key], value), (name, key)


def test_more_steps_after_a_finished_run_equal_one_longer_run(tmp_path):
    """7 steps cross an epoch (5 steps of 8 of the 40 sequences): the resumed run must find the
    second epoch's order as the uninterrupted one drew it."""
    whole = classify_run(tmp_path / "whole", max_steps=7, dropconnect=0.2)
    classify_run(tmp_path / "parts", max_steps=3, dropconnect=0.2)
    cfg = classify.ClassifyConfig(**CLASSIFY, max_steps=7, dropconnect=0.2)
    parts = classify.train_and_evaluate(cfg, tmp_path / "parts", resume=True, progress=False)
    assert without_timings(tmp_path / "parts") == without_timings(tmp_path / "whole")
    assert parts["test"] == whole["test"]
    same_models(tmp_path / "whole", tmp_path / "parts")


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    classify_run(tmp_path / "whole", max_steps=7, dropconnect=0.2)
    forward, calls = classify.Classifier.forward, []

    def interrupted(self, x, record=False):
        calls.append(self.training)
        if calls.count(True) == 6:  # during step 6, which completes: last.pt holds step 6
            os.kill(os.getpid(), signal.SIGINT)
        return forward(self, x, record)

    with monkeypatch.context() as patch:
        patch.setattr(classify.Classifier, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            classify_run(tmp_path / "parts", max_steps=7, dropconnect=0.2)
    assert torch.load(tmp_path / "parts" / "last.pt", weights_only=False)["position"]["step"] == 6
    cfg = classify.ClassifyConfig(**CLASSIFY, max_steps=7, dropconnect=0.2)
    classify.train_and_evaluate(cfg, tmp_path / "parts", resume=True, progress=False)
    assert without_timings(tmp_path / "parts") == without_timings(tmp_path / "whole")
    same_models(tmp_path / "whole", tmp_path / "parts")


def test_a_validation_split_chooses_best_pt(tmp_path):
    result = classify_run(tmp_path, sequences=generated_sequences(valid=True), epochs=3)
    valid = records(tmp_path, "valid")
    assert [r["step"] for r in valid] == [5, 10, 15]  # after each epoch
    best = min(valid, key=lambda r: (1 - r["accuracy"], r["step"]))
    ckpt = torch.load(tmp_path / "best.pt", weights_only=False)
    assert ckpt["position"]["best"] == pytest.approx(1 - best["accuracy"])
    assert result["valid"]["accuracy"] == best["accuracy"]


def test_held_out_training_sequences_validate_and_draw_the_accuracy_curve(tmp_path):
    result = classify_run(tmp_path, epochs=2, valid_size=8, neurobench=0)
    valid = records(tmp_path, "valid")
    assert [(r["step"], r["sequences"]) for r in valid] == [(4, 8), (8, 8)]  # 32 sequences left: 4 steps
    train = records(tmp_path, "train")
    assert all(0 <= r["accuracy"] <= 1 for r in train) and len({r["accuracy"] for r in train}) > 1
    assert result["valid"]["sequences"] == 8 and result["test"]["sequences"] == 16
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "loss.png").exists()
    with pytest.raises(ValueError, match="valid_size 40 leaves none of mnist1d's 40"):
        classify_run(tmp_path / "none", valid_size=40)


def test_train_classify_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "classify", "--run-dir", str(run), "--max-steps", "2", "--hidden-size", "6",
                     "--model", "lstm", "--no-progress"]) == 0
    assert "lstm: test accuracy" in capsys.readouterr().out
    result = json.loads((run / "results.json").read_text())
    assert result["config"]["model"] == "lstm" and result["config"]["max_steps"] == 2
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "no"), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "no"), "--train-size", "41"]) == 2
    assert "train_size 41 is larger than mnist1d's 40 train sequences" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_demo_trains_both_models_through_the_harness(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--epochs", "1", "--hidden-size", "8", "--no-progress", "--run-dir",
                     str(tmp_path / "runs"), "--json", str(out)]) == 0
    assert "MACs relative to GRU" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["egru"]) == set(results["gru"])
    assert results["gru"]["activity_sparsity"] == 0
    dense = 3 * 8 * (3 + 8)  # 3H(I + H)
    assert results["gru"]["effective_macs_per_step"] == results["egru"]["dense_macs_per_step"] == dense
    for model in ("egru", "gru"):
        steps = [r["step"] for r in records(tmp_path / "runs" / model, "train")]
        assert steps == [1]  # 40 sequences, one batch of 64
        assert (tmp_path / "runs" / model / "best.pt").exists()


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP on two CPU processes, each with half of every batch, equals one process."""
    worker = str(Path(__file__).with_name("classify_worker.py"))
    overrides = json.dumps(dict(model="egru", max_steps=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent),
           "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, worker, str(tmp_path / "one"), overrides], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={port}", worker, str(tmp_path / "two"), overrides],
                   check=True, env=env)

    def losses(run):
        lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in lines if r["split"] == "train"]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-5)
    m1 = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    m2 = torch.load(tmp_path / "two" / "last.pt", weights_only=False)["model"]
    for name, value in m1.items():
        torch.testing.assert_close(m2[name], value, rtol=1e-4, atol=1e-6)
