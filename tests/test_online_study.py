"""benchmarks/online_study.py: every run is a valid ``egru train online`` command with the
settings the study means (the two learnings alike but for the learning), and its report reads
runs' results and training losses."""

from __future__ import annotations

import json

import pytest

from egru import cli
from egru.recipes import online


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("online_study")


def config_of(study, name, args, root):
    parsed = cli.build_parser().parse_args(study.studies.command(study.RECIPE, name, args, root)[1:])
    return online.OnlineConfig(**cli._overrides(parsed))


def test_commands_parse_into_the_study_configs(study, tmp_path):
    configs = {name: config_of(study, name, args, tmp_path) for name, args in study.runs().items()}
    assert set(configs) == {f"{t}-{l}" for t in ("rowmnist", "delay") for l in ("rtrl", "bptt")}
    for task in ("rowmnist", "delay"):
        rtrl, bptt = configs[f"{task}-rtrl"], configs[f"{task}-bptt"]
        assert (rtrl.learning, bptt.learning) == ("rtrl", "bptt")
        assert rtrl == online.OnlineConfig(**{**vars(bptt), "learning": "rtrl"})  # nothing else differs
        assert rtrl.task == task and rtrl.update_every is None  # one update per sequence: BPTT's gradient
    assert configs["rowmnist-rtrl"].epochs == 1
    assert (configs["delay-rtrl"].delay, configs["delay-rtrl"].max_steps) == (20, 400)


def write_run(root, name, accuracy, losses, macs=None):
    """A finished run as the harness leaves it (the fields the report reads)."""
    run = root / name
    run.mkdir()
    test = {"loss": 0.5, "accuracy": accuracy, "layers": {"layer0": {"activity": 0.25, "backward_activity": 0.5}}}
    if macs is not None:
        test["influence_macs_per_token"] = macs
    run.joinpath("results.json").write_text(json.dumps({
        "config": {"batch_size": 32}, "test": test, "train_tokens_per_second": 100.0, "train_seconds": 120.0}))
    records = [{"step": s, "split": "train", "loss": v} for s, v in losses] + [{"step": 9, "split": "test"}]
    run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_report_prints_the_table_and_draws_the_plot(study, tmp_path, capsys):
    write_run(tmp_path, "delay-rtrl", 0.75, [(1, 1.0), (20, 0.5), (40, 0.25)], macs=1234.0)
    write_run(tmp_path, "delay-bptt", 0.5, [(1, 1.0), (20, 0.75), (40, 0.25)])
    rows = study.report(tmp_path, tmp_path / "study.png")
    assert rows["delay-rtrl"]["losses"] == [(32, 1.0), (640, 0.5), (1280, 0.25)]  # examples seen
    table = capsys.readouterr().out
    row = "| 75.0% | 50.0% | {} | 100 | 2.0 min | 32 examples | 0.25 |"  # equal at step 1 only
    assert "| delay | rtrl | 75.00% | 0.5000 " + row.format("1,234") in table
    assert "| delay | bptt | 50.00% | 0.5000 " + row.format("") in table
    assert (tmp_path / "study.png").stat().st_size > 0


def test_compare_finds_where_two_runs_part(study):
    assert study.compare([(1, 2.0), (2, 1.0), (3, 0.5)], [(1, 2.0), (2, 1.0), (3, 0.75)]) == (2, 0.25)
    assert study.compare([(1, 2.0), (2, 1.0)], [(1, 2.0), (2, 1.0), (3, 9.0)]) == (2, 0.0)  # all equal
    assert study.compare([(1, 2.0)], [(1, 2.5)]) == (0, 0.5)
    assert study.compare([(1, 2.0)], [(2, 2.0)]) == (None, None)
