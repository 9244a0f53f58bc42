"""Event-camera data: events binned into frames, and a synthetic gesture generator.

Events are numpy structured arrays with the fields ``x``, ``y`` (pixel), ``p`` (polarity, 0
or 1) and ``t`` (microseconds), the layout of the ``tonic`` library's DVS128 Gesture.

* :func:`to_frames`: events → (T, 2, H, W) counts per time window (25 ms in the EGRU paper),
  one channel per polarity, optionally pooled over ``downsample × downsample`` pixels.
* :func:`load_dvs_gesture`: DVS128 Gesture (Amir et al. 2017; 11 classes) through
  ``tonic.datasets.DVSGesture``, from the files tonic downloads
  (``DVSGesture/ibmGestureTrain/userNN_<lighting>/<label>.npy``, and ``ibmGestureTest``).
* :func:`synthetic_gestures`: DVS-like recordings of a bright blob moving along one of
  :data:`GESTURES` on a 128 × 128 sensor (rotated, scaled, at random speeds and phases), with
  sensor noise and hot pixels, deterministic from a seed. They
  stand in for DVS128 Gesture on machines without it: results on them are always labelled
  synthetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<i8"), ("y", "<i8"), ("p", "<i8"), ("t", "<i8")])
SENSOR = (128, 128)  # DVS128: width, height

# The synthetic gestures: where the blob's centre is at phase s in [0, 1], in units of the
# sensor's half-width around its centre.
GESTURES = {
    "left to right": lambda s: (2 * s - 1, 0 * s),
    "right to left": lambda s: (1 - 2 * s, 0 * s),
    "top to bottom": lambda s: (0 * s, 2 * s - 1),
    "bottom to top": lambda s: (0 * s, 1 - 2 * s),
    "clockwise circle": lambda s: (0.6 * np.cos(2 * np.pi * s), 0.6 * np.sin(2 * np.pi * s)),
    "anticlockwise circle": lambda s: (0.6 * np.cos(2 * np.pi * s), -0.6 * np.sin(2 * np.pi * s)),
    "diagonal down": lambda s: (2 * s - 1, 2 * s - 1),
    "diagonal up": lambda s: (2 * s - 1, 1 - 2 * s),
    "wave": lambda s: (0.7 * np.sin(4 * np.pi * s), 0 * s),
    "nod": lambda s: (0 * s, 0.7 * np.sin(4 * np.pi * s)),
}


DVS_GESTURE_SPLITS = {"train": "ibmGestureTrain", "test": "ibmGestureTest"}


def locate_dvs_gesture(data_dir=None, download: bool = False) -> Path:
    """The folder holding ``DVSGesture/`` with both splits: in ``data_dir`` (or
    ``EGRU_DATA_DIR``), else in the cache; with ``download``, the cache (tonic fetches there)."""
    from egru.data import DataError, _roots

    given, roots = _roots(data_dir)
    for root in roots:
        if all((root / "DVSGesture" / name).is_dir() for name in DVS_GESTURE_SPLITS.values()):
            return root
    if download:
        return roots[-1]
    raise DataError(f"DVS128 Gesture not found: put tonic's DVSGesture/ folder (ibmGestureTrain/, "
                    f"ibmGestureTest/ and their .tar.gz archives) in {given or 'a data directory (--data-dir or EGRU_DATA_DIR)'}, "
                    "or allow downloading (--download, about 2.5 GB through tonic)")


def load_dvs_gesture(data_dir=None, download: bool = False) -> dict:
    """``{"train" | "test": (recordings, labels)}``: event arrays (``x``, ``y``, ``p``, ``t`` in
    µs, as tonic gives them) in a fixed order (by user folder, then label), int64 labels 0–10."""
    try:
        import tonic
    except ImportError as err:
        raise ImportError("DVS128 Gesture is read through tonic: pip install 'egru[dvs]'") from err
    root = locate_dvs_gesture(data_dir, download)
    splits = {}
    for split in DVS_GESTURE_SPLITS:
        dataset = tonic.datasets.DVSGesture(save_to=str(root), train=split == "train")
        # tonic lists folders in the file system's order: sort by folder, then label
        order = sorted(range(len(dataset)), key=lambda i: (str(Path(dataset.data[i]).parent),
                                                            int(Path(dataset.data[i]).stem)))
        samples = [dataset[i] for i in order]
        splits[split] = ([events for events, _ in samples], np.array([label for _, label in samples], np.int64))
    return splits


def to_frames(events: np.ndarray, duration: int, time_window: int = 25_000, sensor=SENSOR,
              downsample: int = 1) -> np.ndarray:
    """(duration // time_window, 2, H // downsample, W // downsample) float32 event counts:
    frame ``k`` counts the events with ``k·time_window ≤ t < (k + 1)·time_window`` (later
    ones are left out), channel ``p``, pixel ``(y // downsample, x // downsample)``."""
    width, height = sensor
    if width % downsample or height % downsample:
        raise ValueError(f"downsample {downsample} does not divide the sensor's {width} × {height} pixels")
    frames = duration // time_window
    w, h = width // downsample, height // downsample
    keep = (events["t"] >= 0) & (events["t"] < frames * time_window)
    e = events[keep]
    index = (((e["t"] // time_window) * 2 + e["p"]) * h + e["y"] // downsample) * w + e["x"] // downsample
    counts = np.bincount(index.astype(np.int64), minlength=frames * 2 * h * w)
    return counts.reshape(frames, 2, h, w).astype(np.float32)


def synthetic_gesture(label: int, rng: np.random.Generator, duration: int = 1_700_000,
                      events_per_ms: float = 30.0, noise: float = 0.25, sensor=SENSOR) -> np.ndarray:
    """One recording of gesture ``label`` (an index into :data:`GESTURES`): a blob of random
    size whose leading edge emits ON events (p = 1) and trailing edge OFF events, along the
    gesture's path rotated by up to ±25°, scaled, shifted, started at a random phase and run at
    a random speed (so that a window may hold only part of it); plus a ``noise`` fraction of
    events at random pixels with random polarity, a third of them from a few hot pixels.
    Sorted by time."""
    width, height = sensor
    path = list(GESTURES.values())[label]
    radius = rng.uniform(6, 14)
    speed = rng.uniform(0.6, 1.3)  # whole gestures per duration
    start = rng.uniform(0, 0.3)
    scale = rng.uniform(0.6, 1.0) * (min(width, height) / 2 - radius)
    turn = np.deg2rad(rng.uniform(-25, 25))
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    centre0 = np.array([width / 2, height / 2]) + rng.normal(0, 6, 2)
    ms = duration // 1000
    s = np.clip(start + speed * np.arange(ms + 1) / ms, 0, 1)
    path_points = np.stack([np.asarray(v, dtype=np.float64) * scale for v in path(s)], axis=1)
    centres = centre0 + path_points @ rotation.T  # (ms + 1, 2)
    velocity = np.diff(centres, axis=0)  # (ms, 2) pixels per millisecond
    moving = np.linalg.norm(velocity, axis=1)
    counts = rng.poisson(events_per_ms * np.minimum(moving / (moving.mean() + 1e-9), 3))
    step = np.repeat(np.arange(ms), counts)
    angle = rng.uniform(0, 2 * np.pi, len(step))
    direction = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    distance = radius * (1 + 0.15 * rng.standard_normal(len(step)))
    position = centres[step] + direction * distance[:, None]
    polarity = (np.einsum("ij,ij->i", direction, velocity[step]) > 0).astype(np.int64)
    times = step * 1000 + rng.integers(0, 1000, len(step))
    inside = (position[:, 0] >= 0) & (position[:, 0] < width) & (position[:, 1] >= 0) & (position[:, 1] < height)
    k = int(inside.sum())
    n_noise = rng.poisson(noise * max(len(step), 1))
    hot = rng.integers(0, [width, height], size=(4, 2))  # a few pixels that fire often
    noise_x, noise_y = rng.integers(0, width, n_noise), rng.integers(0, height, n_noise)
    from_hot = rng.random(n_noise) < 1 / 3
    which = rng.integers(0, len(hot), n_noise)
    noise_x[from_hot], noise_y[from_hot] = hot[which[from_hot], 0], hot[which[from_hot], 1]
    events = np.empty(k + n_noise, dtype=EVENT_DTYPE)
    events["x"][:k], events["y"][:k] = position[inside, 0].astype(np.int64), position[inside, 1].astype(np.int64)
    events["p"][:k], events["t"][:k] = polarity[inside], times[inside]
    events["x"][k:], events["y"][k:] = noise_x, noise_y
    events["p"][k:], events["t"][k:] = rng.integers(0, 2, n_noise), rng.integers(0, duration, n_noise)
    return events[np.argsort(events["t"], kind="stable")]


def synthetic_gestures(n: int, seed: int = 0, classes: int = len(GESTURES), **kwargs) -> tuple:
    """``n`` recordings, labels cycling through the first ``classes`` gestures: (a list of
    event arrays, int64 labels). The same seed gives the same recordings."""
    if not 2 <= classes <= len(GESTURES):
        raise ValueError(f"classes must be from 2 to {len(GESTURES)}, got {classes}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    return [synthetic_gesture(int(label), rng, **kwargs) for label in labels], labels.astype(np.int64)
