"""What every training recipe shares: checked configs, seeding, atomic checkpoints, metrics,
progress, ranks, Ctrl-C at a consistent point."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from egru.kernels.thread_modes import ThreadModes


class Checked:
    """The root of the recipes' config dataclasses: each class's ``__post_init__`` checks its
    own fields and calls ``super().__post_init__()``, so every check of a combined config runs."""

    def __post_init__(self):
        pass


def option(default, help: str, **metadata):
    """A config field and its meaning, which ``--help`` shows (metadata: ``choices``, ``type``)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def check(cfg, name: str, expected: str, valid) -> None:
    """A ValueError naming the field, what it must be and what it is, unless ``valid(value)``."""
    value = getattr(cfg, name)
    if not valid(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator a run draws from, the GPUs' included (dropout on a GPU draws
    from the GPU's generator: without it a resumed run would draw other masks)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under ``torchrun``) when CUDA is available, else the
    CPU. ``CUDA_VISIBLE_DEVICES=`` (empty) trains on the CPU of a machine with GPUs."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"this is process {local_rank} on its node but only {count} GPU(s) are visible: start "
            f"torchrun with --nproc_per_node={count} or fewer, or set CUDA_VISIBLE_DEVICES= (empty) "
            "to train on the CPU")
    return torch.device("cuda", local_rank)


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class DeferredInterrupt:
    """Within ``with DeferredInterrupt() as interrupt:`` a first Ctrl-C (SIGINT) only sets
    ``interrupt.requested``, for the training loop to stop at its next consistent point (a
    KeyboardInterrupt could land anywhere, say between an optimizer step and the position that
    says it was taken); a second Ctrl-C raises KeyboardInterrupt at once. Signals reach only the
    main thread, so elsewhere, or where SIGINT is ignored, this changes nothing."""

    MESSAGE = b"\nstopping at the next step boundary (Ctrl-C again aborts without saving)\n"

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):  # None: a handler not set from Python
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if is_main_process():
            os.write(2, self.MESSAGE)  # not print(): the handler may interrupt a print to stderr


class MeasuredTorchThreads:
    """Runs each step of a loop with all of torch's intra-op threads or with one, whichever is
    measured to be faster now (:class:`egru.kernels.thread_modes.ThreadModes`).

    Small operations (a batch-1 evaluation's) synchronise torch's threads many times per step;
    with another process on the cores that made evaluation several times slower than on one
    thread, while on idle cores the threads win. ``with threads.step(key, units): ...``.
    """

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.modes = ThreadModes()

    @contextlib.contextmanager
    def step(self, key, units: int):
        with self.modes.timed(key, units, self.threads > 1) as parallel:
            torch.set_num_threads(self.threads if parallel else 1)
            try:
                yield
            finally:
                torch.set_num_threads(self.threads)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar on the main process when tqdm is installed and ``enabled``; else None."""
    if not enabled or not is_main_process():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) and, when installed, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                pass

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in _scalars(record.get("split", "train"), record):
                self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()

    def read(self) -> list:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def keep(self, predicate) -> None:
        """Keep only the records for which ``predicate(record)`` is true (a resumed run rewrites
        the others)."""
        text = "".join(json.dumps(r) + "\n" for r in self.read() if predicate(r))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)  # an interrupted rewrite leaves the old records, not half of them

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(prefix: str, record: dict):
    """(tag, number) for every number of a record, nested ones too: ``valid/layers/layer0/activity``."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _scalars(f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield f"{prefix}/{key}", value
