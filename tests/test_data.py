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
