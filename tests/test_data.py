"""The corpus: tokenizers, the split, the cache and the batches (stabilitylab/data.py)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stabilitylab.cli import main
from stabilitylab.config import ConfigError, from_dict
from stabilitylab.data import (SEPARATOR, SHAKESPEARE_VAL, BPETokenizer, ByteTokenizer, CharTokenizer, Corpus,
                               DataConfig, _split_texts, load_tokenizer, prepare)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def folder(tmp_path, files: dict[str, str | bytes], name="corpus"):
    root = tmp_path / name
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    root.mkdir(exist_ok=True)
    return root


def cfg(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), seq_len=8, **kw)


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TEXT, "héllo wörld, 日本語 🎉\n"], vocab_size=300)


# ---- tokenizers --------------------------------------------------------------------------

@given(st.text(alphabet="\n !',-.:;?ABCabcz"))
def test_char_tokenizer_round_trips_text_in_its_alphabet(s):
    tok = CharTokenizer("\n !',-.:;?ABCabcz")
    assert tok.decode(tok.encode(s)) == s
    assert all(0 <= i < tok.vocab_size for i in tok.encode(s))


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(s):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(s)) == s
    assert all(0 <= i < 256 for i in tok.encode(s))


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bpe_tokenizer_round_trips_any_text(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s
    assert all(0 <= i < bpe.vocab_size for i in bpe.encode(s))


def test_bpe_compresses_the_text_it_was_trained_on(bpe):
    assert len(bpe.encode(TEXT)) < len(TEXT.encode()) / 2


def test_char_tokenizer_names_a_character_outside_its_alphabet():
    with pytest.raises(ValueError, match="'Z'"):
        CharTokenizer("abc").encode("abZ")


def test_byte_tokenizer_decodes_invalid_utf8_without_raising():
    assert ByteTokenizer().decode([0x61, 0xFF, 0x62]) == "a\ufffdb"


@pytest.mark.parametrize("make", [lambda b: CharTokenizer("".join(sorted(set(TEXT)))), lambda b: ByteTokenizer(),
                                  lambda b: b], ids=["char", "bytes", "bpe"])
def test_a_saved_tokenizer_loads_back_the_same(tmp_path, bpe, make):
    tok = make(bpe)
    tok.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    assert back.encode(TEXT) == tok.encode(TEXT)
    assert back.decode(torch.tensor(tok.encode(TEXT))) == TEXT


# ---- the split ---------------------------------------------------------------------------

@given(st.dictionaries(st.text("abc/", min_size=1, max_size=6), st.text("xy\n", max_size=40), min_size=1, max_size=8),
       st.floats(0.05, 0.5))
def test_folder_split_puts_each_file_on_one_side_within_the_budget(texts, fraction):
    texts = dict(sorted(texts.items()))
    if not "".join(texts.values()):
        return
    try:
        train, val, split = _split_texts(texts, DataConfig(source="somewhere", val_fraction=fraction))
    except ConfigError as err:  # only when a split would be empty
        assert "empty" in str(err) or "nothing is left" in str(err)
        return
    total = sum(map(len, texts.values()))
    if "val_files" in split:
        held = split["val_files"]
        assert sum(len(texts[n]) for n in held) <= fraction * total
        assert sorted(train + val) == sorted(texts.values())
        assert val == [texts[n] for n in texts if n in held]
    else:  # tail: no non-empty file fits the budget
        assert all(len(t) == 0 or len(t) > fraction * total for t in texts.values())
        assert train[0] + val[0] == SEPARATOR.join(texts.values())


def test_a_single_file_splits_by_its_tail(tmp_path):
    root = folder(tmp_path, {"only.txt": TEXT})
    corpus = prepare(cfg(tmp_path, root, tokenizer="bytes", val_fraction=0.25))
    cut = round(len(TEXT) * 0.75)
    assert corpus.meta["split"] == {"tail_fraction": 0.25}
    assert corpus.tokenizer.decode(corpus.train) == TEXT[:cut]
    assert corpus.tokenizer.decode(corpus.val) == TEXT[cut:]


def test_a_file_path_is_a_one_file_corpus(tmp_path):
    root = folder(tmp_path, {"only.txt": TEXT, "other.txt": TEXT.upper()})
    corpus = prepare(cfg(tmp_path, root / "only.txt"))
    assert corpus.meta["files"] == ["only.txt"]


@pytest.mark.parametrize("tokenizer", ["char", "bytes", "bpe"])
def test_token_files_decode_to_the_files_of_each_split_joined(tmp_path, tokenizer):
    files = {f"act{i}.txt": TEXT[i * 50:] for i in range(10)} | {"sub/epilogue.txt": "Exeunt.\n", ".git/x.txt": "no"}
    corpus = prepare(cfg(tmp_path, folder(tmp_path, files), tokenizer=tokenizer, bpe_vocab_size=300))
    held = corpus.meta["split"]["val_files"]
    assert held and "sub/epilogue.txt" in corpus.meta["files"] and ".git/x.txt" not in corpus.meta["files"]
    for split, names in (("train", [n for n in sorted(files) if n not in held and n[0] != "."]), ("val", held)):
        tokens = getattr(corpus, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.dtype(corpus.meta["dtype"])
        assert corpus.tokenizer.decode(tokens) == SEPARATOR.join(files[n] for n in names)


def test_val_files_override_the_rule(tmp_path):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT, "c.txt": TEXT})
    corpus = prepare(cfg(tmp_path, root, val_files=["b.txt"]))
    assert corpus.meta["split"] == {"val_files": ["b.txt"]}
    with pytest.raises(ConfigError, match="val_files.*'d.txt'"):
        prepare(cfg(tmp_path, root, val_files=["d.txt"]))
    with pytest.raises(ConfigError, match="nothing is left to train on"):
        prepare(cfg(tmp_path, root, val_files=["a.txt", "b.txt", "c.txt"]))


# ---- the cache ---------------------------------------------------------------------------

def test_the_cache_is_reused_until_a_file_or_the_tokenizer_changes(tmp_path):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT * 12})
    first = prepare(cfg(tmp_path, root))
    assert first.rebuilt
    again = prepare(cfg(tmp_path, root))
    assert not again.rebuilt and again.path == first.path
    os.utime(root / "a.txt", (1, 1))  # a new mtime, the same bytes: still valid
    assert not prepare(cfg(tmp_path, root)).rebuilt
    other = prepare(cfg(tmp_path, root, tokenizer="bytes"))
    assert other.rebuilt and other.path != first.path
    (root / "a.txt").write_text(TEXT + "Exit.\n")
    edited = prepare(cfg(tmp_path, root))
    assert edited.rebuilt and edited.path not in (first.path, other.path)
    assert edited.tokenizer.decode(edited.val) == TEXT + "Exit.\n"


def test_a_prepare_that_fails_midway_leaves_no_entry(tmp_path, monkeypatch):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT * 12})

    def crash(self, path):
        raise RuntimeError("killed")

    monkeypatch.setattr(CharTokenizer, "save", crash)
    with pytest.raises(RuntimeError):
        prepare(cfg(tmp_path, root))
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert prepare(cfg(tmp_path, root)).rebuilt


KILL_BEFORE_PUBLISH = """
import os, signal, sys
from stabilitylab.data import DataConfig, prepare
os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
prepare(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], seq_len=8))
"""


def test_a_killed_prepare_never_leaves_an_entry_that_looks_valid(tmp_path):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT * 12})
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_PUBLISH, str(root), str(tmp_path / "cache")])
    assert proc.returncode == -9
    leftovers = list((tmp_path / "cache").iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # all written, none published
    corpus = prepare(cfg(tmp_path, root))
    assert corpus.rebuilt and corpus.tokenizer.decode(corpus.train) + corpus.tokenizer.decode(corpus.val)


def test_a_damaged_entry_is_reported_not_used(tmp_path):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT * 12})
    path = prepare(cfg(tmp_path, root)).path
    with open(path / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ConfigError, match=re.escape(str(path / "train.bin")) + ".*Delete"):
        prepare(cfg(tmp_path, root))


def test_an_unwritable_cache_dir_is_named_and_left_alone(tmp_path):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT * 12})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("keep me")
    message = re.escape(f"cache_dir: cannot write to {blocker / 'cache'}") + ".*--cache-dir"
    with pytest.raises(ConfigError, match=message):
        prepare(DataConfig(source=str(root), cache_dir=str(blocker / "cache"), seq_len=8))
    assert blocker.read_text() == "keep me"


# ---- bad sources ---------------------------------------------------------------------------

def test_a_missing_folder_is_named_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"source: {tmp_path / 'nope'} does not exist") + ".*'shakespeare'"):
        prepare(cfg(tmp_path, tmp_path / "nope"))


def test_a_folder_without_text_is_named(tmp_path):
    root = folder(tmp_path, {"notes.md": "# not text"})
    with pytest.raises(ConfigError, match=re.escape(f"{root} holds no .txt files")):
        prepare(cfg(tmp_path, root))
    (root / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="all empty"):
        prepare(cfg(tmp_path, root))


def test_a_file_that_is_not_utf8_is_named_with_its_offset(tmp_path):
    root = folder(tmp_path, {"a.txt": TEXT, "latin1.txt": "Caf\u00e9".encode("latin-1")})
    with pytest.raises(ConfigError, match=r"latin1.txt is not UTF-8 \(byte 0xe9 at offset 3\).*iconv"):
        prepare(cfg(tmp_path, root))


def test_a_validation_split_shorter_than_a_window_is_an_error(tmp_path):
    root = folder(tmp_path, {"big.txt": TEXT * 5, "tiny.txt": "Exit."})
    with pytest.raises(ConfigError, match=r"seq_len: the val split has \d+ tokens, fewer than seq_len \+ 1 = 257"):
        prepare(DataConfig(source=str(root), cache_dir=str(tmp_path / "cache"), val_files=["tiny.txt"]))
    with pytest.raises(ConfigError, match="validation split .* empty"):
        prepare(cfg(tmp_path, folder(tmp_path, {"x.txt": "abc"}, name="tiny")))


def test_data_config_errors_name_the_file_and_field():
    with pytest.raises(ConfigError, match=r"run.toml: data.tokenizer: 'byte' is not allowed. did you mean 'bytes'"):
        from_dict(DataConfig, {"tokenizer": "byte"}, source="run.toml", section="data")
    with pytest.raises(ConfigError, match=r"run.toml: data.bpe_vocab_size: must be > 256"):
        from_dict(DataConfig, {"tokenizer": "bpe", "bpe_vocab_size": 200}, source="run.toml", section="data")
    assert from_dict(DataConfig, {"val_files": ["a.txt"]}).val_files == ("a.txt",)


# ---- batches -----------------------------------------------------------------------------

def counting(n=10_000) -> Corpus:
    """Token i is i, so every window says where it came from."""
    return Corpus(np.arange(n, dtype=np.uint32), np.arange(n, 2 * n, dtype=np.uint32), ByteTokenizer())


@given(st.integers(0, 2**32), st.integers(0, 10**6), st.sampled_from([1, 2, 4]), st.integers(1, 64))
def test_ranks_together_see_exactly_the_rows_of_one_process(seed, step, world, seq_len):
    corpus = counting()
    x1, y1 = corpus.get_batch("train", step, 8, seq_len, seed)
    shards = [corpus.get_batch("train", step, 8, seq_len, seed, rank=r, world_size=world) for r in range(world)]
    assert torch.equal(torch.cat([x for x, _ in shards]), x1) and torch.equal(torch.cat([y for _, y in shards]), y1)
    assert x1.shape == y1.shape == (8, seq_len) and x1.dtype == y1.dtype == torch.int64
    assert torch.equal(x1, x1[:, :1] + torch.arange(seq_len)) and torch.equal(y1, x1 + 1)  # contiguous windows
    assert x1.min() >= 0 and y1.max() < 10_000


def test_batches_depend_on_seed_and_step_only():
    corpus = counting()
    np.random.seed(1)
    torch.manual_seed(1)
    a = corpus.get_batch("train", 7, 16, 32, seed=3)
    state = torch.get_rng_state()
    np.random.seed(2)
    torch.manual_seed(2)
    b = corpus.get_batch("train", 7, 16, 32, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], corpus.get_batch("train", 8, 16, 32, seed=3)[0])
    assert not torch.equal(a[0], corpus.get_batch("train", 7, 16, 32, seed=4)[0])
    np.random.seed(1)
    torch.manual_seed(1)
    corpus.get_batch("train", 7, 16, 32, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never drawn from


def test_a_batch_that_does_not_split_over_the_ranks_is_an_error():
    with pytest.raises(ConfigError, match="global batch 6 does not split over 4 ranks"):
        counting().get_batch("train", 0, 6, 8, 0, rank=0, world_size=4)


def test_validation_batches_are_fixed_windows_of_the_validation_split():
    corpus = counting()
    first = corpus.val_batches(3, 4, 16)
    again = corpus.val_batches(3, 4, 16)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first])
    assert starts.min() == 10_000 and starts.max() == 20_000 - 17  # spread over the whole split
    shards = [corpus.val_batches(3, 4, 16, rank=r, world_size=2)[1][0] for r in range(2)]
    assert torch.equal(torch.cat(shards), first[1][0])


# ---- the shipped corpus and the command line ---------------------------------------------------

def test_shakespeare_prepares_with_the_fixed_validation_plays(tmp_path):
    corpus = prepare(DataConfig(cache_dir=str(tmp_path)))
    meta = corpus.meta
    assert len(meta["files"]) == 42 and meta["split"]["val_files"] == sorted(SHAKESPEARE_VAL)
    assert 0.09 < meta["chars"]["val"] / (meta["chars"]["train"] + meta["chars"]["val"]) < 0.12
    assert corpus.tokenizer.vocab_size == meta["vocab_size"] == 84 and corpus.train.dtype == np.uint8
    val_text = corpus.tokenizer.decode(corpus.val)
    assert "Macbeth" in val_text and "Gutenberg" not in val_text + corpus.tokenizer.decode(corpus.train)
    x, y = corpus.get_batch("val", 0, 4, 64, seed=0)
    assert corpus.tokenizer.decode(x[0]) in val_text


def test_cli_prepares_then_reuses(tmp_path, capsys):
    root = folder(tmp_path, {"a.txt": TEXT, "b.txt": TEXT * 12})
    argv = ["data", "prepare", "--source", str(root), "--tokenizer", "bytes", "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "2 files (1 held out: a.txt)" in first and "vocab 256" in first and "rebuilt" in first
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["data", "prepare", "--source", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_bpe_on_shakespeare_round_trips_the_validation_plays(tmp_path):
    corpus = prepare(DataConfig(tokenizer="bpe", bpe_vocab_size=1024, cache_dir=str(tmp_path)))
    assert corpus.tokenizer.vocab_size == 1024 and corpus.train.dtype == np.uint16
    assert len(corpus.train) < corpus.meta["chars"]["train"] / 2
    text = corpus.tokenizer.decode(corpus.val)
    assert text.startswith("MACBETH") and len(text) == corpus.meta["chars"]["val"] + 2 * (len(SHAKESPEARE_VAL) - 1)
