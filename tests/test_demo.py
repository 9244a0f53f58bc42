"""`egru demo`: runs end to end, and the same seed gives the same results."""

import json

import pytest

pytest.importorskip("mnist1d", reason="the demo needs the mnist1d package (pip install 'egru[demo]')")

from egru import cli  # noqa: E402

TINY = ["demo", "--epochs", "1", "--hidden-size", "16", "--train-size", "256", "--test-size", "128",
        "--no-progress", "--threads", "1"]


def run_demo(tmp_path, name, *extra):
    path = tmp_path / f"{name}.json"
    assert cli.main([*TINY, "--json", str(path), *extra]) == 0
    results = json.loads(path.read_text())
    for side in ("egru", "gru"):
        results[side].pop("train_seconds")
    return results


def test_demo_is_reproducible_under_a_seed(tmp_path, capsys):
    a = run_demo(tmp_path, "a", "--seed", "1")
    b = run_demo(tmp_path, "b", "--seed", "1")
    c = run_demo(tmp_path, "c", "--seed", "2")
    assert a == b
    assert a != c
    assert 0 <= a["egru"]["activity_sparsity"] <= 1
    assert a["egru"]["effective_macs_per_step"] < a["gru"]["dense_macs_per_step"]
    assert "test accuracy" in capsys.readouterr().out


def test_demo_reports_bad_arguments(capsys):
    assert cli.main([*TINY, "--backend", "nonsense"]) == 2
    assert "unknown backend" in capsys.readouterr().err
