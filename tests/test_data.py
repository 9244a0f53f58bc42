"""Corpora: token counts on the real files, checksums, clear errors."""

import shutil

import pytest

from egru import data
from conftest import data_dir

EXPECTED = {  # SPEC §6: tokens per split and vocabulary size
    "ptb": ((929_589, 73_760, 82_430), 10_000),
    "wikitext2": ((2_088_628, 217_646, 245_569), 33_278),
}


def needs_data():
    root = data_dir()
    if root is None:
        pytest.skip("EGRU_DATA_DIR is not set to a directory holding ptb/ and wikitext-2/")
    return root


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_token_counts_on_the_real_files(name):
    corpus = data.load_corpus(name, needs_data())
    counts, vocab = EXPECTED[name]
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == counts
    assert len(corpus.vocab) == vocab
    assert corpus.vocab[int(corpus.train[-1])] == "<eos>"
    assert int(corpus.test.max()) < vocab


def copy_ptb(tmp_path):
    folder = data.locate("ptb", needs_data())
    target = tmp_path / "ptb"
    shutil.copytree(folder, target)
    return target


def test_truncated_file_is_reported_not_used(tmp_path):
    target = copy_ptb(tmp_path)
    path = target / "ptb.valid.txt"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError, match="checksum mismatch for .*ptb.valid.txt"):
        data.load_corpus("ptb", tmp_path)


def test_files_are_found_directly_in_the_data_dir(tmp_path):
    target = copy_ptb(tmp_path)
    assert data.locate("ptb", target) == target


def test_missing_files_say_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("EGRU_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(data.DataError, match=r"ptb.train.txt, ptb.valid.txt, ptb.test.txt in .*'ptb/'"):
        data.load_corpus("ptb", tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_corpus("ptb", tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="unknown dataset 'penn'"):
        data.load_corpus("penn", tmp_path)


def test_download_verifies_what_it_fetched(tmp_path, monkeypatch):
    """Downloads go through a temporary file; a wrong checksum never takes the final name."""
    sources = copy_ptb(tmp_path / "src")
    urls = {f: (sources / f).as_uri() for f in data.CORPORA["ptb"].files.values()}
    spec = data.CorpusFiles("ptb", data.CORPORA["ptb"].files, data.CORPORA["ptb"].sha256, urls)
    monkeypatch.setitem(data.CORPORA, "ptb", spec)
    folder = data.download("ptb", tmp_path / "cache")
    data.verify(folder, spec)
    (sources / "ptb.test.txt").write_text("not the corpus\n")
    (folder / "ptb.test.txt").unlink()
    with pytest.raises(data.DataError, match="expected checksum"):
        data.download("ptb", tmp_path / "cache")
    assert not (folder / "ptb.test.txt").exists()


# --- spoken digits (FSDD) and WAV files ------------------------------------------------------

def write_wav(path, samples, rate=8000, channels=1):
    import wave

    import numpy as np

    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.repeat(np.asarray(samples, dtype="<i2"), channels).tobytes())


def test_read_wav_and_its_clear_errors(tmp_path):
    import numpy as np

    write_wav(tmp_path / "ok.wav", [0, 16384, -32768, 32767])
    assert data.read_wav(tmp_path / "ok.wav", 8000).tolist() == [0.0, 0.5, -1.0, 32767 / 32768]
    write_wav(tmp_path / "fast.wav", np.zeros(10), rate=16000)
    with pytest.raises(data.DataError, match="8000 Hz, got 16000 Hz"):
        data.read_wav(tmp_path / "fast.wav", 8000)
    write_wav(tmp_path / "stereo.wav", np.zeros(10), channels=2)
    with pytest.raises(data.DataError, match="mono 16-bit"):
        data.read_wav(tmp_path / "stereo.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file")
    with pytest.raises(data.DataError, match="junk.wav is not a readable WAV"):
        data.read_wav(tmp_path / "junk.wav")
    raw = (tmp_path / "ok.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[:-3])  # the header promises 4 samples
    with pytest.raises(data.DataError, match="cut.wav"):
        data.read_wav(tmp_path / "cut.wav")


def test_spectrogram_of_a_sinusoid():
    import numpy as np

    t = np.arange(1000)  # 7 whole windows of 128, the rest dropped
    x = 0.5 * np.sin(2 * np.pi * t * 5 / 128)
    s = data.spectrogram(x)
    assert s.shape == (7, 64)
    assert np.allclose(s[:, 4], 0.5, atol=1e-6)  # bin 5 (DC is left out)
    assert np.allclose(np.delete(s, 4, axis=1), 0, atol=1e-6)


def test_download_refuses_recordings_that_are_not_fsdds(tmp_path):
    import zipfile

    import numpy as np

    write_wav(tmp_path / "0_x_0.wav", np.zeros(100))
    archive = tmp_path / "fake.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(tmp_path / "0_x_0.wav", "repo-main/recordings/0_x_0.wav")
    with pytest.raises(data.DataError, match="not the expected ones"):
        data.download_fsdd(tmp_path / "cache", url=archive.as_uri())
    assert not (tmp_path / "cache" / "fsdd" / "recordings").exists()  # nothing took its final name


def needs_fsdd():
    root = data_dir()
    if root is None or not (root / "fsdd" / "SHA256SUMS").is_file():
        pytest.skip("EGRU_DATA_DIR is not set to a directory holding fsdd/ (recordings/ and SHA256SUMS)")
    return root


def test_fsdd_official_split_on_the_real_files():
    splits = data.load_fsdd(needs_fsdd())
    (train, train_labels), (test, test_labels) = splits["train"], splits["test"]
    assert (len(train), len(test)) == (2700, 300)
    assert train_labels.bincount().tolist() == [270] * 10 and test_labels.bincount().tolist() == [30] * 10
    assert all(clip.dtype.name == "float32" and abs(clip).max() <= 1 for clip in test)


def test_fsdd_download_from_an_archive_and_a_damaged_copy(tmp_path):
    """The download path on a local archive of the real recordings (as GitHub lays it out), then
    one recording changed by a byte is found."""
    import zipfile

    source = needs_fsdd() / "fsdd" / "recordings"
    archive = tmp_path / "fsdd.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(source.glob("*.wav")):
            z.write(path, f"free-spoken-digit-dataset-{data.FSDD_COMMIT}/recordings/{path.name}")
    folder = data.download_fsdd(tmp_path / "cache", url=archive.as_uri())
    assert data.locate_fsdd(tmp_path / "cache") == folder
    victim = folder / "recordings" / "3_theo_7.wav"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="differ from those SHA256SUMS lists"):
        data.locate_fsdd(tmp_path / "cache")


def test_speech_commands_layout(tmp_path):
    """A generated folder in the archive's layout: splits from the two lists, words sorted."""
    for word, names in (("yes", ["a_nohash_0", "b_nohash_0", "c_nohash_1"]), ("no", ["a_nohash_0"])):
        (tmp_path / word).mkdir()
        for name in names:
            write_wav(tmp_path / word / f"{name}.wav", [1, 2, 3], rate=16000)
    (tmp_path / "_background_noise_").mkdir()
    (tmp_path / "testing_list.txt").write_text("yes/b_nohash_0.wav\n")
    (tmp_path / "validation_list.txt").write_text("no/a_nohash_0.wav\n")
    splits = data.load_speech_commands(tmp_path)
    assert [splits[s][1].tolist() for s in ("train", "valid", "test")] == [[1, 1], [0], [1]]  # no=0, yes=1
    with pytest.raises(data.DataError, match="8000 Hz, got 16000 Hz"):
        data.load_speech_commands(tmp_path, rate=8000)
    (tmp_path / "testing_list.txt").unlink()
    with pytest.raises(data.DataError, match="testing_list.txt"):
        data.load_speech_commands(tmp_path)


def test_speech_commands_subset_on_the_real_files():
    root = data_dir()
    folder = None if root is None else root / "speech_commands" / "speech_commands_v0.01_subset"
    if folder is None or not folder.is_dir():
        pytest.skip("EGRU_DATA_DIR is not set to a directory holding speech_commands/")
    splits = data.load_speech_commands(folder)
    total = sum(len(splits[s][0]) for s in splits)
    assert total == 300 and int(splits["train"][1].max()) == 29  # 30 words of 10 clips
    assert all(len(clip) <= 16000 for clip in splits["test"][0])
