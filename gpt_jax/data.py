"""Corpus -> token .bin files + manifest, and a deterministic, resumable, per-process batch sampler.

`prepare(data_config)` resolves the source (a text file, a directory, a glob, a URL, or the built-in
`python-stdlib` corpus), puts its text in the `normalize` form (`gpt_jax.normalize`), tokenizes it in
chunks (so corpora larger than memory stream through), splits it into train / val by bytes (the last
`val_fraction` is val, as nanoGPT does), and writes `train.bin` / `val.bin` (uint16 when the
vocabulary fits, else uint32) with `manifest.json`. The result is cached under `cache_dir` by a key
over the source contents, the normalisation and the tokenizer, so a second run reuses it.

`Sampler` cuts a token stream into windows of `block_size + 1` tokens; which windows make batch k
is a function of (seed, epoch, cursor) alone, windows are drawn without replacement within an
epoch, and each process reads only its own rows of every global batch.
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_jax.errors import ArgumentParser, entry_point, number
from gpt_jax.config import RANGES, DataConfig
from gpt_jax.normalize import NORMALIZERS, normalize
from gpt_jax.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer

CHUNK_BYTES = 8 << 20
DOWNLOAD_TIMEOUT_S = 30  # a server that stops answering for this long fails the download
FORMAT_VERSION = 1


class DataError(ValueError):
    """A data source is missing, empty, unreadable or too small; the message says which and the fix."""


def stdlib_files() -> list[Path]:
    """The running Python's standard library .py sources (no tests, no site-packages), in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def _download(url: str, cache_dir: Path) -> Path:
    target = cache_dir / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16] / (url.rsplit("/", 1)[-1] or "data.txt")
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({e}); offline, download it elsewhere and set data.source "
                        "to the local file path") from None
    tmp.rename(target)
    return target


def resolve_source(source, cache_dir: Path) -> list[Path]:
    """The ordered list of files a `data.source` names (a list of sources: their files, in order)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("data.source is an empty list: name at least one text file, directory, glob or URL")
        files = [f for s in source for f in resolve_source(s, cache_dir)]
        if len({f.resolve() for f in files}) < len(files):
            raise DataError(f"data.source {list(source)!r} names a file more than once; list each file once")
        return files
    if source == "python-stdlib":
        files = stdlib_files()
    elif source.startswith(("http://", "https://")):
        files = [_download(source, cache_dir)]
    elif any(c in source for c in "*?["):
        files = [Path(p) for p in sorted(globlib.glob(source, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"data.source glob {source!r} matches no files")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            files = [p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
            if not files:
                raise DataError(f"data.source directory {path} holds no files")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"data.source {source!r} does not exist: give a text file, a directory, a glob, "
                            "a URL, or 'python-stdlib'")
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"data source file {f} is not readable")
    if sum(f.stat().st_size for f in files) == 0:
        raise DataError(f"data.source {source!r} is empty (0 bytes in {len(files)} file(s))")
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(decoder, raw: bytes, path: Path, offset: int) -> str:
    """UTF-8 text of `raw` (bytes from `offset` of `path`), or a DataError: a corpus is text."""
    try:
        text = decoder.decode(raw, final=not raw)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (undecodable bytes near byte {offset + e.start}); "
                        "give text files only, or convert it (e.g. iconv -t utf-8)") from None
    if "\x00" in text:
        raise DataError(f"{path} holds NUL bytes near byte {offset + text.index(chr(0))}: it is "
                        "binary, not text; give text files only")
    return text


def read_text(path) -> str:
    """The text of a user's input file, or one DataError line: missing, not UTF-8, or binary."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist (or is not a file)")
    decoder, raw = codecs.getincrementaldecoder("utf-8")(), path.read_bytes()
    return _decode(decoder, raw, path, 0) + _decode(decoder, b"", path, len(raw))  # b"": the final flush


def _text_chunks(path: Path, start: int = 0, stop: int | None = None):
    """Decoded text of bytes [start, stop) of a file, in chunks that end at a line start."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = (stop - start) if stop is not None else None
        while True:
            n = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
            offset = f.tell()
            raw = f.read(n) if n else b""
            if remaining is not None:
                remaining -= len(raw)
            text = carry + _decode(decoder, raw, path, offset)
            if not raw:
                if text:
                    yield text
                return
            # Cut after the last newline with a non-space on each side ("x\ny"): no token spans it, and
            # no whitespace run is cut short (a run at the end of a text is one BPE token).
            cut = len(text)
            while True:
                cut = text.rfind("\n", 0, cut)
                if cut <= 0 or (cut + 1 < len(text) and not text[cut + 1].isspace() and not text[cut - 1].isspace()):
                    break
            if cut == 0:
                cut = -1
            if cut < 0 and len(text) < 4 * CHUNK_BYTES:
                carry = text
                continue
            if cut < 0:  # no line break for 32 MB: cut anyway rather than hold it all in memory
                cut = len(text) - 1
            yield text[: cut + 1]
            carry = text[cut + 1:]


def _normalized_copies(files: list[Path], kind: str, out: Path, verbose: bool) -> list[Path]:
    """The source files in the `data.normalize` form, written under `out`: the tokenizer, the split and
    the tokens are all made from them. Chunks end at a line break and normalisation keeps lines."""
    if kind == "none":
        return files
    out.mkdir()
    copies = [out / f"{i:05d}-{f.name}" for i, f in enumerate(files)]
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=f"normalizing ({kind})",
              disable=not verbose, file=sys.stdout) as bar:
        for f, copy in zip(files, copies):
            with open(copy, "w", encoding="utf-8") as sink:
                for chunk in _text_chunks(f):
                    sink.write(normalize(chunk, kind))
                    bar.update(len(chunk.encode("utf-8")))
    return copies


def _split_point(files: list[Path], val_fraction: float) -> tuple[int, int]:
    """(file index, byte offset) where val starts: the last `val_fraction` of all bytes."""
    sizes = [f.stat().st_size for f in files]
    cut = int(sum(sizes) * (1.0 - val_fraction))
    for i, size in enumerate(sizes):
        if cut < size:
            with open(files[i], "rb") as f:  # move forward to a UTF-8 character boundary
                f.seek(cut)
                while (b := f.read(1)) and (b[0] & 0xC0) == 0x80:
                    cut += 1
            return i, cut
        cut -= size
    return len(files) - 1, sizes[-1]


def _build_tokenizer(cfg: DataConfig, files: list[Path], out: Path):
    if cfg.tokenizer == "char":
        chars: set[str] = set()
        for f in files:
            for chunk in _text_chunks(f):
                chars.update(chunk)
        tok = CharTokenizer(chars)
        (out / "tokenizer.json").write_text(json.dumps(tok.spec()))
        return tok
    if cfg.tokenizer == "sentencepiece" and cfg.tokenizer_path is None:  # trained on the source files
        return SentencePieceTokenizer.train(files, out / "tokenizer", vocab_size=cfg.sentencepiece_vocab_size)
    return load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)


@dataclass
class PreparedData:
    dir: Path
    tokenizer: object
    manifest: dict

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")


def _cache_key(cfg: DataConfig, files: list[Path], hashes: list[str]) -> str:
    spec = {"version": FORMAT_VERSION, "tokenizer": cfg.tokenizer, "tokenizer_path": cfg.tokenizer_path,
            "sp_vocab": cfg.sentencepiece_vocab_size if cfg.tokenizer == "sentencepiece" else None,
            "normalize": cfg.normalize,
            "val_fraction": cfg.val_fraction, "files": [[f.name, h] for f, h in zip(files, hashes)]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, verbose: bool = True) -> PreparedData:
    """Tokenize `cfg.source` into cached train.bin / val.bin (+ manifest.json); reuse a matching cache."""
    cache_dir = Path(cfg.cache_dir)
    files = resolve_source(cfg.source, cache_dir)
    hashes = [_sha256(f) for f in files]
    name = "python-stdlib" if cfg.source == "python-stdlib" else Path(files[0]).stem
    out = cache_dir / f"{name}-{cfg.tokenizer}-{_cache_key(cfg, files, hashes)}"
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        tok = load_tokenizer(manifest["tokenizer"])
        return PreparedData(out, tok, manifest)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    texts = _normalized_copies(files, cfg.normalize, tmp / "normalized", verbose)
    tok = _build_tokenizer(cfg, texts, tmp)
    if tok.kind == "sentencepiece" and cfg.tokenizer_path is None:
        spec = {"kind": "sentencepiece", "path": str((out / "tokenizer.model").resolve())}
    else:
        spec = tok.spec()
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    split_file, split_byte = _split_point(texts, cfg.val_fraction)
    counts = {"train": 0, "val": 0}
    total = sum(f.stat().st_size for f in texts)
    with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f, \
            tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {name}", disable=not verbose,
                 file=sys.stdout) as bar:
        for i, f in enumerate(texts):
            ranges = [("train", 0, None)] if i < split_file else [("val", 0, None)] if i > split_file else \
                [("train", 0, split_byte), ("val", split_byte, None)]
            for split, start, stop in ranges:
                sink = train_f if split == "train" else val_f
                for chunk in _text_chunks(f, start, stop):
                    ids = np.asarray(tok.encode(chunk), dtype)
                    ids.tofile(sink)
                    counts[split] += len(ids)
                    bar.update(len(chunk.encode("utf-8")))
                if tok.eot_id is not None and len(texts) > 1 and (stop is None):
                    np.asarray([tok.eot_id], dtype).tofile(sink)  # document boundary
                    counts[split] += 1
    shutil.rmtree(tmp / "normalized", ignore_errors=True)
    if counts["train"] == 0 or counts["val"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"data.source {cfg.source!r} gave {counts['train']} train and {counts['val']} val tokens; "
                        "it needs text in both splits (use more text or another data.val_fraction)")
    manifest = {"version": FORMAT_VERSION, "source": cfg.source, "normalize": cfg.normalize, "tokenizer": spec,
                "vocab_size": tok.vocab_size,
                "dtype": np.dtype(dtype).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
                "files": [{"path": str(f), "sha256": h, "bytes": f.stat().st_size} for f, h in zip(files, hashes)]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if spec["kind"] == "sentencepiece" and cfg.tokenizer_path is None:
        tok = load_tokenizer(spec)
    return PreparedData(out, tok, manifest)


def _whole_windows(n_tokens: int, block_size: int) -> int:
    """Windows of `block_size + 1` tokens that `n_tokens` hold from every epoch offset (the sampler
    starts each epoch 0 to `block_size` tokens in; `block_size` in is the fewest)."""
    return (n_tokens - block_size) // (block_size + 1)


def check_windows(tokens: np.ndarray, block_size: int, batch_size: int, split: str = "train") -> None:
    """A DataError unless `tokens` make one batch of windows of `block_size + 1` tokens from any
    epoch offset."""
    if _whole_windows(len(tokens), block_size) < batch_size:
        fix = "raise data.val_fraction" if split == "val" else "use more text"
        raise DataError(f"the {split} split ({len(tokens):,} tokens) is smaller than one batch of {batch_size} windows "
                        f"of {block_size + 1} tokens; {fix}, or lower train.batch_size or model.n_positions")


def check_batches(data: PreparedData, block_size: int, batch_size: int) -> None:
    """Both splits of `data` hold a batch (checked before a run directory is touched)."""
    for split in ("train", "val"):
        check_windows(data.tokens(split), block_size, batch_size, split)


class Sampler:
    """Deterministic batches of windows; the state is (epoch, cursor), saved in checkpoints.

    The stream is cut into windows of `block_size + 1` tokens at an offset drawn per epoch; each
    epoch visits every window once in an order drawn from (seed, epoch). Global batch k holds the
    windows at positions [cursor, cursor + batch_size) of that order; process p of P reads rows
    [p * batch_size / P, (p + 1) * batch_size / P) of it.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, epoch: int = 0, cursor: int = 0):
        if batch_size % process_count:
            raise DataError(f"global batch {batch_size} does not divide across {process_count} processes")
        self.tokens, self.T, self.B, self.seed = tokens, block_size, batch_size, seed
        self.rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
        check_windows(tokens, block_size, batch_size)
        self.epoch, self.cursor = epoch, cursor
        self._order_epoch, self._order, self._offset = None, None, 0

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._offset = int(rng.integers(0, self.T + 1))
            n = (len(self.tokens) - self._offset) // (self.T + 1)  # whole windows of T + 1 tokens
            self._order, self._order_epoch = rng.permutation(n), self.epoch
        return self._order

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def next(self) -> np.ndarray:
        """This process's rows of the next global batch: int32 [B_local, block_size + 1]."""
        order = self._epoch_order()
        if self.cursor + self.B > len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._epoch_order()
        starts = self._offset + order[self.cursor: self.cursor + self.B][self.rows] * (self.T + 1)
        self.cursor += self.B
        return np.stack([self.tokens[s: s + self.T + 1] for s in starts]).astype(np.int32)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int = 1234,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """A fixed set of validation batches (the same every evaluation and every run): `n_batches`, or
    as many as one epoch holds, so no token is read twice."""
    check_windows(tokens, block_size, batch_size, "val")
    sampler = Sampler(tokens, block_size, batch_size, seed, process_index, process_count)
    return [sampler.next() for _ in range(min(n_batches, _whole_windows(len(tokens), block_size) // batch_size))]


@entry_point
def main(argv=None) -> int:
    """python -m gpt_jax.data SOURCE [--tokenizer KIND] [--tokenizer-path P] [--normalize none|sst] [--cache-dir D]"""
    parser = ArgumentParser(description="Tokenize a corpus into cached train.bin / val.bin files.")
    parser.add_argument("source", help="text file, directory, glob, URL, or python-stdlib")
    parser.add_argument("--tokenizer", default="char", choices=["char", "gpt2", "gpt1", "sentencepiece"])
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--normalize", default="none", choices=NORMALIZERS, help="the text's form (gpt_jax.normalize)")
    parser.add_argument("--val-fraction", type=number(RANGES["data"]["val_fraction"], float), default=0.1)
    parser.add_argument("--cache-dir", default="data_cache")
    args = parser.parse_args(argv)
    prepared = prepare(DataConfig(source=args.source, tokenizer=args.tokenizer, tokenizer_path=args.tokenizer_path,
                                  normalize=args.normalize, val_fraction=args.val_fraction, cache_dir=args.cache_dir))
    m = prepared.manifest
    print(f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens ({m['dtype']}) in {prepared.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
