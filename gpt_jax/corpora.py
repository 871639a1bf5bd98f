"""Reading a corpus: the files a `data.source` names, as documents of UTF-8 text.

A source is a text file, a directory (its files in sorted order, hidden ones left out), a glob, a URL
(downloaded once into the cache), `python-stdlib`, or a list of these read in the listed order.
Besides text, record files are read as they ship, each record one document:

    .parquet                        pyarrow reads one row group at a time (memory is bounded by a row
                                    group, not the file); the text is the column `data.text_field`
    .jsonl  .jsonl.gz  .jsonl.zst   one JSON object a line (blank lines are skipped); the text is the
                                    key `data.text_field`. .zst is read through pyarrow, which stops
                                    on a file cut short (zstandard's stream readers end it silently)

A record without the field, a value that is not a string, a text holding NUL, or a file that cannot
be read is one DataError naming the file and the row (Parquet: counted from 0, as pyarrow counts) or
the line (JSONL: from 1).

`text_files` turns the source files into the text that is tokenized: a text file as it is (or copied
in the `data.normalize` form), a record file as one text file of its records one after another, with
the byte offset where each record ends. Every document, a text file or a record, is tokenized on its
own with an end-of-text token after it when the corpus holds more than one, so N records give the
same tokens as a directory of N text files holding the same texts in the same order.
"""

from __future__ import annotations

import codecs
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import sysconfig
import urllib.request
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_jax.normalize import normalize

CHUNK_BYTES = 8 << 20
DOWNLOAD_TIMEOUT_S = 30  # a server that stops answering for this long fails the download
RECORD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst")


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


def file_sha256(path: Path) -> str:
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


def decode_text(raw: bytes, path, offset: int = 0) -> str:
    """The text of `raw`, bytes `offset`.. of `path` that end on a character boundary, or a DataError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    return _decode(decoder, raw, path, offset) + _decode(decoder, b"", path, offset + len(raw))  # b"": the final flush


def read_text(path) -> str:
    """The text of a user's input file, or one DataError line: missing, not UTF-8, or binary."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist (or is not a file)")
    return decode_text(path.read_bytes(), path)


def text_chunks(path: Path, start: int = 0, stop: int | None = None):
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


def is_records(path: Path) -> bool:
    return path.name.endswith(RECORD_SUFFIXES)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 (pyarrow.parquet is a submodule to load)
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'gpt_jax[data]' (or pip install pyarrow)") from None
    return pyarrow


def _parquet_values(path: Path, field: str):
    """(row, value) of the column `field`, one row group in memory at a time."""
    pa = _pyarrow(path)
    try:
        parquet = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({_first_line(e)}); download or write it "
                        "again") from None
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)}); set "
                        "data.text_field to the column that holds the text")
    row = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            values = parquet.read_row_group(group, columns=[field]).column(0).to_pylist()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path} rows {row} to {row + rows - 1} (row group {group}) cannot be read "
                            f"({_first_line(e)}): the file is damaged; download or write it again") from None
        for value in values:
            yield row, value
            row += 1


def _jsonl_lines(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        return io.BufferedReader(_pyarrow(path).input_stream(str(path), compression="zstd"), 1 << 20)
    return open(path, "rb")


def _jsonl_values(path: Path, field: str):
    """(line, value) of the key `field` of each JSON object, one line in memory at a time."""
    no = 0
    with _jsonl_lines(path) as lines:
        try:
            for no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:  # not JSON (its msg leaves out json's position in the line), or not UTF-8
                    why = getattr(e, "msg", None) or _first_line(e)
                    raise DataError(f"{path} line {no}: not valid JSON ({why})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {no}: expected a JSON object, got {type(record).__name__}")
                if field not in record:
                    raise DataError(f"{path} line {no}: no key {field!r} (keys: {', '.join(record)}); set "
                                    "data.text_field to the key that holds the text")
                yield no, record[field]
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} cannot be read after line {no} ({_first_line(e)}): the file is damaged or "
                            "cut short; download or write it again") from None


def record_texts(path: Path, field: str):
    """The text of each record of a .parquet / .jsonl(.gz|.zst) file, in order, checked."""
    unit, values = ("row", _parquet_values(path, field)) if path.name.endswith(".parquet") else \
        ("line", _jsonl_values(path, field))
    for where, value in values:
        if not isinstance(value, str):
            got = "null" if value is None else type(value).__name__
            raise DataError(f"{path} {unit} {where}: {field!r} holds {got}, not text; every record needs a string "
                            "there")
        if "\x00" in value:
            raise DataError(f"{path} {unit} {where}: the text holds a NUL character; a corpus is text")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path} {unit} {where}: the text holds a lone surrogate (an unpaired \\ud800-\\udfff "
                                "escape), which is not text; mend the record") from None
        yield value


@dataclass(frozen=True)
class TextFile:
    """UTF-8 text to tokenize; `ends`: the byte offsets where its documents end (None: one document)."""

    path: Path
    ends: np.ndarray | None = None

    @property
    def documents(self) -> int:
        return 1 if self.ends is None else len(self.ends)

    def document_ends(self):
        """The byte offset where each document ends, one at a time (a corpus may hold millions)."""
        return iter([self.path.stat().st_size]) if self.ends is None else map(int, self.ends)


def _ends_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".ends.npy")


def _records_to_text(path: Path, field: str, kind: str, copy: Path, bar) -> TextFile:
    ends, end = array("q"), 0  # 8 bytes a record, where a list of ints would take 36
    with open(copy, "wb") as sink:
        for text in record_texts(path, field):
            raw = normalize(text, kind).encode("utf-8")
            sink.write(raw)
            end += len(raw)
            ends.append(end)
            bar.update(len(raw))
    np.save(_ends_path(copy), np.frombuffer(ends, np.int64))
    return TextFile(copy, np.frombuffer(ends, np.int64))


def _normalized_copy(path: Path, kind: str, copy: Path, bar) -> TextFile:
    with open(copy, "w", encoding="utf-8") as sink:
        for chunk in text_chunks(path):
            sink.write(normalize(chunk, kind))
            bar.update(len(chunk.encode("utf-8")))
    return TextFile(copy)


def text_files(files: list[Path], kind: str, field: str, out: Path, verbose: bool,
               made: bool = False) -> list[TextFile]:
    """The source files as text in the `data.normalize` form `kind`, copies written under `out` (records
    from the key or column `field`); `made`: the copies are there already (a resumed preparation).
    Chunks end at a line break and normalisation keeps lines."""
    copies = [None if kind == "none" and not is_records(f) else out / f"{i:05d}-{f.name}{'.txt' * is_records(f)}"
              for i, f in enumerate(files)]
    if not any(copies):
        return [TextFile(f) for f in files]
    if made:
        return [TextFile(f) if c is None else TextFile(c, np.load(_ends_path(c)) if is_records(f) else None)
                for f, c in zip(files, copies)]
    out.mkdir(parents=True)
    total = None if any(is_records(f) for f in files) else sum(f.stat().st_size for f in files)
    texts = []
    desc = f"normalizing ({kind})" if kind != "none" else "reading records"
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not verbose, file=sys.stdout) as bar:
        for f, copy in zip(files, copies):
            if is_records(f):
                texts.append(_records_to_text(f, field, kind, copy, bar))
            else:
                texts.append(TextFile(f) if copy is None else _normalized_copy(f, kind, copy, bar))
    return texts


def split_point(files: list[Path], val_fraction: float) -> tuple[int, int]:
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
