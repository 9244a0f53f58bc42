"""`egru` misused: one line on stderr, exit status 2, no traceback, no run directory left behind."""

import argparse
import subprocess
import sys

import pytest
import torch

from egru import cli, data
from egru.recipes import lm


def generated_corpus(name="ptb", data_dir=None, download=False):
    """50 words, 400 training tokens, 100 each for validation and test."""
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(50, (n,), generator=generator)  # noqa: E731
    return data.Corpus(name, [f"w{i}" for i in range(50)], ids(400), ids(100), ids(100))


@pytest.fixture(autouse=True)
def _generated_corpus(monkeypatch):
    monkeypatch.setattr(data, "load_corpus", generated_corpus)


def error_line(code, capfd) -> str:
    """The one line a misuse printed on stderr, once its exit status was checked."""
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    return lines[0]


@pytest.mark.parametrize("options,message", [
    (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    (["--max-steps", "0"], "max_steps must be a positive integer"),
    (["--max-steps", "-5"], "max_steps must be a positive integer"),
    (["--eval-every", "-1"], "eval_every must be 0 or a positive integer"),
    (["--bptt", "0"], "bptt must be a positive integer"),
    (["--lr", "nan"], "lr must be a positive number, got nan"),
    (["--dropconnect", "1"], "dropconnect must be a number in [0, 1)"),
    (["--seed", "-1"], "seed must be an integer from 0"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--batch-size", "500"], "batch_size 500 is too large: ptb's train split has 400 tokens"),
    (["--eval-batch-size", "60"], "eval_batch_size 60 is too large"),
    (["--resume"], "holds no run to resume"),
])
def test_train_lm_refuses_bad_values(tmp_path, capfd, options, message):
    code = cli.main(["train", "lm", "--run-dir", str(tmp_path / "run"), "--no-progress", *options])
    line = error_line(code, capfd)
    assert line.startswith("egru train lm: error: ") and message in line
    assert not (tmp_path / "run").exists()


TRAIN_LM = ["train", "lm", "--run-dir", "RUN"]  # RUN: a run directory that must not appear


@pytest.mark.parametrize("argv,line", [
    ([], "egru: error: the following arguments are required: command"),
    (["nope"], "egru: error: argument command: invalid choice: 'nope'"),
    (["train"], "egru train: error: the following arguments are required: task"),
    (["train", "lm"], "egru train lm: error: the following arguments are required: --run-dir"),
    ([*TRAIN_LM, "--epochs", "x"], "egru train lm: error: argument --epochs: invalid int value: 'x'"),
    ([*TRAIN_LM, "--model"], "egru train lm: error: argument --model: expected one argument"),
    ([*TRAIN_LM, "--bogus"], "egru: error: unrecognized arguments: --bogus"),
    (["eval", "lm"], "egru eval lm: error: the following arguments are required: checkpoint"),
    (["eval", "lm", "RUN", "--split", "nope"], "egru eval lm: error: argument --split: invalid choice: 'nope'"),
    (["demo", "--epochs", "0"], "egru demo: error: argument --epochs: expected an integer >= 1, got '0'"),
    (["demo", "--hidden-size", "0"], "egru demo: error: argument --hidden-size: expected an integer >= 1"),
    (["demo", "--threads", "-1"], "egru demo: error: argument --threads: expected an integer >= 0, got '-1'"),
    (["demo", "--train-size", "5000"], "egru demo: error: argument --train-size: expected an integer from 1 to"),
    (["demo", "--test-size", "0"], "egru demo: error: argument --test-size: expected an integer from 1 to"),
    (["demo", "--backend", "nope"], "egru demo: error: argument --backend: unknown backend 'nope'"),
    (["train", "classify"], "egru train classify: error: the following arguments are required: --run-dir"),
    (["train", "classify", "--run-dir", "RUN", "--model", "rnn"],
     "egru train classify: error: argument --model: unknown model 'rnn'"),
    (["train", "classify", "--run-dir", "RUN", "--hidden-size", "x"],
     "egru train classify: error: argument --hidden-size: invalid int value: 'x'"),
])
def test_usage_errors_are_one_line(tmp_path, capfd, argv, line):
    argv = [str(tmp_path / "run") if a == "RUN" else a for a in argv]
    assert error_line(cli.main(argv), capfd).startswith(line)
    assert not (tmp_path / "run").exists()


def test_demo_results_into_a_missing_folder_is_refused_before_training(tmp_path, capfd):
    target = tmp_path / "missing" / "results.json"
    code = cli.main(["demo", "--epochs", "1", "--no-progress", "--json", str(target)])
    assert "its folder does not exist" in error_line(code, capfd)
    assert not target.parent.exists()


def test_a_used_run_directory_needs_resume(tmp_path, capfd):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 4.0}\n')
    code = cli.main(["train", "lm", "--run-dir", str(run), "--max-steps", "1", "--no-progress"])
    assert "already holds a run: continue it with --resume" in error_line(code, capfd)
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "split": "train", "loss": 4.0}\n'


def _random_bytes(path):
    path.write_bytes(bytes(range(256)) * 4)


def _empty(path):
    path.write_bytes(b"")


def _without_vocab_size(path):
    torch.save({"kind": lm.LanguageModelTask.KIND, "config": {}, "model": {}}, path)


def _something_else(path):
    torch.save({"weights": torch.zeros(3)}, path)


def _a_directory(path):
    path.mkdir()


def _nothing(path):
    pass


@pytest.mark.parametrize("make,message", [
    (_random_bytes, "is not an egru language-model checkpoint"),
    (_empty, "is not an egru language-model checkpoint"),
    (_without_vocab_size, "is an incomplete egru language-model checkpoint: it lacks vocab_size"),
    (_something_else, "is not an egru language-model checkpoint"),
    (_a_directory, "is not a file"),
    (_nothing, "does not exist"),
], ids=["random bytes", "empty", "without vocab_size", "something else", "a directory", "nothing"])
def test_eval_lm_refuses_what_is_not_a_checkpoint(tmp_path, capfd, make, message):
    path = tmp_path / "model.pt"
    make(path)
    line = error_line(cli.main(["eval", "lm", str(path), "--no-progress"]), capfd)
    assert line.startswith("egru eval lm: error: ") and message in line


def test_help_and_version_still_exit_0(capsys):
    assert cli.main(["--version"]) == 0
    assert cli.main(["train", "lm", "--help"]) == 0
    assert "--run-dir" in capsys.readouterr().out


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "egru.cli", "train", "lm", "--run-dir", str(run),
                           "--max-steps", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "egru train lm: error: max_steps must be a positive integer or None, got 0\n"
    assert not run.exists()


# --- every option offered can be used --------------------------------------------------------

def _config_commands():
    """(argv prefix, its subparser) of every command whose options fill a config."""
    parser = cli.build_parser()
    subcommands = lambda p: next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: E731
    commands = {("demo",): subcommands(parser)["demo"]}
    for name, sub in subcommands(subcommands(parser)["train"]).items():
        commands[("train", name, "--run-dir", "RUN")] = sub
    return commands


def _values(action):
    """Values worth trying for an option: its choices, both sides of a flag, or a few numbers."""
    if action.choices:
        return list(action.choices)
    if isinstance(action, argparse.BooleanOptionalAction):
        return [f"--{action.dest[len(cli.PREFIX):].replace('_', '-')}",
                f"--no-{action.dest[len(cli.PREFIX):].replace('_', '-')}"]
    return ["1", "2", "8", "0.5", "0.1", "0", "30"]


def _accepted(argv) -> bool:
    args = cli.build_parser().parse_args(argv)
    try:
        args.config(args)
    except ValueError:
        return False
    return True


def _parses(argv) -> bool:
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


@pytest.mark.parametrize("command", list(_config_commands()), ids=lambda c: " ".join(c[:2]))
def test_every_option_offered_is_accepted_with_some_value(command, capsys):
    """An option --help offers has a value the command accepts, alone or with one other choice."""
    parser = _config_commands()[command]
    options = [a for a in parser._actions if a.dest.startswith(cli.PREFIX)]
    contexts = [[]] + [[a.option_strings[0], v] for a in parser._actions if a.option_strings and a.choices
                       for v in a.choices]
    refused = []
    for action in options:
        flag = action.option_strings[0]
        tries = [[v] if v.startswith("--") else [flag, v] for v in _values(action)]
        tries = [t for t in tries if _parses([*command, *t])]
        if not any(_accepted([*command, *context, *t]) for t in tries for context in contexts):
            refused.append(flag)
        if action.choices:  # each choice, not just one
            refused += [f"{flag} {v}" for v in action.choices
                        if not any(_accepted([*command, *context, flag, v]) for context in contexts)]
    capsys.readouterr()
    assert refused == []


def test_online_learning_offers_no_other_core(capsys):
    assert cli.main(["train", "online", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--quantize", "--quantize-start", "--q15-ranges"):
        assert flag not in text.split()
    code = cli.main(["train", "online", "--run-dir", "RUN", "--model", "gru"])
    assert code == 2


@pytest.mark.parametrize("size,message", [
    ("1000000000", "the model's sizes are too large to allocate"),
    ("100000", "GiB, more than the"),
])
def test_a_model_too_large_for_memory_is_refused_in_one_line(tmp_path, capfd, size, message):
    code = cli.main(["train", "lm", "--run-dir", str(tmp_path / "run"), "--hidden-size", size, "--no-progress"])
    assert message in error_line(code, capfd)


def test_an_allocation_that_fails_is_one_line(tmp_path, capfd, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 480000000000 bytes.\nmore")
    monkeypatch.setattr(lm, "train_and_evaluate", refuse)
    code = cli.main(["train", "lm", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    line = error_line(code, capfd)
    assert line.startswith("egru train lm: error: not enough memory for the sizes asked for") and "more" in line


def test_a_checkpoint_of_other_shapes_is_named_in_one_line(tmp_path, capfd, monkeypatch):
    from egru.recipes import classify

    generator = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randn(n, 6, 3, generator=generator), torch.randint(4, (n,), generator=generator))  # noqa: E731
    monkeypatch.setitem(classify.TASKS, "mnist1d", lambda **kw: classify.Sequences(
        {"train": split(16), "test": split(8)}, num_classes=4))
    run = tmp_path / "run"
    assert cli.main(["train", "classify", "--run-dir", str(run), "--hidden-size", "6", "--batch-size", "8",
                     "--max-steps", "1", "--neurobench", "0", "--no-progress"]) == 0
    ckpt = torch.load(run / "best.pt", weights_only=False)
    ckpt["model"]["layers.0.weight_hh_l0"] = torch.zeros(18, 5)
    torch.save(ckpt, tmp_path / "other.pt")
    capfd.readouterr()
    line = error_line(cli.main(["export-c", str(tmp_path / "other.pt"), "--out", str(tmp_path / "c")]), capfd)
    assert line == ("egru export-c: error: the checkpoint does not fit a egru classifier: layers.0.weight_hh_l0 "
                    "has shape (18, 5) where the model expects (18, 6)")
