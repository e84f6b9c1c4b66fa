"""Token shards (stabilitylab/shards.py): written from text, read in place (nanoGPT and llm.c
.bin files, Parquet), with the batches of the prepare cache and the (seed, step, rank) rule."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stabilitylab.cli import main
from stabilitylab.config import ConfigError
from stabilitylab.data import ByteTokenizer, DataConfig, prepare
from stabilitylab.shards import LLMC_MAGIC, TokenShards, write_shards

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture
def texts(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    for name, k in (("a.txt", 30), ("b.txt", 20), ("c.txt", 10)):
        (root / name).write_text(f"{name}\n" + TEXT * k)
    return root


def shards(path, **kw) -> DataConfig:
    return DataConfig(source=f"shards:{path}", seq_len=16, **kw)


def test_shards_decode_to_the_files_of_each_split_joined(texts, tmp_path):
    meta = write_shards([texts / "a.txt", texts / "b.txt", texts / "c.txt"], ByteTokenizer(), tmp_path / "s",
                        shard_tokens=500)
    assert len(meta["shards"]["train"]) > 2  # cut into several shards
    corpus = prepare(shards(tmp_path / "s"))
    joined = {s: b"".join(np.asarray(a).astype(np.uint8).tobytes() for a in getattr(corpus, s).arrays)
              for s in ("train", "val")}
    assert joined["train"].decode() == (texts / "a.txt").read_text() + "\n\n" + (texts / "b.txt").read_text()
    assert joined["val"].decode() == (texts / "c.txt").read_text()  # the last file by default
    assert corpus.vocab_size == 256 and meta["tokens"]["train"] == len(joined["train"])


def test_one_shard_gives_the_batches_of_the_prepare_cache(texts, tmp_path):
    cache = prepare(DataConfig(source=str(texts), tokenizer="bytes", seq_len=16, val_files=["b.txt"],
                               cache_dir=str(tmp_path / "cache")))
    write_shards([texts / "a.txt", texts / "c.txt"], ByteTokenizer(), tmp_path / "s", val=[texts / "b.txt"])
    corpus = prepare(shards(tmp_path / "s"))
    for step in (1, 2, 17):
        for rank in (0, 1):
            a = cache.get_batch("train", step, 4, 16, seed=3, rank=rank, world_size=2)
            b = corpus.get_batch("train", step, 4, 16, seed=3, rank=rank, world_size=2)
            assert all((u == v).all() for u, v in zip(a, b))
    for (xa, ya), (xb, yb) in zip(cache.val_batches(2, 4, 16), corpus.val_batches(2, 4, 16)):
        assert (xa == xb).all() and (ya == yb).all()


@given(st.lists(st.integers(0, 40), min_size=1, max_size=5), st.integers(1, 8), st.integers(0, 99),
       st.sampled_from([1, 2, 4]))
def test_windows_stay_inside_one_shard_and_ranks_see_the_rows_of_one(lengths, seq_len, step, world):
    from stabilitylab.data import Corpus

    offsets = np.cumsum([0, *lengths])
    arrays = [np.arange(offsets[i], offsets[i + 1], dtype=np.uint32) for i in range(len(lengths))]
    data = TokenShards(arrays)
    if data.n_starts(seq_len) < 1:
        return
    corpus = Corpus(data, data, ByteTokenizer())
    x, y = corpus.get_batch("train", step, 4, seq_len, seed=0)
    window = np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
    assert (np.diff(window, axis=1) == 1).all()  # consecutive ids: no window crosses a shard
    shard_of = np.searchsorted(offsets, window, side="right")
    assert (shard_of == shard_of[:, :1]).all()
    parts = [corpus.get_batch("train", step, 4, seq_len, seed=0, rank=r, world_size=world)[0] for r in range(world)]
    assert (np.concatenate(parts) == x.numpy()).all()


def test_nanogpt_bin_files_are_read_as_uint16_and_uint32_when_told(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "n").mkdir()
    train, val = rng.integers(0, 50257, 400).astype(np.uint16), rng.integers(0, 50257, 100).astype(np.uint16)
    train.tofile(tmp_path / "n" / "train.bin")
    val.tofile(tmp_path / "n" / "val.bin")
    corpus = prepare(shards(tmp_path / "n"))
    assert corpus.tokenizer is None and corpus.vocab_size is None
    assert isinstance(corpus.train.arrays[0], np.memmap)  # read in place, not loaded
    assert (np.asarray(corpus.train.arrays[0]) == train).all() and corpus.meta["dtype"] == "uint16"
    (tmp_path / "w").mkdir()
    train.astype(np.uint32).tofile(tmp_path / "w" / "train.bin")
    val.astype(np.uint32).tofile(tmp_path / "w" / "val.bin")
    assert (np.asarray(prepare(shards(tmp_path / "w", shard_dtype="uint32")).val.arrays[0]) == val).all()


def test_llmc_shards_are_recognised_by_their_header(tmp_path):
    (tmp_path / "f").mkdir()
    for name, version, dtype in (("fineweb_train_000001.bin", 1, np.uint16), ("fineweb_val_000000.bin", 2, np.uint32)):
        header = np.zeros(256, np.int32)
        header[:3] = LLMC_MAGIC, version, 300
        tokens = np.arange(300, dtype=dtype)
        (tmp_path / "f" / name).write_bytes(header.tobytes() + tokens.tobytes() + b"\0" * 8)  # padding ignored
    corpus = prepare(shards(tmp_path / "f"))
    assert [len(a) for a in (corpus.train.arrays[0], corpus.val.arrays[0])] == [300, 300]
    assert (np.asarray(corpus.val.arrays[0]) == np.arange(300)).all()


def test_parquet_shards_join_their_rows(tmp_path):
    (tmp_path / "p").mkdir()
    docs = [[1, 2, 3] * 10, [4, 5] * 20]
    pq.write_table(pa.table({"tokens": pa.array(docs, pa.list_(pa.int32()))}), tmp_path / "p" / "train-0.parquet")
    pq.write_table(pa.table({"ids": pa.array(np.arange(50), pa.uint16())}), tmp_path / "p" / "val-0.parquet")
    with pytest.raises(ConfigError, match="shard_column: .*val-0.parquet has no column 'tokens'"):
        prepare(shards(tmp_path / "p"))
    (tmp_path / "p" / "val-0.parquet").unlink()
    pq.write_table(pa.table({"tokens": pa.array(np.arange(50), pa.uint16())}), tmp_path / "p" / "val-0.parquet")
    corpus = prepare(shards(tmp_path / "p"))
    assert np.asarray(corpus.train.arrays[0]).tolist() == docs[0] + docs[1]
    assert len(corpus.val) == 50


def test_shard_errors_name_the_field_and_fix(tmp_path, texts):
    with pytest.raises(ConfigError, match="source: .*nowhere is not a folder of shards"):
        prepare(shards(tmp_path / "nowhere"))
    (tmp_path / "t").mkdir()
    np.zeros(10, np.uint16).tofile(tmp_path / "t" / "train.bin")
    with pytest.raises(ConfigError, match="holds no val shard"):
        prepare(shards(tmp_path / "t"))
    np.zeros(11, np.uint8).tofile(tmp_path / "t" / "val.bin")
    with pytest.raises(ConfigError, match="shard_dtype: .*val.bin \\(11 bytes\\) is not a whole number of uint16"):
        prepare(shards(tmp_path / "t"))
    np.zeros(12, np.uint8).tofile(tmp_path / "t" / "val.bin")
    with pytest.raises(ConfigError, match=r"seq_len: the train split has 10 tokens, fewer than seq_len \+ 1 = 17"):
        prepare(shards(tmp_path / "t"))
    write_shards([texts / "a.txt", texts / "b.txt"], ByteTokenizer(), tmp_path / "s")
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards([texts / "a.txt", texts / "b.txt"], ByteTokenizer(), tmp_path / "s")


def test_cli_shards_text_and_trains_on_it(texts, tmp_path, capsys, corpus_cache):
    """`data shard` with a cache entry's tokenizer, then a tiny run with source = shards:DIR."""
    from stabilitylab.store import open_run

    tok = next(corpus_cache.glob("*/tokenizer.json"))  # the bytes tokenizer the training tests share
    out = tmp_path / "shards"
    assert main(["data", "shard", "--tokenizer", str(tok), "--out", str(out), "--shard-tokens", "1000",
                 str(texts / "a.txt"), str(texts / "b.txt")]) == 0
    printed = capsys.readouterr().out
    n = len((texts / "a.txt").read_bytes())  # 2,436 bytes: 3 shards of at most 1,000
    assert f"train {n:,} tokens in 3 shards (uint16) from 1 files" in printed and f'"shards:{out}"' in printed
    assert json.loads((out / "meta.json").read_text())["files"]["val"] == ["b.txt"]
    from pathlib import Path

    tiny = Path(__file__).resolve().parents[1] / "experiments" / "tiny.toml"
    assert main(["train", str(tiny), "--set", f"data.source=shards:{out}", "--set", "train.steps=2",
                 "--set", "train.eval_every=2", "--lab", str(tmp_path / "lab"), "--no-progress"]) == 0
    assert open_run("tiny", tmp_path / "lab").summary()["status"] == "finished"
