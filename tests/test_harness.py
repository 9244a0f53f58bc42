"""The training harness through every recipe, on tiny generated data (never skipped): two steps
of each, what a run writes (metrics, checkpoints, TensorBoard, plots), the progress bar, where
activity is recorded, the presets and the command's help."""

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import signal
import tomllib
from pathlib import Path

import pytest
import torch

from egru import cli, data
from egru.recipes import classify, harness, lm

ROOT = Path(__file__).resolve().parent.parent


def generated_corpus(name="ptb", data_dir=None, download=False):
    """A corpus shaped like ``name``: PTB-like 50 words, WikiText-2-like 80."""
    words = {"ptb": 50, "wikitext2": 80}[name]
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(words, (n,), generator=generator)  # noqa: E731
    return data.Corpus(name, [f"w{i}" for i in range(words)], ids(600), ids(120), ids(120))


def generated_sequences(data_dir=None, download=False, valid: bool = False):
    """40 training, 16 test (and 16 validation) sequences of 6 steps, 3 features, 4 classes."""
    generator = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randn(n, 6, 3, generator=generator), torch.randint(4, (n,), generator=generator))  # noqa: E731
    splits = {"train": split(40), "test": split(16)}
    if valid:
        splits["valid"] = split(16)
    return classify.Sequences(splits, num_classes=4)


@pytest.fixture(autouse=True)
def _generated_data(monkeypatch):
    monkeypatch.setattr(data, "load_corpus", generated_corpus)
    monkeypatch.setitem(classify.TASKS, "mnist1d", generated_sequences)


LM = dict(embedding_size=8, hidden_size=12, num_layers=2, batch_size=4, bptt=10, eval_batch_size=4,
          test_batch_size=4, epochs=1, log_every=1, threshold_mean=0.2)
CLASSIFY = dict(hidden_size=10, num_layers=2, batch_size=8, eval_batch_size=8, epochs=2, log_every=1)


def lm_run(run_dir, **changes):
    return lm.train_and_evaluate(lm.LMConfig(**{**LM, **changes}), run_dir, progress=False)


def classify_run(run_dir, sequences=None, **changes):
    cfg = classify.ClassifyConfig(**{**CLASSIFY, **changes})
    return classify.train_and_evaluate(cfg, run_dir, sequences=sequences, progress=False)


def records(run_dir, split=None):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if split is None or r["split"] == split]


@pytest.mark.parametrize("recipe,dataset,model", [
    ("lm", "ptb", "egru"), ("lm", "wikitext2", "gru"), ("lm", "ptb", "lstm"),
    ("classify", "mnist1d", "egru"), ("classify", "mnist1d", "gru"), ("classify", "mnist1d", "lstm"),
])
def test_every_recipe_runs_two_steps(tmp_path, recipe, dataset, model):
    if recipe == "lm":
        result = lm_run(tmp_path, dataset=dataset, model=model, max_steps=2)
    else:
        result = classify_run(tmp_path, model=model, max_steps=2)
    train = records(tmp_path, "train")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:  # every core reports its layers' activity and MACs
        assert sorted(r["layers"]) == ["layer0", "layer1"]
        for layer in r["layers"].values():
            assert 0 <= layer["activity"] <= 1
            assert 0 < layer["effective_macs_per_token"] <= layer["dense_macs_per_token"]
            if model != "egru":
                assert layer["activity"] == 1
                assert layer["effective_macs_per_token"] == layer["dense_macs_per_token"]
    assert ("valid" in result) == (recipe == "lm") and "test" in result
    assert [r["split"] for r in records(tmp_path) if r["split"].startswith("best_")] == \
        [f"best_{s}" for s in ("valid", "test") if s in result]
    for name in ("last.pt", "best.pt"):
        assert torch.load(tmp_path / name, weights_only=False)["position"]["step"] == 2
    if importlib.util.find_spec("matplotlib"):
        curve = "perplexity.png" if recipe == "lm" else "loss.png"
        assert (tmp_path / curve).exists()
        assert (tmp_path / "raster.png").exists() == (tmp_path / "activity.png").exists() == (model == "egru")


def test_dense_and_event_cores_report_macs_of_the_same_shapes(tmp_path):
    """A GRU's dense MACs per token are the EGRU's: 3H(I + H) per layer."""
    dense = {}
    for model in ("egru", "gru"):
        result = lm_run(tmp_path / model, model=model, max_steps=1)
        dense[model] = [layer["dense_macs_per_token"] for layer in result["test"]["layers"].values()]
    assert dense["egru"] == dense["gru"] == [3 * 12 * (8 + 12), 3 * 8 * (12 + 8)]


class FakeBar:
    def __init__(self, total, desc, enabled=True, initial=0):
        self.total, self.n = total, initial
        FakeBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        self.postfix = args[0] if args else kwargs

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    FakeBar.made = []
    monkeypatch.setattr(harness, "progress_bar", FakeBar)
    return FakeBar.made


def test_the_progress_bar_counts_the_steps_the_run_does(tmp_path, bars):
    lm_run(tmp_path / "capped", max_steps=3)
    assert (bars[0].total, bars[0].n) == (3, 3)
    lm_run(tmp_path / "whole", epochs=2)  # variable BPTT: the steps are known from the plan
    steps = records(tmp_path / "whole", "train")[-1]["step"]
    assert (bars[1].total, bars[1].n) == (steps, steps)
    assert "act" in bars[1].postfix and "perplexity" in bars[1].postfix
    lm_resume(tmp_path / "capped", max_steps=5)  # a resumed run starts where it was
    assert (bars[2].total, bars[2].n) == (5, 5)
    classify_run(tmp_path / "classify")  # 40 sequences, batches of 8, 2 epochs
    assert (bars[3].total, bars[3].n) == (10, 10)


def lm_resume(run_dir, **changes):
    return lm.train_and_evaluate(lm.LMConfig(**{**LM, **changes}), run_dir, progress=False, resume=True)


def test_activity_is_recorded_at_the_steps_it_is_logged_at(tmp_path, monkeypatch):
    recorded = []
    forward = lm.LanguageModel.forward

    def spy(self, tokens, state, record=False):
        if self.training:
            recorded.append(record)
        return forward(self, tokens, state, record)

    monkeypatch.setattr(lm.LanguageModel, "forward", spy)
    lm_run(tmp_path, log_every=2, max_steps=5)
    assert recorded == [True, True, False, True, False]
    assert [r["step"] for r in records(tmp_path, "train")] == [1, 2, 4]


def test_tensorboard_and_metrics_hold_per_layer_activity(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    lm_run(tmp_path, max_steps=2)
    for split in ("train", "valid", "best_test"):
        for r in records(tmp_path, split):
            assert set(r["layers"]) == {"layer0", "layer1"}
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for split in ("train", "valid"):
        for layer in ("layer0", "layer1"):
            for what in ("activity", "backward_activity", "effective_macs_per_token"):
                assert f"{split}/layers/{layer}/{what}" in tags
    assert [e.step for e in events.Scalars("train/layers/layer1/activity")] == [1, 2]
    assert {"train/loss", "train/perplexity", "valid/perplexity"} <= tags


# --- presets ----------------------------------------------------------------------------------

# The presets as resolved before they were flat (preset(name, model): a shared "cpu-small" with
# a per-model overlay; the paper presets for any model): the oracle of the flat ones.
OLD_CPU_SMALL = dict(threshold_mean=0.6, last_threshold_mean=0.15, dropout_embedding=0.15,
                     dropout_between=0.1, dropout_output=0.15, dropconnect=0.15)
OLD_PER_MODEL = {"egru": dict(lr=3e-3, dropout_embedding=0.05, dropout_words=0.0, dropout_between=0.0,
                              dropout_output=0.05, dropconnect=0.0),
                 "gru": dict(lr=3e-3), "lstm": {}}
OLD_DEFAULTS = dict(
    dataset="ptb", model="egru", embedding_size=200, hidden_size=400, num_layers=2, batch_size=32,
    eval_batch_size=10, test_batch_size=1, bptt=35, variable_bptt=True, lr=2e-3, threshold_lr=0.0,
    weight_decay=0.1, beta2=0.999, clip=0.25, epochs=10, max_steps=None, constant_fraction=0.7,
    dropout_embedding=0.3, dropout_words=0.1, dropout_between=0.2, dropout_output=0.3, dropconnect=0.3,
    zoneout=0.0, dampening_factor=0.7, pseudo_derivative_support=1.0, threshold_mean=0.1,
    last_threshold_mean=None, reset_state_per_chunk=False, eval_every=0, log_every=20, seed=0, backend="auto")
OLD_PAPER = dict(
    embedding_size=750, hidden_size=1350, num_layers=3, bptt=70, constant_fraction=0.7, dropout_words=0.1,
    dropout_between=0.25, dropout_output=0.5, dropconnect=0.7, clip=0.1, dampening_factor=3.6,
    pseudo_derivative_support=3.6, threshold_mean=0.01, threshold_lr=0.0)
OLD_PRESETS = {
    "paper-ptb": dict(OLD_PAPER, dataset="ptb", batch_size=64, lr=1.2e-3, weight_decay=0.10, epochs=1000,
                      dropout_embedding=0.6),
    "paper-wt2": dict(OLD_PAPER, dataset="wikitext2", batch_size=128, lr=1e-3, weight_decay=0.12, epochs=800,
                      dropout_embedding=0.7),
}


def old_preset(name, model):
    if name == "cpu-small":
        return {**OLD_DEFAULTS, **OLD_CPU_SMALL, "model": model, **OLD_PER_MODEL[model]}
    return {**OLD_DEFAULTS, **OLD_PRESETS[name], "model": model}


@pytest.mark.parametrize("name", ["cpu-small", "paper-ptb", "paper-wt2"])
@pytest.mark.parametrize("model", ["egru", "gru", "lstm"])
def test_flat_presets_equal_the_presets_resolved_before(name, model):
    cfg = dataclasses.asdict(lm.preset(name, model))
    assert cfg.pop("beta1") == 0.0  # a field since; the language model's AdamW always had beta1 0
    pruning = {key: cfg.pop(key) for key in list(cfg) if key.startswith("prune_")}  # fields since
    assert pruning["prune_to"] == 0.0  # no pruning
    embedded = (cfg.pop("quantize"), cfg.pop("quantize_start"), cfg.pop("q15_ranges"))  # fields since
    assert embedded == ("none", 0.0, False)
    assert (cfg.pop("init"), cfg.pop("threshold_parametrization")) == ("gru", "projected")  # fields since
    assert cfg == old_preset(name, model)
    if name == "cpu-small":  # a name lookup: the flat preset itself
        assert lm.preset(name, model) is lm.PRESETS[f"cpu-small-{model}"]


def test_every_preset_is_a_valid_and_distinct_configuration():
    configs = list(lm.PRESETS.values())
    assert len(set(configs)) == len(configs)
    assert lm.preset("cpu-small") is lm.PRESETS["cpu-small-egru"]
    assert lm.preset("paper-ptb") is lm.PRESETS["paper-ptb"]
    with pytest.raises(ValueError, match="unknown preset 'cpu-big'"):
        lm.preset("cpu-big")


# --- what people read -------------------------------------------------------------------------

def subparsers(parser):
    """(prog, parser) of every command under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from [(sub.prog, sub), *subparsers(sub)]


def test_every_option_of_every_command_says_what_it_means_and_its_default():
    commands = dict(subparsers(cli.build_parser()))
    assert set(commands) >= {"egru demo", "egru train lm", "egru train classify", "egru eval lm"}
    for prog, parser in commands.items():
        for action in parser._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue  # the commands' own help is checked as they are
            assert action.help, (prog, action.dest)
            flag = isinstance(action, argparse._StoreTrueAction)  # off unless given
            if action.option_strings and not (action.required or flag):
                assert "default" in action.help or "cpu-small-egru:" in action.help, (prog, action.dest)
    lm_help = commands["egru train lm"].format_help()
    for shown in ("--dataset {ptb,wikitext2}", "--model {egru,gru,lstm,embedded}", "--preset {", "cpu-small-gru",
                  "(cpu-small-egru: 0.003)", "(cpu-small-egru: no limit)"):
        assert shown in lm_help
    classify_help = commands["egru train classify"].format_help()
    assert "--task {mnist1d,fsdd,smnist,psmnist,dvs-gesture,synthetic-dvs}" in classify_help and "(default: 0.01)" in classify_help


def test_messages_name_only_extras_that_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {extra for path in (ROOT / "src").rglob("*.py")
             for extra in re.findall(r"egru\[(\w+)\]", path.read_text())}
    assert named and named <= set(extras)


def test_ctrl_c_in_the_last_validation_leaves_best_pt_as_it_was(tmp_path, monkeypatch):
    """best.pt is written only after a validation that finished and improved."""
    forward, evaluations = lm.LanguageModel.forward, []

    def interrupted(self, tokens, state, record=False):
        if not self.training:
            evaluations.append(1)
            if len(evaluations) == 5:  # 3 batches per validation: inside the one after step 4
                os.kill(os.getpid(), signal.SIGINT)
        return forward(self, tokens, state, record)

    monkeypatch.setattr(lm.LanguageModel, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm_run(tmp_path, max_steps=4, eval_every=2)
    last, best = (torch.load(tmp_path / n, weights_only=False)["position"] for n in ("last.pt", "best.pt"))
    assert (last["step"], last["validated_step"]) == (4, 2)
    assert (best["step"], best["validated_step"]) == (2, 2)


@pytest.mark.parametrize("model", ["egru", "gru", "lstm"])
def test_pruning_reaches_its_target_and_resumes_exactly(tmp_path, model):
    """Gradual pruning in the loop, for every core: the masks reach the target sparsity at the
    schedule's end, the weights computed with are exactly zero there, and a run stopped and
    resumed ends where an uninterrupted one does."""
    changes = dict(model=model, prune_to=0.5, prune_end=0.4, prune_every=2, dropconnect=0.2)
    full = lm_run(tmp_path / "full", **changes)
    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    masks = {k: v for k, v in ckpt["model"].items() if k.endswith("_mask")}
    assert len(masks) == 4  # weight_ih and weight_hh of two layers
    for name, mask in masks.items():
        assert int((mask == 0).sum()) == round(0.5 * mask.numel()), name
    net = lm.model_from_checkpoint(ckpt)
    for name, mask in masks.items():
        module = net.get_submodule(name.rsplit(".", 1)[0])
        weight = getattr(module, name.rsplit(".", 1)[1][:-len("_mask")] + "_orig") * mask
        assert torch.equal(weight[mask == 0], torch.zeros(int((mask == 0).sum()))), name
    lm_run(tmp_path / "resumed", max_steps=5, **changes)
    cfg = lm.LMConfig(**{**LM, **changes})
    resumed = lm.train_and_evaluate(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed["test"]["loss"] == full["test"]["loss"]


def test_pruning_options_are_checked():
    with pytest.raises(ValueError, match="prune_end must be a number in \\(prune_start = 0.5, 1\\]"):
        lm.LMConfig(prune_to=0.5, prune_start=0.5, prune_end=0.5)
    with pytest.raises(ValueError, match="prune_to must be a number in \\[0, 1\\)"):
        lm.LMConfig(prune_to=1.0)
