"""Text for the LLaMA experiments: corpora, a byte-level BPE tokenizer, memory-mapped token arrays and a
deterministic, resumable order of training windows.

A *source* string names a corpus:

- ``stdlib`` (the embedded default): the ``.py`` source of the running Python's standard library, split into
  train and validation by a hash of each file's relative path;
- a file, directory or glob (several joined by commas) of ``.txt``, ``.jsonl`` or ``.json`` files (JSON lines
  with a ``text`` field), optionally ``.gz`` / ``.xz`` compressed. Files named like C4 shards
  (``train-00000-of-00008.jsonl.xz``, ``c4-validation.00000-of-00008.json.gz``) go to the split they name;
  others are split by a hash of their name;
- ``c4`` (``allenai/c4``, ``en``, streamed with the ``datasets`` package, as the paper) or ``c4:GLOB`` (local
  shards in C4's format read through the same ``datasets`` streaming path).

Documents are tokenized once, joined with an end-of-text token, into ``train.bin`` / ``validation.bin`` under a
cache directory keyed by the source, the tokenizer and the token limits.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import itertools
import json
import lzma
import zlib
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from spamopt.extras import require

EOS = "<|endoftext|>"
SPLITS = ("train", "validation")
_SHARD_SPLIT = re.compile(r"(?:^|[-._])(train|validation|test)[-.]\d{5}-of-\d{5}")
_FORMAT_VERSION = 1  # bump when the cache layout or the tokenization changes


# ------------------------------------------------------------------------------------------- corpora


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.relative_to(root).parts]


def stdlib_bytes(max_bytes: int = 4 << 20) -> torch.Tensor:
    """Up to ``max_bytes`` of standard-library source, files in sorted order, as a uint8 tensor."""
    chunks, total = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def random_windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``length + 1`` consecutive tokens at random offsets (inputs and targets)."""
    starts = torch.randint(0, data.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()


def _hashed_split(name: str, validation_fraction: float) -> str:
    bucket = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10_000
    return "validation" if bucket < validation_fraction * 10_000 else "train"


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8", errors="replace")


def _read_documents(path: Path) -> Iterator[str]:
    """A text file's contents, or the ``text`` field of each line of a JSON-lines file (C4's shard format);
    damage raises ``ValueError`` naming the file (and the line)."""
    stem = re.sub(r"\.(gz|xz)$", "", path.name)
    try:
        with _open_text(path) as handle:
            if not stem.endswith((".jsonl", ".json")):
                yield handle.read()
                return
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield _text_field(path, number, line)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, UnicodeDecodeError) as error:
        raise ValueError(f"{path} could not be read as {_format_of(path.name)} ({type(error).__name__}: "
                         f"{error})") from None


def _text_field(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg}); expected one "
                         '{"text": ...} object per line, as in C4\'s shards') from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{path}, line {number}: no "text" string field (expected one {{"text": ...}} object '
                         "per line, as in C4's shards)")
    return record["text"]


def _format_of(name: str) -> str:
    compression = {".gz": "gzip-compressed ", ".xz": "xz-compressed "}.get(Path(name).suffix, "")
    return f"{compression}UTF-8 text"


class Corpus:
    """Documents of one source, by split."""

    def documents(self, split: str) -> Iterator[str]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the corpus's contents for the token cache."""
        raise NotImplementedError


class FileCorpus(Corpus):
    def __init__(self, files: list[Path], validation_fraction: float = 0.05) -> None:
        self.splits: dict[str, list[Path]] = {"train": [], "validation": []}
        unnamed = []
        for path in files:
            named = _SHARD_SPLIT.search(path.name)
            if named:
                if named.group(1) in self.splits:
                    self.splits[named.group(1)].append(path)
            else:
                unnamed.append(path)
        for path in unnamed:
            self.splits[_hashed_split(path.name, validation_fraction)].append(path)
        for split in SPLITS:
            movable = [p for p in unnamed if p in self.splits["train"]]
            if split == "validation" and not self.splits[split] and len(movable) > 1:
                # Guarantee a validation file: the unnamed train file whose name hashes lowest.
                moved = min(movable, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())
                self.splits["train"].remove(moved)
                self.splits["validation"].append(moved)
            if not self.splits[split]:
                raise ValueError(f"data source has no {split} files among {[str(f) for f in files]}; name them "
                                 f"like C4 shards ({split}-00000-of-00001.jsonl) or give more files")

    @classmethod
    def from_spec(cls, spec: str) -> FileCorpus:
        files: list[Path] = []
        for part in filter(None, (s.strip() for s in spec.split(","))):
            path = Path(part).expanduser()
            if path.is_dir():
                found = [p for p in sorted(path.rglob("*")) if p.is_file() and _is_text_file(p)]
            elif path.is_file():
                found = [path]
            else:
                found = [Path(p) for p in sorted(globlib.glob(str(path), recursive=True)) if _is_text_file(Path(p))]
            if not found:
                raise FileNotFoundError(f"data source {part!r} matches no .txt/.jsonl/.json(.gz/.xz) file")
            files.extend(found)
        return cls(sorted(set(files)))

    def documents(self, split: str) -> Iterator[str]:
        for path in self.splits[split]:
            yield from _read_documents(path)

    def fingerprint(self) -> dict[str, Any]:
        return {split: [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
                for split, paths in self.splits.items()}


def _is_text_file(path: Path) -> bool:
    return re.search(r"\.(txt|jsonl|json)(\.gz|\.xz)?$", path.name) is not None


class StdlibCorpus(FileCorpus):
    """The embedded default: the standard library's source, split by a hash of each relative path."""

    def __init__(self, validation_fraction: float = 0.05) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        self.splits = {"train": [], "validation": []}
        for path in stdlib_files():
            self.splits[_hashed_split(str(path.relative_to(root)), validation_fraction)].append(path)

    def fingerprint(self) -> dict[str, Any]:
        return {"stdlib": sys.version, **{s: [len(p), sum(f.stat().st_size for f in p)]
                                          for s, p in self.splits.items()}}


class C4Corpus(Corpus):
    """``allenai/c4`` (``en``) streamed by the ``datasets`` package; ``data_files`` reads local C4 shards."""

    def __init__(self, data_files: str | None = None) -> None:
        self.data_files = data_files

    def documents(self, split: str) -> Iterator[str]:
        if self.data_files is not None:  # local shards: read here, so that damage names the file and line
            yield from FileCorpus.from_spec(self.data_files).documents(split)
            return
        datasets = require("datasets", "c4")
        for record in datasets.load_dataset("allenai/c4", "en", split=split, streaming=True):
            yield record["text"]

    def fingerprint(self) -> dict[str, Any]:
        if self.data_files is None:
            return {"c4": "allenai/c4/en"}
        return {"c4": FileCorpus.from_spec(self.data_files).fingerprint()}


def open_corpus(source: str) -> Corpus:
    """The corpus a source string names (see the module docstring)."""
    if source == "stdlib":
        return StdlibCorpus()
    if source == "c4" or source.startswith("c4:"):
        return C4Corpus(source[3:] or None)
    return FileCorpus.from_spec(source)


# ---------------------------------------------------------------------------------------- tokenizer


def _limited(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for text in texts:
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style pre-tokenization) with ``EOS`` as its only special token."""
    tokenizers = require("tokenizers", "lm")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# ------------------------------------------------------------------------------------ token arrays


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"
    vocab_size: int = 8192
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    tokenizer_train_bytes: int = 64 << 20  # training text the BPE learns from
    max_train_tokens: int | None = None  # stop tokenizing there (required for the streamed ``c4``)
    max_validation_tokens: int | None = 2_000_000


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray
    validation: np.ndarray
    vocab_size: int
    tokenizer_path: Path


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _write_tokens(texts: Iterable[str], tokenizer: Any, out: Path, max_tokens: int | None) -> None:
    eos = tokenizer.token_to_id(EOS)
    dtype = _dtype_for(tokenizer.get_vocab_size())
    written = 0
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        batch: list[str] = []
        for text in itertools.chain(texts, [None]):  # lazily: a streamed corpus has no end
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) == 256):
                for encoding in tokenizer.encode_batch(batch):
                    ids = np.asarray([*encoding.ids, eos], dtype=dtype)
                    if max_tokens is not None:
                        ids = ids[: max_tokens - written]
                    handle.write(ids.tobytes())
                    written += len(ids)
                batch = []
                if max_tokens is not None and written >= max_tokens:
                    break
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)


def cache_key(config: DataConfig, corpus: Corpus) -> str:
    tokenizer_hash = None
    if config.tokenizer is not None:
        tokenizer_hash = hashlib.sha256(Path(config.tokenizer).read_bytes()).hexdigest()
    described = {"version": _FORMAT_VERSION, "corpus": corpus.fingerprint(), "tokenizer": tokenizer_hash,
                 **asdict(config)}
    described.pop("source")
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(config: DataConfig, cache_root: str | Path) -> TokenData:
    """Train or load the tokenizer and tokenize both splits once; later calls only map the cached arrays.

    Every file is written under a temporary name and renamed when complete, so an interrupted preparation is
    redone rather than half-used.
    """
    if config.source == "c4" and config.max_train_tokens is None:
        raise ValueError("source 'c4' streams an unbounded corpus: set max_train_tokens")
    tokenizers = require("tokenizers", "lm")
    corpus = open_corpus(config.source)
    cache = Path(cache_root) / cache_key(config, corpus)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer_path = cache / "tokenizer.json"
    if not tokenizer_path.exists():
        if config.tokenizer is not None:
            tokenizer = tokenizers.Tokenizer.from_file(config.tokenizer)
            if tokenizer.token_to_id(EOS) is None:
                tokenizer.add_special_tokens([EOS])
        else:
            tokenizer = train_tokenizer(_limited(corpus.documents("train"), config.tokenizer_train_bytes),
                                        config.vocab_size)
        tokenizer.save(str(tokenizer_path.with_suffix(".tmp")))
        os.replace(tokenizer_path.with_suffix(".tmp"), tokenizer_path)
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    vocab = tokenizer.get_vocab_size()
    limits = {"train": config.max_train_tokens, "validation": config.max_validation_tokens}
    arrays = {}
    for split in SPLITS:
        path = cache / f"{split}.bin"
        if not path.exists():
            _write_tokens(corpus.documents(split), tokenizer, path, limits[split])
        arrays[split] = np.memmap(path, dtype=_dtype_for(vocab), mode="r")
        if len(arrays[split]) < 2:
            raise ValueError(f"the {split} split of {config.source!r} has fewer than 2 tokens")
    return TokenData(arrays["train"], arrays["validation"], vocab, tokenizer_path)


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens, in a seeded order that is a pure function of the
    sample index: sample ``k`` is window ``perm_e[k mod n]`` of epoch ``e = k // n``, with ``perm_e`` a
    permutation drawn from ``(seed, e)``. A run resumes its data stream from one integer.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.count = (len(tokens) - 1) // seq_len
        if self.count < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one window of seq_len={seq_len} (+1)")
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def sample(self, k: int) -> np.ndarray:
        epoch, position = divmod(k, self.count)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self.window(int(self._perm[position]))

    def batch(self, first: int, size: int) -> torch.Tensor:
        """Samples ``first … first + size − 1`` as a ``[size, seq_len + 1]`` int64 tensor."""
        return torch.from_numpy(np.stack([self.sample(k) for k in range(first, first + size)]))
