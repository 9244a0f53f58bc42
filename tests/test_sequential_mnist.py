"""Sequential and permuted sequential MNIST as tasks of the classification recipe: the fixed
bit-reversal pixel order, the loaders on tiny generated images (never skipped) and on the real
IDX files where EGRU_DATA_DIR has them, the presets, two steps and an exact resume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from egru import cli, data
from egru.recipes import classify


def test_bit_reversal_is_a_fixed_permutation():
    assert classify.bit_reversal_permutation(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
    order = classify.bit_reversal_permutation(784)
    assert sorted(order.tolist()) == list(range(784))
    # 10-bit reversals of 0, 1, 2, …: 0, 512, 256, 768, 128, 640, 384, (896 left out), 64
    assert order[:8].tolist() == [0, 512, 256, 768, 128, 640, 384, 64]


def tiny_mnist(data_dir=None, download_missing=False):
    generator = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 256, (n, 28, 28), generator=generator, dtype=torch.uint8),  # noqa: E731
                       torch.arange(n) % 10)
    return {"train": split(20), "test": split(10)}


@pytest.fixture
def generated_mnist(monkeypatch):
    monkeypatch.setattr(data, "load_mnist", tiny_mnist)


def test_pixels_in_row_major_and_in_bit_reversed_order(generated_mnist):
    plain, permuted = classify.TASKS["smnist"](), classify.TASKS["psmnist"]()
    x, y = plain.splits["train"]
    images = tiny_mnist()["train"][0]
    assert x.shape == (20, 784, 1) and x.dtype == torch.float32
    torch.testing.assert_close(x[3, 28 * 5 + 7, 0], images[3, 5, 7].float() / 255)
    order = classify.bit_reversal_permutation(784)
    torch.testing.assert_close(permuted.splits["train"][0], x[:, torch.from_numpy(order)])
    assert permuted.meta["pixel_order"] == order.tolist() and plain.meta["pixel_order"] == list(range(784))


def test_two_steps_then_resume_equals_four_steps(generated_mnist, tmp_path):
    common = ["--task", "psmnist", "--hidden-size", "8", "--batch-size", "4", "--epochs", "1", "--no-progress"]
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "a"), *common, "--max-steps", "2"]) == 0
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "a"), *common, "--max-steps", "4",
                     "--resume"]) == 0
    assert cli.main(["train", "classify", "--run-dir", str(tmp_path / "b"), *common, "--max-steps", "4"]) == 0
    a, b = (torch.load(tmp_path / run / "last.pt", weights_only=False) for run in ("a", "b"))
    assert a["position"] == b["position"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["pixel_order"] == classify.bit_reversal_permutation(784).tolist()


def test_presets_and_options_on_top(generated_mnist, tmp_path):
    paper = classify.preset("paper-smnist")
    assert (paper.hidden_size, paper.batch_size, paper.lr, paper.clip) == (590, 500, 1e-3, 0.25)
    assert paper.pseudo_derivative_support == 1.0  # the paper's triangle for sequential MNIST
    assert classify.preset("paper-psmnist").task == "psmnist"
    cpu = classify.preset("cpu-smnist")
    assert (cpu.task, cpu.hidden_size, cpu.readout, classify.preset("cpu-psmnist").task) == ("smnist", 128, "mean", "psmnist")
    dvs = classify.preset("paper-dvs")
    assert (dvs.task, dvs.hidden_size, dvs.readout, dvs.pseudo_derivative_support) == ("dvs-gesture", 795, "mean", 1.7)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        classify.preset("nope")
    run = tmp_path / "run"
    assert cli.main(["train", "classify", "--preset", "paper-smnist", "--run-dir", str(run), "--hidden-size", "6",
                     "--batch-size", "5", "--max-steps", "1", "--no-progress"]) == 0
    import json
    config = json.loads((run / "results.json").read_text())["config"]
    assert (config["hidden_size"], config["batch_size"], config["clip"], config["task"]) == (6, 5, 0.25, "smnist")


def test_sequential_mnist_on_the_real_files():
    root = os.environ.get("EGRU_DATA_DIR")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("EGRU_DATA_DIR is not set to a directory holding mnist/ (MNIST's four IDX files)")
    sequences = classify.TASKS["psmnist"](data_dir=root)
    x, y = sequences.splits["train"]
    assert x.shape == (60000, 784, 1) and sequences.splits["test"][0].shape == (10000, 784, 1)
    assert 0 <= float(x.min()) and float(x.max()) == 1.0
    images = data.load_mnist(root)["train"][0]
    order = np.array(sequences.meta["pixel_order"])
    assert torch.equal(x[0, :, 0], images[0].reshape(-1)[torch.from_numpy(order)].float() / 255)
