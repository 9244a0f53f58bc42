"""Language-model recipe: learning, exact resume, DDP equivalence, evaluation, clear errors."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from egru import cli, data
from egru.recipes import harness, lm, plots

from conftest import data_dir
from lm_worker import REAL_LOAD_CORPUS, small_corpus, tiny_config

pytestmark = pytest.mark.skipif(data_dir() is None, reason="EGRU_DATA_DIR is not set to the shared data")


@pytest.fixture(autouse=True)
def _small_corpus(monkeypatch):
    monkeypatch.setattr(data, "load_corpus", small_corpus)


def train_losses(run_dir):
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


@pytest.mark.parametrize("model", ["egru", "gru", "lstm"])
def test_a_few_steps_lower_the_loss(tmp_path, model):
    cfg = tiny_config(model=model, max_steps=40, dropout_embedding=0.0, dropout_between=0.0,
                      dropout_output=0.0, dropconnect=0.0, dropout_words=0.0)
    result = lm.train_and_evaluate(cfg, tmp_path, progress=False)
    losses = [loss for _, loss in train_losses(tmp_path)]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert result["valid"]["perplexity"] < len(small_corpus().vocab) / 4
    assert any((tmp_path / "tensorboard").iterdir()) and (tmp_path / "perplexity.png").exists()
    if model == "egru":
        assert (tmp_path / "raster.png").exists() and (tmp_path / "activity.png").exists()


RESUMABLE = dict(max_steps=8, eval_every=3, zoneout=0.1)  # dropouts on: the RNG state matters
EVAL_BATCHES = 17  # batches of an evaluation of the small valid or test split: (800 // 4 - 1) / 12


def run_records(run_dir):
    """Every record of metrics.jsonl but the timings."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("tokens_per_second", None)
    return records


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(plots, "plot_run", lambda *args: None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "load_corpus", small_corpus)
        patch.setattr(plots, "plot_run", lambda *args: None)
        result = lm.train_and_evaluate(tiny_config(**RESUMABLE), run_dir, progress=False)
    return run_dir, result


# Where Ctrl-C lands: each function patches ``tick`` into the training run at one point.

def _before_forward(patch, tick):
    _on_forward(patch, tick, training=True)


def _during_evaluation(patch, tick):
    _on_forward(patch, tick, training=False)


def _on_forward(patch, tick, training):
    forward = lm.LanguageModel.forward

    def patched(self, *args, **kwargs):
        if self.training == training:
            tick()
        return forward(self, *args, **kwargs)

    patch.setattr(lm.LanguageModel, "forward", patched)


def _inside_forward(patch, tick):  # once a dropout mask has been drawn
    dropout = lm.locked_dropout

    def patched(x, p, training):
        out = dropout(x, p, training)
        if training:
            tick()
        return out

    patch.setattr(lm, "locked_dropout", patched)


def _inside_backward(patch, tick):  # after the decoder's gradient, before the recurrent layers'
    cross_entropy = torch.nn.functional.cross_entropy

    def patched(logits, *args, **kwargs):
        if logits.requires_grad:
            logits.register_hook(lambda grad: tick())
        return cross_entropy(logits, *args, **kwargs)

    patch.setattr(torch.nn.functional, "cross_entropy", patched)


def _after_backward(patch, tick):
    clip = torch.nn.utils.clip_grad_norm_

    def patched(*args, **kwargs):
        tick()
        return clip(*args, **kwargs)

    patch.setattr(torch.nn.utils, "clip_grad_norm_", patched)


def _inside_optimizer_step(patch, tick):  # parameters updated, thresholds not yet clamped
    make_optimizer = harness.make_optimizer

    def patched(model, cfg):
        optimizer = make_optimizer(model, cfg)
        optimizer.register_step_post_hook(lambda *args: tick())
        return optimizer

    patch.setattr(harness, "make_optimizer", patched)


def _writing_a_checkpoint(patch, tick):  # written to the temporary file, not yet renamed
    save = torch.save

    def patched(*args, **kwargs):
        save(*args, **kwargs)
        tick()

    patch.setattr(torch, "save", patched)


@pytest.mark.parametrize("point,call,ctrl_c,saved_step", [
    # point, the call of it that gets Ctrl-C, how many Ctrl-Cs, the step last.pt then holds
    (_before_forward, 5, 1, 5),
    (_inside_forward, 13, 1, 5),  # three dropouts per step: the first one of step 5
    # the validation after step 3 takes a backward of its own per layer (the gradient through
    # time it logs): the 7th cross-entropy with a gradient is step 5's
    (_inside_backward, 7, 1, 5),
    (_after_backward, 5, 1, 5),
    (_inside_optimizer_step, 5, 1, 5),
    (_during_evaluation, EVAL_BATCHES + 3, 1, 6),  # the validation after step 6: redone on resume
    (_during_evaluation, 4 * EVAL_BATCHES + 3, 1, 8),  # the best model's final test evaluation
    (_writing_a_checkpoint, 1, 1, 3),  # last.pt after step 3, before best.pt
    (_writing_a_checkpoint, 6, 1, 8),  # best.pt after step 8 (every validation improves)
    (_inside_backward, 7, 2, 3),  # a second Ctrl-C aborts at once: the checkpoint of step 3 stays
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_ctrl_c_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, no_plots,
                                                                  uninterrupted, point, call, ctrl_c,
                                                                  saved_step):
    whole, whole_result = uninterrupted
    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == call:
            for _ in range(ctrl_c):
                os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        point(patch, tick)
        with pytest.raises(KeyboardInterrupt):
            lm.train_and_evaluate(tiny_config(**RESUMABLE), tmp_path, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    step = torch.load(tmp_path / "last.pt", weights_only=False)["position"]["step"]
    result = lm.train_and_evaluate(tiny_config(**RESUMABLE), tmp_path, resume=True, progress=False)

    assert run_records(tmp_path) == run_records(whole)
    assert (result["valid"], result["test"]) == (whole_result["valid"], whole_result["test"])
    for name in ("last.pt", "best.pt"):
        expected = torch.load(whole / name, weights_only=False)
        got = torch.load(tmp_path / name, weights_only=False)
        assert got["position"] == expected["position"], name
        for key, value in expected["model"].items():
            assert torch.equal(got["model"][key], value), (name, key)
    assert step == saved_step  # Ctrl-C landed where this case meant it to


def test_evaluating_the_checkpoint_reproduces_the_logged_validation_perplexity(tmp_path, capsys):
    lm.train_and_evaluate(tiny_config(max_steps=6, eval_every=3), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best = min(r["perplexity"] for r in records if r["split"] == "valid")
    assert cli.main(["eval", "lm", str(tmp_path / "best.pt"), "--split", "valid", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(best, rel=1e-9)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """DDP on two CPU processes, each with half the batch columns, equals one process."""
    worker = str(Path(__file__).with_name("lm_worker.py"))
    overrides = json.dumps(dict(max_steps=5, dropout_embedding=0.0, dropout_between=0.0, dropout_output=0.0,
                                dropconnect=0.0, dropout_words=0.0, eval_every=5))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent),
           "CUDA_VISIBLE_DEVICES": ""}  # CPU processes (gloo) on a machine with GPUs too
    subprocess.run([sys.executable, worker, str(tmp_path / "one"), overrides], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={_free_port()}", worker, str(tmp_path / "two"), overrides],
                   check=True, env=env)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two]
    for (_, a), (_, b) in zip(one, two):
        assert a == pytest.approx(b, rel=1e-5)
    m1 = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    m2 = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    for name, value in m1["model"].items():
        torch.testing.assert_close(m2["model"][name], value, rtol=1e-4, atol=1e-6)
    for a, b in zip(m1["carried_state"], m2["carried_state"]):  # gathered from both ranks
        torch.testing.assert_close(torch.stack(list(b)), torch.stack(list(a)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["train", "lm", "--dataset", "imdb"], "unknown dataset 'imdb'"),
    (["train", "lm", "--model", "transformer"], "unknown model 'transformer'"),
    (["train", "lm", "--preset", "huge"], "unknown preset 'huge'"),
])
def test_bad_training_arguments(tmp_path, capsys, argv, message):
    assert cli.main([*argv, "--run-dir", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_presets_give_each_model_its_own_settings_and_flags_win():
    parser = cli.build_parser()
    run = ["train", "lm", "--run-dir", "unused"]
    egru_cfg = cli.lm_config(parser.parse_args([*run, "--model", "egru"]))
    gru_cfg = cli.lm_config(parser.parse_args([*run, "--model", "gru"]))
    assert egru_cfg == lm.PRESETS["cpu-small-egru"]
    assert egru_cfg.dropconnect != gru_cfg.dropconnect
    assert gru_cfg == lm.PRESETS["cpu-small-gru"]
    assert (egru_cfg.model, gru_cfg.model) == ("egru", "gru")
    flagged = cli.lm_config(parser.parse_args([*run, "--model", "egru", "--dropconnect", "0.2"]))
    assert flagged.dropconnect == 0.2 and flagged.lr == egru_cfg.lr


def test_the_last_layer_can_get_its_own_threshold():
    parser = cli.build_parser()
    args = ["train", "lm", "--run-dir", "unused", "--model", "egru", "--num-layers", "3",
            "--threshold-mean", "0.6", "--last-threshold-mean", "0.1"]
    cfg = cli.lm_config(parser.parse_args(args))
    assert cfg.last_threshold_mean == 0.1
    torch.manual_seed(0)
    means = [layer.threshold_l0.mean().item() for layer in lm.LanguageModel(cfg, vocab_size=50).layers]
    assert means[0] == pytest.approx(0.6, abs=0.05) and means[1] == pytest.approx(0.6, abs=0.05)
    assert means[2] == pytest.approx(0.1, abs=0.05)
    # None: the last layer takes the others' threshold mean
    same = dataclasses.replace(cfg, last_threshold_mean=None)
    assert lm.LanguageModel(same, vocab_size=50).layers[2].threshold_l0.mean().item() > 0.5


def test_missing_data_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_corpus", REAL_LOAD_CORPUS)
    code = cli.main(["train", "lm", "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "none"),
                     "--no-progress"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_checkpoint_of_something_else_is_refused(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert cli.main(["eval", "lm", str(tmp_path / "other.pt"), "--no-progress"]) == 2
    assert "not an egru language-model checkpoint" in capsys.readouterr().err
    lm.train_and_evaluate(tiny_config(model="gru", max_steps=1), tmp_path / "gru", progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        lm.train_and_evaluate(tiny_config(model="egru", max_steps=2), tmp_path / "gru", resume=True,
                              progress=False)
    ckpt = torch.load(tmp_path / "gru" / "last.pt", weights_only=False)
    ckpt["config"]["model"] = "lstm"
    torch.save(ckpt, tmp_path / "mislabelled.pt")
    assert cli.main(["eval", "lm", str(tmp_path / "mislabelled.pt"), "--no-progress"]) == 2
    assert "does not fit a lstm language model" in capsys.readouterr().err
