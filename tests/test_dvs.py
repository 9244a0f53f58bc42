"""Event-camera data (egru.dvs) and the synthetic-dvs task: frames count events where they
belong, the synthetic generator is deterministic and its gestures move as named, and the task
trains through the recipe with a CNN per frame and a readout averaged over time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egru import cli, dvs
from egru.recipes import classify


def events(rows):
    out = np.zeros(len(rows), dtype=dvs.EVENT_DTYPE)
    for k, (x, y, p, t) in enumerate(rows):
        out[k] = (x, y, p, t)
    return out


def test_frames_count_each_event_in_its_window_channel_and_pixel():
    e = events([(0, 0, 1, 0), (5, 3, 0, 24_999), (5, 3, 0, 25_000), (127, 127, 1, 74_999), (1, 1, 1, 75_000)])
    frames = dvs.to_frames(e, duration=75_000)
    assert frames.shape == (3, 2, 128, 128) and frames.sum() == 4  # the event at 75 ms is after the end
    assert frames[0, 1, 0, 0] == 1 and frames[0, 0, 3, 5] == 1 and frames[1, 0, 3, 5] == 1
    assert frames[2, 1, 127, 127] == 1
    pooled = dvs.to_frames(e, duration=75_000, downsample=4)
    assert pooled.shape == (3, 2, 32, 32) and pooled[0, 0, 0, 1] == 1 and pooled[2, 1, 31, 31] == 1
    with pytest.raises(ValueError, match="does not divide"):
        dvs.to_frames(e, duration=75_000, downsample=3)


def x_centroid_slope(recording) -> float:
    """How fast the ON events' mean x moves (pixels per second)."""
    on = recording[recording["p"] == 1]
    return float(np.polyfit(on["t"] / 1e6, on["x"].astype(float), 1)[0])


def test_synthetic_gestures_are_deterministic_and_move_as_named():
    a, labels = dvs.synthetic_gestures(6, seed=3, classes=3)
    b, _ = dvs.synthetic_gestures(6, seed=3, classes=3)
    c, _ = dvs.synthetic_gestures(6, seed=4, classes=3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    for recording in a:
        assert recording.dtype == dvs.EVENT_DTYPE and np.all(np.diff(recording["t"]) >= 0)
        assert recording["x"].min() >= 0 and recording["x"].max() < 128 and set(np.unique(recording["p"])) <= {0, 1}
    # "left to right" moves right, "right to left" left, "top to bottom" hardly sideways
    assert x_centroid_slope(a[0]) > 20 and x_centroid_slope(a[3]) > 20
    assert x_centroid_slope(a[1]) < -20 and x_centroid_slope(a[4]) < -20
    assert abs(x_centroid_slope(a[2])) < 10
    with pytest.raises(ValueError, match="classes must be from 2"):
        dvs.synthetic_gestures(2, classes=11)


@pytest.fixture
def tiny_synthetic(monkeypatch):
    monkeypatch.setattr(classify, "SYNTHETIC_DVS", {"train": (12, 0), "test": (6, 1)})


def test_synthetic_dvs_trains_through_the_recipe(tiny_synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "classify", "--task", "synthetic-dvs", "--hidden-size", "8", "--frame-features", "6",
            "--readout", "mean", "--batch-size", "4", "--epochs", "1", "--no-progress"]
    assert cli.main([*args, "--run-dir", str(run)]) == 0
    assert "egru: test accuracy" in capsys.readouterr().out
    model = classify.load_classifier(run / "best.pt")
    assert model.frontend.frame_shape == (2, 32, 32) and model.mean_readout
    x, _ = classify.load_synthetic_dvs().splits["test"]
    with torch.no_grad():
        logits, _ = model(x[:3].transpose(0, 1))
    assert logits.shape == (3, 10)
    assert cli.main([*args, "--run-dir", str(tmp_path / "gru"), "--model", "gru", "--max-steps", "1"]) == 0


def write_dvs_gesture(root, users=10, events=200, seed=0):
    """A DVSGesture folder as tonic downloads and unpacks it: per split an archive (tonic only
    checks that it exists) and userNN_<lighting>/<label>.npy files of (N, 4) int64 x, y, p, t
    (milliseconds); tonic wants at least 100 files per split. Returns {path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split in ("ibmGestureTrain", "ibmGestureTest"):
        (root / "DVSGesture").mkdir(parents=True, exist_ok=True)
        (root / "DVSGesture" / f"{split}.tar.gz").write_bytes(b"")
        for user in range(1, users + 1):
            folder = root / "DVSGesture" / split / f"user{user:02d}_led"
            folder.mkdir(parents=True)
            for label in range(11):
                a = np.stack([rng.integers(0, 128, events), rng.integers(0, 128, events), rng.integers(0, 2, events),
                              np.sort(rng.integers(40, 2400, events))], axis=1).astype(np.int64)
                np.save(folder / f"{label}.npy", a)
                written[folder / f"{label}.npy"] = a
    return written


def test_dvs_gesture_through_tonic_from_files_in_its_format(tmp_path):
    pytest.importorskip("tonic", reason="tonic is not installed (pip install 'egru[dvs]')")
    written = write_dvs_gesture(tmp_path)
    splits = dvs.load_dvs_gesture(tmp_path)
    recordings, labels = splits["train"]
    assert len(recordings) == 110 and labels.tolist() == list(range(11)) * 10  # by file: user01/0 … user10/10
    first = written[tmp_path / "DVSGesture" / "ibmGestureTrain" / "user01_led" / "0.npy"]
    assert np.array_equal(recordings[0]["t"], first[:, 3] * 1000)  # milliseconds on disk, µs in memory
    assert np.array_equal(recordings[0]["x"], first[:, 0]) and np.array_equal(recordings[0]["p"], first[:, 2])

    sequences = classify.TASKS["dvs-gesture"](data_dir=tmp_path)
    x, y = sequences.splits["test"]
    assert x.shape == (110, 68, 2 * 32 * 32) and sequences.num_classes == 11
    # the first 1.7 s from the first event, 25 ms frames, 4 × 4 pixel blocks
    events = splits["test"][0][5]
    t = events["t"] - events["t"].min()
    keep = t < 1_700_000
    assert int(x[5].sum()) == int(keep.sum())
    assert float(x[5].reshape(68, 2, 32, 32)[t[keep][0] // 25_000].sum()) > 0


def test_dvs_gesture_missing_says_where_to_put_it(tmp_path):
    from egru.data import DataError

    with pytest.raises(DataError, match="DVS128 Gesture not found: put tonic's DVSGesture/ folder"):
        dvs.locate_dvs_gesture(tmp_path)


def test_our_frames_equal_tonics(tmp_path):
    tonic = pytest.importorskip("tonic", reason="tonic is not installed (pip install 'egru[dvs]')")
    recordings, _ = dvs.synthetic_gestures(2, seed=5, classes=2)
    sensor = (128, 128, 2)
    for events in recordings:
        to_frame = tonic.transforms.ToFrame(sensor_size=sensor, time_window=25_000, start_time=0, end_time=1_700_000)
        theirs = to_frame(events)
        ours = dvs.to_frames(events, 1_700_000)
        assert theirs.shape == ours.shape and np.array_equal(theirs, ours)
