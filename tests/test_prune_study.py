"""benchmarks/prune_study.py: every run of the weight-sparsity study is a valid ``egru train lm``
command with the settings the study means, and its report reads a run's results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egru import cli
from egru.recipes import lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(load_benchmark):
    return load_benchmark("prune_study")


def config_of(study, name, args, root):
    parsed = cli.build_parser().parse_args(study.command(name, args, root)[1:])
    return cli.lm_config(parsed)


def test_commands_parse_into_the_study_configs(study, tmp_path):
    grid = study.runs()
    configs = {name: config_of(study, name, args, tmp_path) for name, args in grid.items()}
    ptb = {(c.model, c.prune_to) for n, c in configs.items() if c.dataset == "ptb" and c.hidden_size == 400}
    assert ptb == {(m, s) for m in ("egru", "gru") for s in study.SPARSITIES}
    for name, cfg in configs.items():
        preset = lm.preset("cpu-small", cfg.model)
        assert cfg.lr == preset.lr and cfg.dropconnect == preset.dropconnect, name
        assert (cfg.epochs, cfg.max_steps) == {"ptb": (2, None), "wikitext2": (1, 600)}[cfg.dataset]
        if cfg.prune_to:
            schedule = {"ptb": (0.1, 0.6, 50), "wikitext2": (0.02, 0.2, 25)}[cfg.dataset]
            assert (cfg.prune_start, cfg.prune_end, cfg.prune_every) == schedule
    wide = [c for c in configs.values() if c.hidden_size != 400]
    assert [(c.model, c.hidden_size, c.prune_to) for c in wide] == [("egru", study.WIDE_HIDDEN, 0.0)]


def write_run(root, name, model, prune_to, layers, test_perplexity):
    """A finished run's results.json as the harness writes it (the fields the report reads)."""
    config = {"model": model, "hidden_size": 400, "embedding_size": 200, "num_layers": 2, "prune_to": prune_to}
    run = root / name
    run.mkdir()
    run.joinpath("results.json").write_text(json.dumps({
        "config": config, "valid": {"perplexity": 120.0},
        "test": {"perplexity": test_perplexity, "layers": layers},
        "train_tokens_per_second": 1000.0, "train_seconds": 10.0}))
    return run


def layer(activity, macs, density_ih, density_hh):
    return {"activity": activity, "effective_macs_per_token": macs, "weight_density_ih": density_ih,
            "weight_density_hh": density_hh}


def test_report_reads_a_run(study, tmp_path):
    """Effective MACs relative to the unpruned GRU's dense count, weight density per layer
    weighted by the two matrices' sizes."""
    layers = {"layer0": layer(0.1, 54_000.0, 0.2, 0.1),  # E=200 → H=400
              "layer1": layer(0.1, 0.0, 0.2, 0.1)}
    m = study.measure(write_run(tmp_path, "ptb-egru-p90", "egru", 0.9, layers, 110.0))
    # dense GRU: 3·(200·400 + 400·400) + 3·(400·200 + 200·200) = 1,080,000 MACs per token
    assert m["macs"] == pytest.approx(54_000 / 1_080_000)
    assert m["weight_density"][0] == pytest.approx((0.2 * 200 + 0.1 * 400) / 600)
    assert m["weight_density"][1] == pytest.approx((0.2 * 400 + 0.1 * 200) / 600)
    assert m["test"] == 110.0


def test_report_prints_the_table_and_draws_the_plot(study, tmp_path, capsys):
    layers = {"layer0": layer(1.0, 720_000.0, 1.0, 1.0), "layer1": layer(1.0, 360_000.0, 1.0, 1.0)}
    write_run(tmp_path, "ptb-gru-p00", "gru", 0.0, layers, 118.0)
    study.report(tmp_path, tmp_path / "study.png")
    table = capsys.readouterr().out
    assert "| ptb-gru-p00 | 0% | 118.0 | 120.0 | 0.0% / 0.0% | 100.0% / 100.0% | 1.000 (1/1.0) |" in table
    assert (tmp_path / "study.png").stat().st_size > 0


def test_full_study_runs_the_presets_length(study, tmp_path):
    for name, args in study.runs(full=True).items():
        cfg = config_of(study, name, args, tmp_path)
        assert (cfg.epochs, cfg.max_steps) == (lm.preset("cpu-small", cfg.model).epochs, None)
