"""What every training recipe shares: checked configs, seeding, atomic checkpoints, metrics,
progress, ranks, Ctrl-C at a consistent point."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
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
    own fields and calls ``super().__post_init__()``, so every check of a combined config runs.

    ``FIXED``: inherited fields that a recipe allows only one value of (its default), which the
    command therefore does not offer as options."""

    FIXED: tuple = ()

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


TEMPORARY_SUFFIX = ".tmp"  # of the files write_atomic writes before renaming them


def write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: a crash or a power cut leaves the old file or the new one, never half of one. An
    interrupted write leaves at most a ``<name>*.tmp`` file, which :func:`remove_temporaries`
    clears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _sync_directory(path.parent)  # the rename itself reaches the disk


def _sync_directory(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a system whose folders cannot be opened (Windows): the rename stands alone
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def device_memory(device: torch.device) -> int:
    """Bytes of memory ``device`` has in all: a GPU's, or the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_model_fits(build, device: torch.device) -> None:
    """A ValueError, before anything is allocated, when the model ``build()`` makes cannot fit in
    ``device``'s memory with its gradients and AdamW's two moments (four copies of its
    parameters; activations come on top). The model is built on the meta device, which holds
    shapes and no data."""
    try:
        with torch.device("meta"):
            model = build()
    except RuntimeError as err:
        if "overflow" in str(err):  # sizes whose number of bytes does not fit in 64 bits
            raise ValueError(f"the model's sizes are too large to allocate ({err})") from None
        return  # a model that cannot be built on the meta device is checked as it is built
    parameters = sum(p.numel() for p in model.parameters())
    needed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    available = device_memory(device)
    if needed > available:
        raise ValueError(f"the model has {parameters:,} parameters: with their gradients and AdamW's "
                         f"state {needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB "
                         f"of memory of this {device.type}; choose smaller sizes")


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` through :func:`write_atomic`."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj, path: Path) -> None:
    """JSON (indented) through :func:`write_atomic`."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def remove_temporaries(folder: Path, names) -> list:
    """Delete what interrupted :func:`write_atomic` calls of the files ``names`` left in
    ``folder``; return the paths removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f"{glob.escape(name)}*{TEMPORARY_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
        """The records; a last line cut short by a crash in the middle of a write is dropped."""
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path} line {i + 1} is not JSON") from None
        return records

    def keep(self, predicate) -> None:
        """Keep only the records for which ``predicate(record)`` is true (a resumed run rewrites
        the others)."""
        text = "".join(json.dumps(r) + "\n" for r in self.read() if predicate(r))
        write_atomic(self.path, lambda f: f.write(text.encode()))

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
