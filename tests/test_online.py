"""Online learning through the harness on tiny generated data (the delay task, and a fake MNIST
written as real IDX files): both learnings end to end, exact resume inside a sequence, and one
RTRL step equal to one BPTT step when the optimizer steps once per sequence. Plus the MNIST
loader on the real files, when there."""

import gzip
import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch

from egru import cli, data
from egru.recipes import harness, online

from conftest import data_dir

TINY = dict(task="delay", hidden_size=6, classes=3, delay=3, batch_size=4, eval_batch_size=8, train_size=8,
            test_size=8, epochs=2, log_every=1)  # T = 5 steps, 2 batches per epoch


def run(run_dir, resume=False, data_dir=None, **changes):
    cfg = online.OnlineConfig(**{**TINY, **changes})
    return online.train_and_evaluate(cfg, run_dir, data_dir=data_dir, resume=resume, progress=False,
                                     tensorboard=False, plots=False)


def records(run_dir, split=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if split is None or r["split"] == split]


def without_timings(run_dir):
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records(run_dir)]


def checkpoint(run_dir, name="last.pt"):
    return torch.load(run_dir / name, weights_only=False)


# --- MNIST ------------------------------------------------------------------------------------

def write_idx(path, array: np.ndarray) -> bytes:
    """``array`` (uint8) as a gzipped IDX file; returns the uncompressed bytes."""
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw))
    return raw


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """12 training and 6 test images in tmp_path/data/mnist/, the loader expecting their checksums."""
    rng, folder = np.random.default_rng(0), tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    splits, checksums = {}, {}
    for split, n in (("train", 12), ("test", 6)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for part, array in (("images", images), ("labels", labels)):
            file = data.MNIST_FILES[split, part]
            checksums[file] = hashlib.sha256(write_idx(folder / file, array)).hexdigest()
        splits[split] = images, labels
    spec = data.DATASETS["mnist"]
    monkeypatch.setitem(data.DATASETS, "mnist", data.CorpusFiles(spec.folder, spec.files, checksums, spec.urls))
    return splits


def test_the_mnist_loader_reads_idx_files(fake_mnist, tmp_path, monkeypatch):
    for root in (tmp_path / "data", tmp_path / "data" / "mnist"):  # the data directory or its mnist/
        loaded = data.load_mnist(root)
        for split, (images, labels) in fake_mnist.items():
            x, y = loaded[split]
            assert x.dtype == torch.uint8 and y.dtype == torch.int64
            assert torch.equal(x, torch.from_numpy(images)) and torch.equal(y, torch.from_numpy(labels).long())
    monkeypatch.setenv("EGRU_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match=r"mnist not found: put train-images-idx3-ubyte.gz, .*"
                                             r"t10k-labels-idx1-ubyte.gz in .*empty or in its 'mnist/'"):
        (tmp_path / "empty").mkdir()
        data.load_mnist(tmp_path / "empty")
    path = tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-9])  # truncated
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz is not a readable gzip file"):
        data.load_mnist(tmp_path / "data")


def test_mnist_on_the_real_files():
    root = data_dir()
    if root is None or not (root / "mnist").is_dir():
        pytest.skip("EGRU_DATA_DIR is not set to a directory holding mnist/ (MNIST's four IDX files)")
    splits = data.load_mnist(root)
    for split, n, first in (("train", 60_000, 5), ("test", 10_000, 7)):
        images, labels = splits[split]
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8 and labels.shape == (n,)
        assert int(labels.min()) == 0 and int(labels.max()) == 9 and int(labels[0]) == first
        assert int(images.max()) == 255


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("learning", online.LEARNINGS)
@pytest.mark.parametrize("task", online.TASK_NAMES)
def test_training_runs_end_to_end(tmp_path, fake_mnist, task, learning):
    changes = {}
    if task == "rowmnist":
        changes = dict(task="rowmnist", train_size=8, test_size=6, update_every=10, data_dir=tmp_path / "data")
    result = run(tmp_path / "run", learning=learning, **changes)
    steps = 2 * 2 * (3 if task == "rowmnist" else 1)  # epochs × batches × harness steps per sequence
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(0 <= r["layers"]["layer0"]["activity"] <= 1 for r in train)
    assert all(("influence_macs_per_token" in r) == (learning == "rtrl") for r in train)
    test = result["test"]
    assert test["sequences"] == (6 if task == "rowmnist" else 8) and 0 <= test["accuracy"] <= 1
    assert ("influence_macs_per_token" in test) == (learning == "rtrl")
    if learning == "rtrl":
        assert test["influence_macs_per_token"] > 0
    for name in ("last.pt", "best.pt"):
        assert checkpoint(tmp_path / "run", name)["position"]["step"] == steps
    assert checkpoint(tmp_path / "run")["carried"] is None  # at a sequence boundary


@pytest.mark.parametrize("learning", online.LEARNINGS)
def test_a_run_resumed_inside_a_sequence_equals_an_uninterrupted_one(tmp_path, learning):
    """Sequences of 5 steps, 2 per harness step: step 4 ends in the middle of the second batch's
    sequences, whose state (RTRL: and influence) the checkpoint carries."""
    whole = run(tmp_path / "whole", learning=learning, update_every=2, max_steps=9)
    run(tmp_path / "parts", learning=learning, update_every=2, max_steps=4)
    assert checkpoint(tmp_path / "parts")["carried"] is not None
    parts = run(tmp_path / "parts", resume=True, learning=learning, update_every=2, max_steps=9)
    assert without_timings(tmp_path / "parts") == without_timings(tmp_path / "whole")
    assert parts["test"] == whole["test"]
    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "parts")
    assert a["position"] == b["position"]
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name


@pytest.fixture
def gradients(monkeypatch):
    """What every optimizer step of the harness found: the gradients (parameter name → tensor or
    None) and the model's state before it."""
    steps, make = [], harness.make_optimizer

    def making(model, cfg):
        optimizer = make(model, cfg)
        optimizer.register_step_pre_hook(lambda *_: steps.append(
            ({name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()},
             {name: t.clone() for name, t in model.state_dict().items()})))
        return optimizer

    monkeypatch.setattr(harness, "make_optimizer", making)
    return steps


@pytest.mark.parametrize("pruning", [False, True])
def test_one_rtrl_step_is_one_bptt_step_when_updating_once_per_sequence(tmp_path, gradients, pruning):
    """update_every = T: the same gradients and parameters to 1e-10 in float64, for every
    parameter of the cell (the thresholds too) and of the readout. With pruning, the second
    step's sequences run on the weights pruned after the first."""
    same = dict(dtype="float64", max_steps=1, threshold_lr=0.01, weight_decay=0.1,
                pseudo_derivative_support=0.5)
    if pruning:
        same.update(max_steps=2, prune_to=0.5, prune_end=0.5, prune_every=1)
    for learning in online.LEARNINGS:
        run(tmp_path / learning, learning=learning, **same)
    steps = same["max_steps"]
    rtrl, bptt = gradients[:steps], gradients[steps:]
    assert len(bptt) == steps
    names = {"cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh", "cell.threshold",
             "readout.weight", "readout.bias"}
    if pruning:
        names = {name + "_orig" if name.startswith("cell.weight") else name for name in names}
    for (rtrl_grads, _), (bptt_grads, _) in zip(rtrl, bptt):
        assert set(rtrl_grads) == set(bptt_grads) == names
        for name, grad in bptt_grads.items():
            assert grad.dtype == torch.float64 and grad.abs().max() > 0, name
            torch.testing.assert_close(rtrl_grads[name], grad, rtol=0, atol=1e-10, msg=name)
    after = {learning: checkpoint(tmp_path / learning)["model"] for learning in online.LEARNINGS}
    if pruning:
        assert float(after["rtrl"]["cell.weight_hh_mask"].mean()) < 1
        pruned = bptt[1][1]["cell.weight_hh_mask"] == 0  # by the first step
        assert pruned.any() and (bptt[1][0]["cell.weight_hh_orig"][pruned] == 0).all()
    for name, value in after["bptt"].items():
        torch.testing.assert_close(after["rtrl"][name], value, rtol=0, atol=1e-10, msg=name)
        if name in names:
            assert not torch.equal(value, bptt[0][1][name]), name  # the steps changed it


def test_rtrl_steps_without_a_loss_change_nothing(tmp_path, gradients):
    """The only loss is at the last step: RTRL over a sequence in harness steps of 2 time steps
    ends where one harness step of the whole sequence does; truncated BPTT does not."""
    same = dict(dtype="float64", constant_fraction=1.0)  # the same learning rate at every step
    for name, learning, k, steps in (("k5", "rtrl", 5, 1), ("k2", "rtrl", 2, 3), ("bptt", "bptt", 2, 3)):
        run(tmp_path / name, learning=learning, update_every=k, max_steps=steps, **same)
    assert [set(g.values()) for g, _ in gradients[1:3]] == [{None}] * 2  # RTRL's first two steps
    models = {name: checkpoint(tmp_path / name)["model"] for name in ("k5", "k2", "bptt")}
    for name, value in models["k5"].items():
        torch.testing.assert_close(models["k2"][name], value, rtol=0, atol=1e-12, msg=name)
    assert not torch.equal(models["bptt"]["cell.weight_hh"], models["k5"]["cell.weight_hh"])



def test_rtrl_steps_run_in_the_measured_thread_mode_with_the_same_numbers(tmp_path, monkeypatch):
    """RTRL's steps run on all of torch's threads or on one, whichever is measured to be faster
    (threads that another process deschedules stall the influence update's small operations),
    the process's count given back after each harness step: the training is the same as on
    all threads throughout."""
    import contextlib

    from egru import rtrl

    seen, step = [], rtrl.RTRL.step

    def counting(self, x):
        seen.append(torch.get_num_threads())
        return step(self, x)

    class AllThreads:
        def step(self, key, units):
            return contextlib.nullcontext()

    monkeypatch.setattr(rtrl.RTRL, "step", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(tmp_path / "measured", learning="rtrl")
        assert torch.get_num_threads() == 2
        # 4 harness steps of T = 5 steps: a warm-up and a timed harness step of each mode
        assert seen == [2] * 10 + [1] * 10
        monkeypatch.setattr(online, "MeasuredTorchThreads", AllThreads)
        run(tmp_path / "all", learning="rtrl")
    finally:
        torch.set_num_threads(before)
    assert seen[20:] == [2] * 20
    assert without_timings(tmp_path / "measured") == without_timings(tmp_path / "all")
    a, b = checkpoint(tmp_path / "measured")["model"], checkpoint(tmp_path / "all")["model"]
    for name, value in a.items():
        assert torch.equal(b[name], value), name


def test_options_are_checked():
    for changes, message in [
        (dict(learning="rtrl", zoneout=0.1), "zoneout must be 0 with learning rtrl"),
        (dict(learning="rtrl", dropconnect=0.1), "dropconnect must be 0 with learning rtrl"),
        (dict(update_every=6), "update_every must be None or an integer from 1 to the sequence length, 5"),
        (dict(learning="rtrl", prune_to=0.5, update_every=2), "prune_to must be 0 with learning rtrl"),
        (dict(model="gru"), "model must be 'egru'"),
        (dict(learning="sgd"), "learning must be one of"),
        (dict(task="copy"), "unknown task 'copy'"),
    ]:
        with pytest.raises(ValueError, match=message):
            online.OnlineConfig(**{**TINY, **changes})
    online.OnlineConfig(**TINY, learning="bptt", zoneout=0.1, prune_to=0.5, update_every=2)  # BPTT can


def test_train_online_command(tmp_path, fake_mnist, capfd, monkeypatch):
    monkeypatch.setenv("EGRU_CACHE_DIR", str(tmp_path / "cache"))  # no MNIST there
    run_dir, mnist = tmp_path / "run", str(tmp_path / "data")
    argv = ["train", "online", "--task", "rowmnist", "--data-dir", mnist, "--run-dir", str(run_dir),
            "--hidden-size", "5", "--batch-size", "4", "--train-size", "8", "--test-size", "6",
            "--max-steps", "2", "--no-progress"]
    assert cli.main(argv) == 0
    out = capfd.readouterr().out
    assert "egru (rtrl): test accuracy" in out and "RTRL influence update:" in out
    result = json.loads((run_dir / "results.json").read_text())
    assert result["config"]["task"] == "rowmnist" and result["test"]["sequences"] == 6
    if importlib.util.find_spec("matplotlib"):
        assert (run_dir / "loss.png").exists() and (run_dir / "raster.png").exists()
    assert cli.main(["train", "online", "--task", "rowmnist", "--data-dir", str(tmp_path), "--run-dir",
                     str(tmp_path / "no"), "--no-progress"]) == 2
    assert "mnist not found: put train-images-idx3-ubyte.gz" in capfd.readouterr().err
    assert cli.main(["train", "online", "--run-dir", str(tmp_path / "no"), "--zoneout", "0.1"]) == 2
    assert "zoneout must be 0 with learning rtrl" in capfd.readouterr().err
    assert not (tmp_path / "no").exists()
