"""Pre-tokenized shards: a corpus too large to tokenize at every run, read in place.

    DataConfig(source="shards:/data/fineweb10B")          # in [data]: source = "shards:PATH"
    write_shards(["a.txt", "b.txt"], ByteTokenizer(), "out/", val=["b.txt"])

A shard folder holds the files of each split, named with "train" or "val" in their
name (taken in name order), in any of these formats:

- flat token files `*.bin`: the token ids one after another, no header, as nanoGPT's
  prepare.py writes them (np.uint16) and as `stabilitylab data shard` does (uint16, or
  uint32 when the vocabulary exceeds 65,536). The dtype comes from the folder's
  meta.json when it has one, else from DataConfig.shard_dtype ("auto" = uint16,
  nanoGPT's).
- llm.c / modded-nanogpt shards `*.bin`: a 256 × int32 header whose first entry is the
  magic 20240520, then header[2] tokens (version 1: uint16, version 2: uint32);
  recognised by the magic.
- Parquet `*.parquet` with an integer column or a list-of-integers column named
  DataConfig.shard_column (default "tokens"; one row per document, rows joined).

.bin shards are memory-mapped: a batch reads only its windows. Parquet pages are
compressed, so Parquet shards are decoded into memory once, when the corpus opens.

Windows never cross a shard boundary. The starts of a split are numbered 0..S-1 over
its shards in order (a shard of n tokens has n - seq_len of them), and get_batch draws
from that range exactly as it draws from one array: a single shard gives the same
batches as the same tokens in the prepare cache, and the (seed, step, rank) rule holds.

A folder written here also holds tokenizer.json (the tokenizer, JSON only) and
meta.json ({"dtype", "vocab_size", "tokens": {"train", "val"}, "files"}); a foreign
folder without them has no tokenizer, and its vocabulary is not checked against
model.vocab_size (an id beyond it fails in the embedding).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stabilitylab.config import ConfigError

PREFIX = "shards:"  # DataConfig.source = PREFIX + path
LLMC_MAGIC = 20240520  # first int32 of an llm.c / modded-nanogpt shard
LLMC_HEADER = 256  # int32 entries of that header
LLMC_DTYPES = {1: np.uint16, 2: np.uint32}  # header version → token dtype
SHARD_TOKENS = 100_000_000  # tokens per written shard (200 MB of uint16), as nanoGPT-style shards go
SEPARATOR = "\n\n"  # between documents, as data.prepare joins the files of a split


class TokenShards:
    """The token arrays of one split, indexed as one sequence of window starts."""

    def __init__(self, arrays: list[np.ndarray], names: list[str] | None = None):
        self.arrays = list(arrays)
        self.names = names or [f"shard {i}" for i in range(len(self.arrays))]
        self.lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.sum())

    def n_starts(self, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens start in the split (none crosses a shard)."""
        return int(np.maximum(self.lengths - seq_len, 0).sum())

    def windows(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """(len(starts), seq_len + 1) tokens of the windows numbered `starts`."""
        counts = np.maximum(self.lengths - seq_len, 0)
        ends = np.cumsum(counts)
        shard = np.searchsorted(ends, starts, side="right")
        offset = starts - (ends[shard] - counts[shard])
        out = np.empty((len(starts), seq_len + 1), dtype=np.int64)
        span = np.arange(seq_len + 1)
        for s in np.unique(shard):  # one gather per shard touched
            rows = shard == s
            out[rows] = np.asarray(self.arrays[s])[offset[rows][:, None] + span]
        return out


def is_shards(source: str) -> bool:
    return source.startswith(PREFIX)


def open_shards(source: str, dtype: str = "auto", column: str = "tokens") -> tuple[dict, Path | None, dict]:
    """({"train": TokenShards, "val": TokenShards}, the tokenizer.json or None, meta) of a shard folder."""
    root = Path(source.removeprefix(PREFIX)).expanduser()
    if not root.is_dir():
        raise ConfigError("source", f"{root} is not a folder of shards",
                          "Point source at the folder `stabilitylab data shard --out` wrote (shards:PATH)")
    meta_file = root / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if dtype == "auto":
        dtype = meta.get("dtype", "uint16")
    splits = {}
    for split in ("train", "val"):
        files = sorted(p for p in root.iterdir() if split in p.name and p.suffix in (".bin", ".parquet")
                       and not p.name.startswith("."))
        if not files:
            raise ConfigError("source", f"{root} holds no {split} shard (*{split}*.bin or *{split}*.parquet)",
                              f"Name the {split} split's files with '{split}' in them")
        arrays = [_read_parquet(p, column) if p.suffix == ".parquet" else _map_bin(p, dtype) for p in files]
        splits[split] = TokenShards(arrays, [p.name for p in files])
    tok_file = root / "tokenizer.json"
    meta = {"source": source, "dtype": dtype, **meta,
            "tokens": {s: len(t) for s, t in splits.items()},
            "shards": {s: t.names for s, t in splits.items()}}
    return splits, tok_file if tok_file.is_file() else None, meta


def _map_bin(path: Path, dtype: str) -> np.ndarray:
    """A memory map of a flat or llm.c token file."""
    size = path.stat().st_size
    if size >= 4 * LLMC_HEADER:
        header = np.fromfile(path, dtype=np.int32, count=LLMC_HEADER)
        if header[0] == LLMC_MAGIC:
            kind = np.dtype(LLMC_DTYPES.get(int(header[1]), np.uint16))
            n = int(header[2])
            if 4 * LLMC_HEADER + n * kind.itemsize > size:
                raise ConfigError("source", f"{path}: header says {n} tokens, the file holds fewer",
                                  "The shard is truncated; write it again")
            return np.memmap(path, dtype=kind, mode="r", offset=4 * LLMC_HEADER, shape=(n,))
    kind = np.dtype(dtype)
    if size % kind.itemsize:
        raise ConfigError("shard_dtype", f"{path} ({size} bytes) is not a whole number of {kind.name} tokens",
                          "Set data.shard_dtype to the dtype the shards were written with")
    return np.memmap(path, dtype=kind, mode="r") if size else np.zeros(0, kind)


def _read_parquet(path: Path, column: str) -> np.ndarray:
    """The token column of a Parquet file, flattened (rows are joined in order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[column], memory_map=True)
    except (KeyError, pa.ArrowInvalid) as err:
        raise ConfigError("shard_column", f"{path} has no column {column!r} ({err})",
                          "Set data.shard_column to the name of its token column") from None
    col = table.column(column).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = col.flatten()
    if not pa.types.is_integer(col.type):
        raise ConfigError("shard_column", f"{path}: column {column!r} is {col.type}, not token ids",
                          "Point data.shard_column at an integer or list<integer> column")
    return col.to_numpy(zero_copy_only=False)


# ---- writing ----------------------------------------------------------------------------

def write_shards(files: list[str | Path], tokenizer, out: str | Path, val: list[str | Path] = (),
                 shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize text files into shards under `out`; return the folder's meta.

    Validation is the files in `val`, or else the last of `files`. The files of a split
    are tokenized in the order given, with the tokens of "\\n\\n" between them, and cut
    into shards of `shard_tokens` tokens (train_000000.bin, ...). Each shard is written
    under a temporary name and renamed, so a killed run never leaves a short shard
    under a valid name; meta.json is written last.
    """
    files = [Path(f) for f in files]
    val = [Path(f) for f in val] or files[-1:]
    train = [f for f in files if f not in val]
    if not train:
        raise ConfigError("val", "holds every file; nothing is left to train on",
                          "Pass more FILES, or name the validation files with --val")
    out = Path(out)
    if out.is_dir() and any(out.glob("*.bin")):
        raise ConfigError("--out", f"{out} already holds shards", "Write into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    sep = np.asarray(tokenizer.encode(SEPARATOR), dtype)
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "tokens": {}, "shards": {},
            "files": {"train": [f.name for f in train], "val": [f.name for f in val]}}
    for split, paths in (("train", train), ("val", val)):
        writer = _ShardWriter(out, split, dtype, shard_tokens)
        for i, path in enumerate(paths):
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError("FILES", f"{path} is not UTF-8 (offset {err.start})",
                                  f"Convert it, e.g. iconv -f latin1 -t utf-8 '{path}' > out.txt") from None
            if i:
                writer.add(sep)
            writer.add(np.asarray(tokenizer.encode(text), dtype))
        meta["shards"][split] = writer.close()
        meta["tokens"][split] = writer.total
    tokenizer.save(out / "tokenizer.json")
    _atomic_write(out / "meta.json", json.dumps(meta, indent=1).encode())
    return meta


class _ShardWriter:
    """Appends tokens to <split>_NNNNNN.bin files of at most shard_tokens tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.names, self.total, self.f, self.n = [], 0, None, 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.f is None:
                self.name = f"{self.split}_{len(self.names):06d}.bin"
                self.f, self.n = open(self.out / f".{self.name}.tmp", "wb"), 0
            take = tokens[: self.limit - self.n]
            self.f.write(take.tobytes())
            self.n, self.total, tokens = self.n + len(take), self.total + len(take), tokens[len(take):]
            if self.n == self.limit:
                self._finish()

    def close(self) -> list[str]:
        if self.f is not None:
            self._finish()
        return self.names

    def _finish(self) -> None:
        self.f.close()
        os.replace(self.out / f".{self.name}.tmp", self.out / self.name)
        self.names.append(self.name)
        self.f = None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


__all__ = ["TokenShards", "open_shards", "write_shards", "is_shards", "PREFIX"]
