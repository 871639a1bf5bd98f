"""llm.c token shards, read in place as already tokenized data, and written for llm.c.

The layout (llm.c's dev/data/data_common.py and llmc/dataloader.h): a header of 256 little-endian
int32, header[0] = 20240520 (the magic), header[1] = the version (1: the tokens are uint16, 2: uint32),
header[2] = the number of tokens; then the tokens. Shards are named like `fineweb_val_000000.bin`,
`fineweb_train_000001.bin`: a shard whose name says `val` (`_val_` or `_val.bin`) is validation, any
other is training. With no val shard, the last `data.val_fraction` of the training tokens is val, as
the last fraction of the bytes is for text.

A source of shards is used as it is: each header is checked (magic, version, token count against the
file size), the tokens must be GPT-2's (every id below 50,257, checked once and remembered while the
file's size and time stay the same), and a split is a `TokenStream` over memory maps of its shards, so
no token is copied. llm.c puts <|endoftext|> before each document, so shards read as one stream.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_jax.corpora import DataError

MAGIC = 20240520
HEADER_BYTES = 256 * 4
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
SHARD_TOKENS = 100_000_000  # per written shard, as llm.c's fineweb.py writes them
_VAL = re.compile(r"(^|_)val(_|\.bin$)")


@dataclass(frozen=True)
class Shard:
    path: Path
    version: int
    tokens: int

    def open(self) -> np.ndarray:
        return np.memmap(self.path, DTYPES[self.version], mode="r", offset=HEADER_BYTES, shape=(self.tokens,))


def is_shard_source(files: list[Path]) -> bool:
    """True when every file is a .bin shard; a DataError when shards and other files are mixed."""
    bins = [f for f in files if f.suffix == ".bin"]
    if bins and len(bins) < len(files):
        other = next(f for f in files if f.suffix != ".bin")
        raise DataError(f"data.source mixes llm.c token shards ({bins[0]}) with other files ({other}); give "
                        "shards alone, or leave the .bin files out")
    return bool(bins)


def read_header(path: Path) -> Shard:
    """The shard's header, checked against the llm.c layout and the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    header = np.frombuffer(raw[: len(raw) // 4 * 4], "<i4")
    if not len(header) or header[0] != MAGIC:
        what = f"its header starts with {int(header[0])}, not the magic {MAGIC}" if len(header) else \
            f"it holds {size} bytes, no header"
        raise DataError(f"{path} is not an llm.c token shard: {what}; give shards written by llm.c's dev/data "
                        "scripts (or python -m gpt_jax.data --format llmc)")
    if size < HEADER_BYTES:
        raise DataError(f"{path}: its {size:,} bytes are fewer than the {HEADER_BYTES:,} of an llm.c header: it is cut "
                        "short; copy or write it again")
    version, tokens = int(header[1]), int(header[2])
    if version not in DTYPES:
        raise DataError(f"{path}: llm.c shard version {version} is not one this reads (1: uint16 tokens, 2: uint32)")
    expected = HEADER_BYTES + tokens * DTYPES[version].itemsize
    if tokens < 0 or size != expected:
        raise DataError(f"{path}: its llm.c header says {tokens:,} tokens, {expected:,} bytes with the header, but "
                        f"the file holds {size:,} bytes: it is cut short or damaged; copy or write it again")
    return Shard(path, version, tokens)


def check_gpt2_range(shards: list[Shard], vocab_size: int) -> None:
    """Every token id is below `vocab_size` (50,257 for GPT-2), or a DataError naming the shard."""
    for shard in shards:
        top = int(shard.open().max()) if shard.tokens else 0
        if top >= vocab_size:
            raise DataError(f"{shard.path} holds token id {top:,}, outside GPT-2's {vocab_size:,} ids: its tokens come "
                            "from another tokenizer; give GPT-2 shards (llm.c's version 1 files)")


def fingerprint(shards: list[Shard]) -> list:
    """What identifies the shards for the cache: path, size and modification time (their contents are
    not hashed, so a run starts without reading every token)."""
    stats = [os.stat(s.path) for s in shards]
    return [[str(s.path.resolve()), st.st_size, st.st_mtime_ns] for s, st in zip(shards, stats)]


def splits(shards: list[Shard], val_fraction: float) -> dict:
    """The manifest's description of the two splits: {split: {"shards": [[path, version, tokens]...],
    "start": first token, "stop": end}} over the concatenated shards of that split."""
    val = [s for s in shards if _VAL.search(s.path.name)]
    train = [s for s in shards if not _VAL.search(s.path.name)]
    if not train:
        raise DataError(f"the llm.c shards ({shards[0].path}, ...) are all val shards; add the *_train_* shards")

    def described(group, start, stop):
        return {"shards": [[str(s.path.resolve()), s.version, s.tokens] for s in group], "start": start, "stop": stop}
    n = sum(s.tokens for s in train)
    if val:
        return {"train": described(train, 0, n), "val": described(val, 0, sum(s.tokens for s in val))}
    cut = int(n * (1.0 - val_fraction))
    return {"train": described(train, 0, cut), "val": described(train, cut, n)}


def split_tokens(described: dict) -> "TokenStream":
    parts = [Shard(Path(p), v, n).open() for p, v, n in described["shards"]]
    return TokenStream(parts, described["start"], described["stop"])


class TokenStream:
    """Token arrays read as one, without a copy: `len()` and `[a:b]` windows, which are views of one
    array except a window across two arrays (the only copy). Iterating and np.asarray copy it all."""

    def __init__(self, parts: list[np.ndarray], start: int = 0, stop: int | None = None):
        self._parts = parts
        self._bounds = np.cumsum([0] + [len(p) for p in parts])
        self._start, self._stop = start, int(self._bounds[-1]) if stop is None else stop
        self.dtype = np.result_type(*parts)

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, key):
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a token stream is read in windows [a:b] with no step")
            return self._window(self._start + lo, self._start + max(lo, hi))
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} of a stream of {len(self)}")
        return self._window(self._start + index, self._start + index + 1)[0]

    def _window(self, lo: int, hi: int) -> np.ndarray:
        i = int(np.searchsorted(self._bounds, lo, side="right")) - 1
        pieces = []
        while lo < hi:
            base = int(self._bounds[i])
            take = min(hi, int(self._bounds[i + 1]))
            pieces.append(self._parts[i][lo - base: take - base])
            lo, i = take, i + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def __iter__(self):
        return iter(self[:])

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype)


def write_shards(split_tokens_: dict, out_dir: Path, name: str) -> list[Path]:
    """llm.c shards of {"train": tokens, "val": tokens}: `{name}_val_000000.bin`, then
    `{name}_train_000001.bin` and on, numbered as llm.c's fineweb.py numbers them, each of at most
    SHARD_TOKENS tokens. Each is written under a .part name and renamed when whole."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split in ("val", "train"):
        tokens = split_tokens_[split]
        version = 1 if np.dtype(tokens.dtype).itemsize == 2 else 2
        for start in range(0, len(tokens), SHARD_TOKENS):
            part = np.asarray(tokens[start: start + SHARD_TOKENS], DTYPES[version])
            header = np.zeros(256, "<i4")
            header[:3] = MAGIC, version, len(part)
            path = out_dir / f"{name}_{split}_{len(written):06d}.bin"
            with open(path.with_name(path.name + ".part"), "wb") as f:
                f.write(header.tobytes())
                part.tofile(f)
            os.replace(path.with_name(path.name + ".part"), path)
            written.append(path)
    return written
