"""A run that is killed at any write of any of its files, or interrupted there, resumes to the
end and leaves the files an uninterrupted run leaves (tests/kill_worker.py kills real processes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from egru.recipes import common

HERE = Path(__file__).resolve().parent

# Validates at steps 2, 4, 6 and 8 of a task that is learnt, so best.pt is written more than once.
ARGV = ["train", "classify", "--task", "mnist1d", "--hidden-size", "8", "--epochs", "2", "--max-steps", "8",
        "--batch-size", "8", "--eval-every", "2", "--valid-size", "8", "--lr", "0.03", "--backend", "reference",
        "--neurobench", "0", "--no-progress"]
EXPECTED_FIRST_EXIT = {"kill-before": -9, "kill-after": -9, "interrupt": 130}


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    work = tmp_path_factory.mktemp("killed")
    done = subprocess.run([sys.executable, str(HERE / "kill_worker.py"), str(work), json.dumps(ARGV)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return lines[0], lines[1:]


def test_the_reference_run_writes_best_pt_more_than_once(scenarios):
    reference, _ = scenarios
    assert reference["writes"].count("best.pt") >= 2 and reference["writes"][-1] == "results.json"
    assert reference["files"]["temporaries"] == []


def test_every_killed_or_interrupted_run_resumes_to_the_uninterrupted_result(scenarios):
    reference, runs = scenarios
    assert len(runs) == 3 * len(reference["writes"])
    for run in runs:
        where = f"{run['how']} at write {run['write']} ({run['name']})"
        assert run["exits"][0] == EXPECTED_FIRST_EXIT[run["how"]], where
        assert run["exits"][-1] == 0 and len(run["exits"]) == 2, f"{where}: exits {run['exits']}"
        for key, value in reference["files"].items():
            assert run["files"][key] == value, f"{where}: {key} differs"


def test_a_line_cut_short_at_the_end_of_the_metrics_is_dropped(tmp_path):
    log = common.MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "split": "train", "loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 2, "spl')
    assert log.read() == [{"step": 1, "split": "train", "loss": 1.0}]
    log.keep(lambda r: True)
    assert log.path.read_text() == '{"step": 1, "split": "train", "loss": 1.0}\n'


def test_a_broken_line_inside_the_metrics_is_an_error(tmp_path):
    log = common.MetricsLog(tmp_path, tensorboard=False)
    log.path.write_text('{"step": 1\n{"step": 2, "split": "train"}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        log.read()


def test_temporaries_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    for name in ("last.ptab12.tmp", "best.ptxyz.tmp", "results.jsonq.tmp", "notes.tmp", "last.pt"):
        (tmp_path / name).write_text("x")
    removed = common.remove_temporaries(tmp_path, ("last.pt", "best.pt", "results.json"))
    assert sorted(p.name for p in removed) == ["best.ptxyz.tmp", "last.ptab12.tmp", "results.jsonq.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    common.write_json_atomic({"a": 1}, path)

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        common.write_atomic(path, fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
