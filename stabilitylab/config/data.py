"""Where a run's text comes from: `DataConfig` (the [data] table). stabilitylab.data reads it."""

from __future__ import annotations

from dataclasses import dataclass

from stabilitylab.config.base import ConfigError, check_choice, check_numbers, number

TOKENIZERS = ("char", "bytes", "bpe")
SHARD_DTYPES = ("auto", "uint16", "uint32")


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized and split, where it is cached."""

    source: str = "shakespeare"  # "shakespeare", a folder (or file) of UTF-8 *.txt, or "shards:PATH"
    tokenizer: str = "char"  # one of TOKENIZERS
    bpe_vocab_size: int = number(1024, "(256, inf)")  # target vocabulary of the "bpe" tokenizer
    seq_len: int = number(256, "(0, inf)")  # context length; both splits must hold seq_len + 1 tokens
    val_files: tuple[str, ...] = ()  # names (relative paths) held out; () = the rule
    val_fraction: float = number(0.1, "(0, 1)")  # target share of validation characters (folders)
    cache_dir: str = "data/cache"  # relative to the working directory
    shard_dtype: str = "auto"  # flat .bin shards: auto (the folder's meta.json, else uint16), uint16, uint32
    shard_column: str = "tokens"  # Parquet shards: the integer or list<integer> column of token ids

    def __post_init__(self) -> None:
        self.val_files = tuple(self.val_files)
        check_numbers(self)
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        check_choice("shard_dtype", self.shard_dtype, SHARD_DTYPES)
        if not self.source:
            raise ConfigError("source", "is empty", "Use 'shakespeare' or the path of a folder of .txt files")


__all__ = ["DataConfig", "TOKENIZERS", "SHARD_DTYPES"]
