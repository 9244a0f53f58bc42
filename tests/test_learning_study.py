"""benchmarks/learning_study.py: every run is a valid ``egru train classify`` command that changes
what its name says and nothing else, and the report averages seeds and draws the figure."""

from __future__ import annotations

import dataclasses
import json

import pytest

from egru import cli


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("learning_study")


def config_of(study, name, args, root):
    parsed = cli.build_parser().parse_args(study.studies.command(study.RECIPE, name, args, root)[1:])
    return cli.classify_config(parsed)


def test_every_candidate_changes_only_what_it_names(study, tmp_path):
    grid = study.runs(steps=600, seeds=(0, 1))
    configs = {name: config_of(study, name, args, tmp_path) for name, args in grid.items()}
    assert set(configs) == {n + s for n in [*study.BASELINES, *study.CANDIDATES] for s in ("", "-s1")}
    base = configs["egru"]
    assert (base.task, base.pixels_per_step, base.hidden_size, base.batch_size, base.max_steps) == \
        ("smnist", 4, 128, 64, 600)
    assert (base.readout, base.pseudo_derivative_support, base.valid_size, base.eval_every) == ("mean", 1.0, 1000, 100)
    changed = {name: {k for k, v in dataclasses.asdict(cfg).items() if getattr(base, k) != v}
               for name, cfg in configs.items() if name.startswith("egru") and not name.endswith("-s1")}
    assert changed["egru-k3"] == {"pseudo_derivative_support"}
    assert changed["egru-evnn"] == {"init"}
    assert changed["egru-lr1e-3"] == {"lr", "threshold_lr"}
    assert changed["egru-k3-threshold0.3"] == {"pseudo_derivative_support", "threshold_mean"}
    assert configs["egru-s1"].seed == 1 and configs["gru-mean"].model == "gru"


def write_run(root, name, curve, test=None, activity=None, gradient=None):
    """A run's metrics.jsonl (validation records) and, when finished, results.json."""
    run = root / name
    run.mkdir()
    records = [{"step": step, "split": "valid", "accuracy": acc,
                **({"gradient_through_time": {"layer0": gradient}} if gradient else {})}
               for step, acc in curve.items()]
    run.joinpath("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if test is not None:
        run.joinpath("results.json").write_text(json.dumps({
            "test": {"accuracy": test, "layers": {"layer0": {"activity": activity}}},
            "train_tokens_per_second": 1000.0}))


def test_report_averages_the_seeds_and_draws(study, tmp_path, capsys):
    write_run(tmp_path, "egru-k3", {200: 0.2, 400: 0.5}, 0.4, 0.3, [1e-3, 2e-3, 0.0])
    write_run(tmp_path, "egru-k3-s1", {200: 0.4, 400: 0.7}, 0.6, 0.5)
    write_run(tmp_path, "gru-mean", {200: 0.5})  # unfinished
    grid = {name: [] for name in ("egru-k3", "egru-k3-s1", "gru-mean", "egru-k5")}
    study.report(tmp_path, tmp_path / "study.png", grid)
    out = capsys.readouterr().out
    assert "| egru-k3 | 2 | 30.0% | 60.0% |  |  |  | 50.0% | 60.0% |" in out
    assert "| gru-mean | 1 | 50.0% |  |  |  |  |  |  |" in out
    assert "egru-k5" not in out
    assert (tmp_path / "study.png").stat().st_size > 0
