"""Keyword spotting with the embedded eGRU: the FSDD features, the paper's network through the
classification recipe, and ``egru export-c`` from a checkpoint to C that reproduces the Q15
engine. On generated tones (never skipped) and on the real FSDD where EGRU_DATA_DIR has it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from egru import cli
from egru.mcu import q15
from egru.recipes import classify

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def generated_tones(data_dir=None, download=False):
    """Spoken digits stand-in: 1-second 8 kHz tones, one frequency per class, of random length
    and amplitude, through the FSDD features; 3 classes, 24 training and 9 test clips."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 3
        clips = [rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * (300 + 700 * c) * np.arange(rng.integers(2000, 9000)) / 8000)
                 for c in labels]
        return torch.from_numpy(np.stack([classify.fsdd_features(c) for c in clips])), torch.from_numpy(labels)

    return classify.Sequences({"train": split(24), "test": split(9)}, num_classes=3)


@pytest.fixture(autouse=True)
def _generated_data(monkeypatch):
    monkeypatch.setitem(classify.TASKS, "fsdd", generated_tones)


PAPER_NET = ["--task", "fsdd", "--model", "embedded", "--layer-sizes", "6,5", "--head-size", "4",
             "--batch-size", "8", "--epochs", "2", "--no-progress"]


def test_features_pad_in_front_and_truncate():
    short = classify.fsdd_features(np.sin(np.arange(128 * 10) * 0.5))
    assert short.shape == (classify.FSDD_FRAMES, 64)
    assert not short[:-10].any() and short[-10:].any()  # the recording's end is the last step
    long = classify.fsdd_features(np.random.default_rng(0).normal(size=128 * 100))
    assert long.shape == (classify.FSDD_FRAMES, 64) and long.all()


def test_paper_network_trains_and_exports_to_c_that_matches(tmp_path, capsys):
    """Quantisation-aware training in the Q15 ranges, then ``egru export-c``: the C library
    compiles warning-free and its check program finds every value equal to the Q15 engine's,
    whose classes are those of the float model wherever its margin is clear."""
    run = tmp_path / "run"
    assert cli.main(["train", "classify", "--run-dir", str(run), *PAPER_NET, "--quantize", "paper",
                     "--q15-ranges"]) == 0
    assert "embedded: test accuracy" in capsys.readouterr().out
    model = classify.load_classifier(run / "best.pt")
    assert [layer.rnn.hidden_size for layer in model.layers] == [6, 5]
    assert isinstance(model.readout[1], classify.ClippedReLU)

    out = tmp_path / "c"
    assert cli.main(["export-c", str(run / "best.pt"), "--out", str(out), "--name", "kws", "--vectors", "5"]) == 0
    assert "bytes of weights and biases" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"kws.h", "kws.c", "kws_vectors.h", "kws_check.c"}
    assert "float" not in (out / "kws.c").read_text() and "double" not in (out / "kws.c").read_text()

    x, y = generated_tones().splits["test"]
    engine = classify.to_q15(model)
    with torch.no_grad():
        logits = model(x.transpose(0, 1))[0].numpy()
    q_classes = engine.classify(q15.to_q15(x.numpy().transpose(1, 0, 2)))
    top = np.sort(logits, axis=1)
    clear = top[:, -1] - top[:, -2] > 0.05
    assert np.array_equal(q_classes[clear], logits[clear].argmax(1))
    if CC is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH")
    binary = tmp_path / "check"
    subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-o", str(binary),
                    str(out / "kws.c"), str(out / "kws_check.c")], check=True, capture_output=True, text=True)
    report = subprocess.run([str(binary)], capture_output=True, text=True)
    assert report.returncode == 0 and "mismatches: 0 of 56 values" in report.stdout  # 7 × (5 + 3)
    classes = [int(line.split()[-1]) for line in report.stdout.splitlines() if line.startswith("sequence")]
    assert classes[:5] == engine.classify(q15.to_q15(x[:5].numpy().transpose(1, 0, 2))).tolist()


def test_event_based_egru_trains_and_exports_to_c_that_matches(tmp_path, capsys):
    """The EGRU keyword model (``--model egru``, two layers, the readout on the output trace):
    ``egru export-c`` writes the event-driven library, whose check program finds every value
    equal to the fixed-point engine's, also when compiled to compute densely; the engine's
    classes are the float model's wherever its margin is clear, and a head is refused."""
    run = tmp_path / "egru"
    assert cli.main(["train", "classify", "--run-dir", str(run), "--task", "fsdd", "--model", "egru",
                     "--layer-sizes", "6,6", "--batch-size", "8", "--epochs", "2", "--no-progress",
                     "--neurobench", "0"]) == 0
    capsys.readouterr()
    out = tmp_path / "c"
    assert cli.main(["export-c", str(run / "best.pt"), "--out", str(out), "--name", "ev", "--vectors", "5"]) == 0
    assert "recurrent layers [6, 6]" in capsys.readouterr().out
    assert "float" not in (out / "ev.c").read_text() and "double" not in (out / "ev.c").read_text()

    model = classify.load_classifier(run / "best.pt")
    (x_train, _), (x, _) = generated_tones().splits.values()
    engine = classify.to_q15(model, classify.input_exponent(x_train))
    assert engine.input_exponent == 3 and engine.trace is not None  # the tones' features reach 4.7
    with torch.no_grad():
        logits = model(x.transpose(0, 1))[0].numpy()
    q_classes = engine.classify(classify.fixed_point_inputs(engine, x).transpose(1, 0, 2))
    top = np.sort(logits, axis=1)
    clear = top[:, -1] - top[:, -2] > 0.05
    assert clear.sum() >= 3 and np.array_equal(q_classes[clear], logits[clear].argmax(1))
    if CC is not None:
        for dense in ([], ["-DEGRU_DENSE"]):
            binary = tmp_path / "check"
            subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", *dense, "-o",
                            str(binary), str(out / "ev.c"), str(out / "ev_check.c")], check=True)
            report = subprocess.run([str(binary)], capture_output=True, text=True)
            assert report.returncode == 0 and "mismatches: 0 of" in report.stdout, report.stdout
            classes = [int(line.split()[-1]) for line in report.stdout.splitlines() if line.startswith("sequence")]
            assert classes[:5] == q_classes[:5].tolist()

    head = tmp_path / "head"
    assert cli.main(["train", "classify", "--run-dir", str(head), "--task", "fsdd", "--model", "egru",
                     "--hidden-size", "6", "--head-size", "4", "--max-steps", "1", "--no-progress",
                     "--neurobench", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["export-c", str(head / "best.pt"), "--out", str(tmp_path / "no")]) == 2
    assert "single Linear layer" in capsys.readouterr().err


def test_export_refuses_float_only_models_and_options_are_checked(tmp_path, capsys):
    run = tmp_path / "gru"
    assert cli.main(["train", "classify", "--run-dir", str(run), *PAPER_NET, "--model", "gru",
                     "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["export-c", str(run / "best.pt"), "--out", str(tmp_path / "c")]) == 2
    assert "float-only" in capsys.readouterr().err
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "no"), "--model", "gru",
                     "--quantize", "paper"]) == 2
    assert "options of the embedded model" in capsys.readouterr().err
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "no"), "--layer-sizes", "30,x"]) == 2
    assert "layer_sizes must be comma-separated positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("model, key, name", [
    ("egru", "layers.0.weight_hh_l0", "weight_hh_l0 of module 0"),
    ("embedded", "layers.1.rnn.cells.0.weight_z", "cells.0.weight_z of module 1")])
def test_export_refuses_a_checkpoint_holding_nan(model, key, name, tmp_path, capsys):
    """A checkpoint (untrained, saved as training saves one) whose weight holds a NaN: ``egru
    export-c`` fails with one line naming the tensor and writes nothing."""
    cfg = classify.ClassifyConfig(task="fsdd", model=model, layer_sizes="6,6")
    state = classify.Classifier(cfg, 64, 3).state_dict()
    state[key][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save({"kind": classify.ClassifyTask.KIND, "config": dataclasses.asdict(cfg), "input_size": 64,
                "num_classes": 3, "model": state, "optimizer": {}, "position": {}, "rng": {}}, path)
    assert cli.main(["export-c", str(path), "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == f"egru export-c: error: {name} holds NaN\n"
    assert not (tmp_path / "c").exists()


def test_fsdd_task_on_the_real_recordings():
    root = os.environ.get("EGRU_DATA_DIR")
    if not root or not (Path(root) / "fsdd" / "SHA256SUMS").is_file():
        pytest.skip("EGRU_DATA_DIR is not set to a directory holding fsdd/")
    sequences = classify.load_fsdd_task(root)
    (x, y), (x_test, y_test) = sequences.splits["train"], sequences.splits["test"]
    assert x.shape == (2700, 64, 64) and x_test.shape == (300, 64, 64)
    assert sorted(torch.bincount(y_test).tolist()) == [30] * 10
    assert sorted(torch.bincount(y).tolist()) == [270] * 10
    assert float((x > 1).float().mean()) < 1e-3  # the gain keeps nearly every value in Q15's range


def test_q15_ranges_make_the_float_model_compute_what_the_engine_does_on_loud_inputs():
    """Inputs far outside [−1, 1): with q15_ranges the float model clips them as the engine
    saturates them, and their logits agree; without it they do not."""
    torch.manual_seed(0)
    x = torch.rand(20, 16, 7) * 6 - 3
    errors = {}
    for clip in (False, True):
        cfg = classify.ClassifyConfig(model="embedded", layer_sizes="8,6", head_size=5, quantize="paper",
                                      q15_ranges=clip)
        torch.manual_seed(1)
        model = classify.Classifier(cfg, 7, 4).double()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3)
            logits = model(x.double())[0].numpy()
        engine = classify.to_q15(model)
        errors[clip] = np.abs(q15.from_q15(engine.logits(q15.to_q15(x.numpy()))) - logits).max()
    assert errors[True] < 0.05 < errors[False], errors


def test_quantisation_starts_where_the_schedule_says(tmp_path):
    """--quantize-start 0.5: float for the first half of the steps, 3-bit weights after."""
    seen = []
    from egru.recipes import cores

    schedule = cores.EmbeddedCore.schedule

    def spy(self, progress):
        schedule(self, progress)
        seen.append((round(progress, 2), self.rnn.cells[0].quantize))

    cores.EmbeddedCore.schedule = spy
    try:
        assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "run"), *PAPER_NET, "--quantize",
                         "authors", "--quantize-start", "0.5", "--layer-sizes", "4"]) == 0
    finally:
        cores.EmbeddedCore.schedule = schedule
    before, after = [q for p, q in seen if p < 0.5], [q for p, q in seen if p >= 0.5]
    assert before and after and set(before) == {None} and set(after) == {"authors"}
    assert classify.load_classifier(tmp_path / "run" / "best.pt").layers[0].rnn.cells[0].quantize == "authors"
    with pytest.raises(ValueError, match="quantize_start needs a quantize rule"):
        classify.ClassifyConfig(model="embedded", quantize_start=0.5)
