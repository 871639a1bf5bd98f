"""Reading a corpus as text: a file that is not UTF-8 text is one line naming it and the byte, chunks
rebuild the text and end only where no token can span the cut, the val split starts on a character
boundary, and the locale does not change what is read or written."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from gpt_jax import corpora
from gpt_jax.data import DataError, prepare, read_text
from test_data import cfg


def test_the_corpus_is_read_and_written_as_utf8_under_an_ascii_locale(tmp_path):
    src = tmp_path / "reviews.txt"
    src.write_text("Café naïve — déjà vu!\n" * 40, encoding="utf-8")
    code = ("import locale, sys; from gpt_jax.config import DataConfig; from gpt_jax.data import prepare; "
            f"d = prepare(DataConfig(source={str(src)!r}, cache_dir=sys.argv[1], normalize='sst'), verbose=False); "
            "print(locale.getpreferredencoding(False)); print(d.tokens('train').tolist() + d.tokens('val').tolist())")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    encoding, tokens = proc.stdout.splitlines()  # ANSI_X3.4-1968 (ASCII) on Linux; the tokens must agree anyway
    here = prepare(cfg(tmp_path, src, normalize="sst"), verbose=False)
    assert json.loads(tokens) == here.tokens("train").tolist() + here.tokens("val").tolist()


def test_val_is_the_last_fraction_of_the_bytes_from_a_character_boundary(tmp_path):
    def files(*texts):
        paths = [tmp_path / f"{i}-{len(texts)}.txt" for i in range(len(texts))]
        for path, text in zip(paths, texts):
            path.write_text(text)
        return paths
    two = files("x" * 30, "y" * 10)
    assert corpora.split_point(two, 0.25) == (1, 0)  # 30 train bytes: val is the whole second file
    assert corpora.split_point(two, 0.125) == (1, 5)  # 35 train bytes
    assert corpora.split_point(files("x" * 30, "y" * 10, "z" * 5), 0.0) == (2, 5)  # no val: it starts at the end
    for text, start in [("a" * 9 + "é" + "b" * 5, 11), ("a" * 9 + "✓" + "b" * 4, 12)]:  # 16 bytes, byte 10 inside a char
        assert corpora.split_point(files(text), 0.375) == (0, start)


def test_a_file_that_is_not_utf8_text_is_one_line_naming_it_and_the_byte(tmp_path, monkeypatch):
    good = tmp_path / "good.txt"
    good.write_bytes("naïve café ✓\n".encode() * 3)
    assert read_text(good) == "naïve café ✓\n" * 3
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 16)  # in a corpus the bad byte is in a later chunk

    def corpus(path):
        prepare(cfg(tmp_path, path), verbose=False)
    for name, raw, words in [("bad.txt", b"line of text\n" * 10 + b"\xff\n", "is not UTF-8 text (undecodable bytes near "
                              "byte 130); give text files only, or convert it (e.g. iconv -t utf-8)"),
                             ("nul.txt", b"line of text\n" * 10 + b"a\x00b\x00\n", "holds NUL bytes near byte 131: it is "
                              "binary, not text; give text files only"),
                             ("cut.txt", "text ✓".encode()[:-1], "is not UTF-8 text")]:  # ends inside a character
        (tmp_path / name).write_bytes(raw)
        for read in (read_text, corpus):
            with pytest.raises(DataError, match=re.escape(f"{tmp_path / name} {words}")):
                read(tmp_path / name)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'missing.txt'} does not exist")):
        read_text(tmp_path / "missing.txt")


def test_chunks_rebuild_the_text_and_end_after_a_newline_between_non_spaces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 16)
    rng = np.random.default_rng(0)
    pieces = ["word", "é", "✓", " ", "   ", "\n", "\n\n", " \n", "\n "]
    # runs of whitespace and line breaks, with a cut point ("a\nb") at least every 23 characters
    texts = [start + "".join("".join(rng.choice(pieces, 5)) + "a\nb" for _ in range(12))
             for start in ("\n" + " " * 20, " \n   ") for _ in range(10)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
        chunks = list(corpora.text_chunks(tmp_path / f"{i}.txt"))
        assert "".join(chunks) == text
        for chunk, after in zip(chunks, chunks[1:]):
            assert chunk[-1] == "\n" and not chunk[-2].isspace() and not after[0].isspace(), (chunk, after)
        assert max(len(c) for c in chunks) <= 2 * 16 + 23  # a read plus the unfinished line before it
        k = len(text) // 3  # bytes [start, stop) of the file
        start, stop = len(text[:k].encode()), len(text[: 2 * k].encode())
        assert "".join(corpora.text_chunks(tmp_path / f"{i}.txt", start, stop)) == text[k: 2 * k]
    long = "x" * 100 + "\nno line break for 100 characters\n"
    (tmp_path / "long.txt").write_text(long)
    chunks = list(corpora.text_chunks(tmp_path / "long.txt"))
    assert "".join(chunks) == long and max(len(c) for c in chunks) <= 4 * 16  # cut anyway at 4 reads
