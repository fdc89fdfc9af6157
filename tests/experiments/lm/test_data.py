"""The data pipeline: corpus splits (C4 shard names, hashed names, the stdlib), compressed and JSON-lines
reading, the BPE tokenizer and its cache, memory-mapped tokens, and the resumable window order."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from spamopt.experiments.lm import data as lm_data
from spamopt.experiments.lm.data import (EOS, DataConfig, FileCorpus, StdlibCorpus, TokenWindows, open_corpus,
                                         prepare)

from .helpers import stdlib_documents

SHARED_GUTENBERG = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gutenberg"


def _jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts)


def test_shard_names_choose_the_split_and_compression_is_transparent(tmp_path):
    """Files named like C4 shards go to the split they name, whatever their compression; other names are
    split by hash; a glob and a comma-separated list name the same files as the directory."""
    (tmp_path / "train-00000-of-00002.jsonl.gz").write_bytes(gzip.compress(_jsonl(["a", "b"]).encode()))
    (tmp_path / "train-00001-of-00002.jsonl.xz").write_bytes(lzma.compress(_jsonl(["c"]).encode()))
    (tmp_path / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(_jsonl(["v"]).encode()))
    (tmp_path / "notes.md").write_text("not a corpus file")
    corpus = open_corpus(str(tmp_path))
    assert list(corpus.documents("train")) == ["a", "b", "c"]
    assert list(corpus.documents("validation")) == ["v"]
    by_glob = open_corpus(str(tmp_path / "*.gz") + "," + str(tmp_path / "*.xz"))
    assert list(by_glob.documents("train")) == ["a", "b", "c"]


def test_unnamed_text_files_are_split_by_name_hash_deterministically(tmp_path):
    for i in range(40):
        (tmp_path / f"book{i}.txt").write_text(f"text of book {i}")
    first, second = FileCorpus.from_spec(str(tmp_path)), FileCorpus.from_spec(str(tmp_path))
    assert first.splits == second.splits
    assert first.splits["validation"] and first.splits["train"]
    assert not set(first.splits["train"]) & set(first.splits["validation"])
    with pytest.raises(ValueError, match="no (train|validation) files"):
        open_corpus(str(tmp_path / "book3.txt"))  # one unnamed file cannot be split


def test_a_source_without_files_or_validation_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no"):
        open_corpus(str(tmp_path / "missing*.jsonl"))
    (tmp_path / "train-00000-of-00001.jsonl").write_text(_jsonl(["only train"]))
    with pytest.raises(ValueError, match="no validation files"):
        open_corpus(str(tmp_path))


def test_stdlib_split_is_by_file_disjoint_and_stable():
    first, second = StdlibCorpus(), StdlibCorpus()
    assert first.splits == second.splits
    train, validation = set(first.splits["train"]), set(first.splits["validation"])
    assert not train & validation
    assert 0.01 < len(validation) / (len(train) + len(validation)) < 0.1


@pytest.mark.skipif(not SHARED_GUTENBERG.is_dir(), reason="../shared/data is absent")
def test_reads_the_shared_gutenberg_shards():
    corpus = open_corpus(str(SHARED_GUTENBERG))
    assert len(corpus.splits["train"]) == 8 and len(corpus.splits["validation"]) == 1
    book = next(corpus.documents("validation"))
    assert len(book) > 10_000


def test_prepare_tokenizes_once_into_memmaps_that_decode_to_the_documents(corpus_dir, token_cache, monkeypatch):
    """Train split = documents joined by EOS, in file order; a second prepare reuses the cache (training
    the tokenizer again would raise); a given tokenizer.json is used as is."""
    config = DataConfig(source=str(corpus_dir), vocab_size=512)
    first = prepare(config, token_cache)
    assert isinstance(first.train, np.memmap) and first.train.dtype == np.uint16
    assert first.vocab_size == 512
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(first.tokenizer_path))
    eos = tokenizer.token_to_id(EOS)
    documents = stdlib_documents()
    assert int((first.train == eos).sum()) == 10 and int((first.validation == eos).sum()) == 2
    first_doc = first.train[: int(np.argmax(first.train == eos))]
    assert tokenizer.decode(first_doc.tolist()) == documents[0]

    monkeypatch.setattr(lm_data, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    again = prepare(config, token_cache)
    np.testing.assert_array_equal(again.train, first.train)

    given = prepare(DataConfig(source=str(corpus_dir), tokenizer=str(first.tokenizer_path)), token_cache)
    np.testing.assert_array_equal(given.train, first.train)


def test_token_limits_and_interrupted_writes(corpus_dir, token_cache):
    limited = prepare(DataConfig(source=str(corpus_dir), vocab_size=512, max_train_tokens=1000), token_cache)
    assert len(limited.train) == 1000
    cache = limited.tokenizer_path.parent
    (cache / "train.bin").unlink()
    (cache / "train.tmp").write_bytes(b"half written")  # a crash mid-write leaves only the temporary
    redone = prepare(DataConfig(source=str(corpus_dir), vocab_size=512, max_train_tokens=1000), token_cache)
    np.testing.assert_array_equal(redone.train, limited.train)


def test_c4_streams_through_datasets_from_local_shards(tmp_path, token_cache, monkeypatch):
    """The paper's C4 path read from local shards in C4's naming and format (the remote corpus streams
    through ``datasets``, and demands a token budget before anything is fetched)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = lambda texts: "".join(json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z",  # noqa: E731
                                              "url": "https://example.org"}) + "\n" for t in texts)
    docs = stdlib_documents()
    (tmp_path / "c4-train.00000-of-00002.json.gz").write_bytes(gzip.compress(rows(docs[:3]).encode()))
    (tmp_path / "c4-train.00001-of-00002.json.gz").write_bytes(gzip.compress(rows(docs[3:6]).encode()))
    (tmp_path / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(rows(docs[6:8]).encode()))
    corpus = open_corpus(f"c4:{tmp_path}")
    assert list(corpus.documents("train")) == docs[:6]
    assert list(corpus.documents("validation")) == docs[6:8]
    tokens = prepare(DataConfig(source=f"c4:{tmp_path}", vocab_size=400, max_train_tokens=5000), token_cache)
    assert len(tokens.train) == 5000
    with pytest.raises(ValueError, match="max_train_tokens"):
        prepare(DataConfig(source="c4"), token_cache)


def test_window_order_is_a_resumable_permutation_per_epoch():
    tokens = np.arange(1001, dtype=np.uint16)
    windows = TokenWindows(tokens, seq_len=10, seed=3)
    assert windows.count == 100
    epoch0 = [int(windows.sample(k)[0]) // 10 for k in range(100)]
    assert sorted(epoch0) == list(range(100)) and epoch0 != list(range(100))
    epoch1 = [int(windows.sample(k)[0]) // 10 for k in range(100, 200)]
    assert sorted(epoch1) == list(range(100)) and epoch1 != epoch0
    fresh = TokenWindows(tokens, seq_len=10, seed=3)  # a resumed run starts mid-stream
    np.testing.assert_array_equal(fresh.batch(150, 4).numpy(), windows.batch(150, 4).numpy())
    assert windows.batch(0, 2).shape == (2, 11)
    np.testing.assert_array_equal(windows.sample(0)[1:], windows.sample(0)[:-1] + 1)  # consecutive tokens
    other = TokenWindows(tokens, seq_len=10, seed=4)
    assert [int(other.sample(k)[0]) for k in range(100)] != [int(windows.sample(k)[0]) for k in range(100)]


def test_an_endless_stream_is_read_only_up_to_the_token_budget(tmp_path, monkeypatch):
    """Tokenizing a streamed corpus (C4 has no practical end) consumes documents lazily and stops at
    max_train_tokens."""
    from itertools import count

    consumed = []

    def endless(split):
        for i in count():
            consumed.append(i)
            if i > 20_000:
                raise AssertionError("the stream was read far past the token budget")
            yield f"document {i} " * 20

    tokenizer = lm_data.train_tokenizer([f"document {i} " * 20 for i in range(50)], vocab_size=300)
    lm_data._write_tokens(endless("train"), tokenizer, tmp_path / "train.bin", max_tokens=10_000)
    assert (tmp_path / "train.bin").stat().st_size == 2 * 10_000
    assert len(consumed) < 2_000


@pytest.mark.parametrize("name,content,message", [
    ("train-00000-of-00001.jsonl", b"\x00\x9f\x92\x96 binary", r"line 1: not a JSON record"),
    ("train-00000-of-00001.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r"line 2: no \"text\" string field"),
    ("train-00000-of-00001.jsonl.gz", b"not gzip at all", r"could not be read as gzip-compressed UTF-8 text"),
    ("train-00000-of-00001.jsonl.gz", gzip.compress(b"\xff\xfe\x00 not utf-8"), r"could not be read as gzip"),
    ("train-00000-of-00001.jsonl.xz", b"not xz", r"could not be read as xz-compressed UTF-8 text"),
])
def test_damaged_shards_are_named_with_the_line(tmp_path, name, content, message):
    """A binary, malformed or corrupt-compressed shard raises ValueError naming the file (and the line),
    instead of a bare JSONDecodeError, KeyError or BadGzipFile; also on the ``c4:`` path."""
    (tmp_path / name).write_bytes(content)
    (tmp_path / "validation-00000-of-00001.jsonl").write_text(_jsonl(["v"]))
    for source in (str(tmp_path), f"c4:{tmp_path}"):
        with pytest.raises(ValueError, match=rf"{name}.*{message}"):
            list(open_corpus(source).documents("train"))
