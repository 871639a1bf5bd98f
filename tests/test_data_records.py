"""Corpora as they ship: Parquet and JSONL (plain, gzip, zstd) records, each record one document, give
the tokens of a directory of text files holding the same texts in the same order; Parquet streams by
row group; a bad record or file is one line naming the file and the row or line."""

import gzip
import json
import re

import numpy as np
import pytest

from conftest import data_path
from gpt_jax import corpora
from gpt_jax.config import DataConfig
from gpt_jax.data import DataError, prepare

pa = pytest.importorskip("pyarrow", reason="Parquet and .jsonl.zst sources need pyarrow (pip install 'gpt_jax[data]')")
pq = pytest.importorskip("pyarrow.parquet", reason="Parquet sources need pyarrow (pip install 'gpt_jax[data]')")
zstandard = pytest.importorskip("zstandard", reason="the .jsonl.zst test files are written with zstandard")

# documents with and without a final newline, an empty one, non-ASCII text, runs of blank lines and
# spaces at the edges, and one longer than the 64-byte pieces the tests cut text into
TEXTS = ["First document.\nIt has two lines.\n", "naïve café ✓ — déjà vu\n", "", "no newline at the end",
         "  leading spaces\n\n\nand blank lines  \n", "a longer one, line after line.\n" * 12,
         "It's GOOD!<br />Yes.\n", "last"]


def write_dir(path, texts):
    path.mkdir()
    for i, text in enumerate(texts):
        (path / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return path


def write_records(path, texts, field="text", **parquet):
    """`texts` as records of a .parquet / .jsonl / .jsonl.gz / .jsonl.zst file, beside an `id` field."""
    if path.name.endswith(".parquet"):
        table = pa.table({"id": list(range(len(texts))), field: texts})
        pq.write_table(table, path, **{"row_group_size": 3, **parquet})
        return path
    raw = "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)).encode()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif path.name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


def cfg(tmp_path, source, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), num_proc=1, **kw)


def splits(prepared):
    return [prepared.tokens(s).tolist() for s in ("train", "val")]


@pytest.mark.parametrize("suffix, normalize", [(".parquet", "none"), (".jsonl", "none"), (".jsonl.gz", "none"),
                                               (".jsonl.zst", "none"), (".parquet", "sst")])
def test_n_records_give_the_tokens_of_a_directory_of_n_text_files(tmp_path, monkeypatch, suffix, normalize):
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 64)  # pieces of 64 bytes: records span pieces, pieces hold records
    kw = dict(tokenizer="gpt2", tokenizer_path=str(data_path("gpt2-bpe")), val_fraction=0.3, normalize=normalize)
    expected = prepare(cfg(tmp_path, write_dir(tmp_path / "docs", TEXTS), **kw), verbose=False)
    records = prepare(cfg(tmp_path, write_records(tmp_path / f"docs{suffix}", TEXTS, field="body"), text_field="body",
                          **kw), verbose=False)
    assert splits(records) == splits(expected) and records.dir != expected.dir
    if normalize == "none":  # and against the texts themselves: each document, then <|endoftext|>
        assert records.tokenizer.decode(sum(splits(records), [])) == "".join(t + "<|endoftext|>" for t in TEXTS)
    assert [f["path"] for f in records.manifest["files"]] == [str(tmp_path / f"docs{suffix}")]
    assert sorted(p.name for p in records.dir.iterdir()) == ["manifest.json", "train.bin", "val.bin"]  # no text copy


def test_records_and_text_files_mix_in_one_source_list_and_the_char_vocabulary_sees_the_records(tmp_path):
    (tmp_path / "a.txt").write_text(TEXTS[0])
    mixed = [str(tmp_path / "a.txt"), str(write_records(tmp_path / "b.jsonl", TEXTS[1:]))]
    got = prepare(DataConfig(source=mixed, cache_dir=str(tmp_path / "cache"), num_proc=1), verbose=False)
    expected = prepare(cfg(tmp_path, write_dir(tmp_path / "docs", TEXTS)), verbose=False)
    assert splits(got) == splits(expected) and got.tokenizer.spec() == expected.tokenizer.spec()
    assert set(got.tokenizer.spec()["chars"]) == set("".join(TEXTS))


def test_the_text_field_is_part_of_the_cache_key_of_a_record_source(tmp_path):
    path = tmp_path / "two.parquet"
    pq.write_table(pa.table({"text": ["the text column\n"] * 20, "title": ["the title column\n"] * 20}), path)
    text = prepare(cfg(tmp_path, path), verbose=False)
    title = prepare(cfg(tmp_path, path, text_field="title"), verbose=False)
    assert text.dir != title.dir and splits(text) != splits(title)
    assert text.tokenizer.decode(text.tokens("train")[:16]) == "the text column\n"
    assert title.tokenizer.decode(title.tokens("train")[:17]) == "the title column\n"


def test_parquet_is_read_one_row_group_at_a_time_and_only_the_text_column(tmp_path, monkeypatch):
    path = write_records(tmp_path / "d.parquet", TEXTS, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 4
    calls, read_row_group = [], pq.ParquetFile.read_row_group

    def spy(self, i, **kw):
        calls.append((i, kw.get("columns")))
        return read_row_group(self, i, **kw)

    def whole_file(*args, **kw):
        raise AssertionError("the whole file was read at once")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    records = corpora.record_texts(path, "text")
    assert [next(records), next(records)] == TEXTS[:2] and calls == [(0, ["text"])]  # one row group in memory
    assert [next(records)] == TEXTS[2:3] and calls == [(0, ["text"]), (1, ["text"])]
    assert list(records) == TEXTS[3:] and calls == [(i, ["text"]) for i in range(4)]


def damaged_parquet(path):
    """A Parquet file of 4 row groups whose second row group's text column has a page header overwritten."""
    write_records(path, TEXTS, row_group_size=2)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = column.dictionary_page_offset if column.dictionary_page_offset is not None else column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start + 4: start + 12] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    return path


JSONL_LINES = {"bad": b'{"text": "fine"}\n\n{"text": "fine"}\n{"body": "no text key"}\n',
               "typed": b'{"text": "fine"}\n{"text": ["a", "list"]}\n',
               "broken": b'{"text": "fine"}\n{"text": "unterminated\n',
               "latin1": b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
               "listed": b'["text", "in", "a", "list"]\n',
               "nul": b'{"text": "a\\u0000b"}\n',
               "surrogate": b'{"text": "fine"}\n{"text": "half a pair \\ud83d"}\n'}


def bad_sources(tmp_path):
    """(source file, text_field, the message it must give)."""
    j = {name: tmp_path / f"{name}.jsonl" for name in JSONL_LINES}
    for name, raw in JSONL_LINES.items():
        j[name].write_bytes(raw)
    cut_gz = write_records(tmp_path / "cut.jsonl.gz", TEXTS * 50)
    cut_zst = write_records(tmp_path / "cut.jsonl.zst", TEXTS * 50)
    cut_gz.write_bytes(cut_gz.read_bytes()[:-20])
    cut_zst.write_bytes(cut_zst.read_bytes()[:-20])
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", None, "e"]}), nulls, row_group_size=2)
    cut_parquet = write_records(tmp_path / "cut.parquet", TEXTS)
    cut_parquet.write_bytes(cut_parquet.read_bytes()[:-10])
    return [
        (j["bad"], "text", f"{j['bad']} line 4: no key 'text' (keys: body); set data.text_field to the key that "
         "holds the text"),
        (j["typed"], "text", f"{j['typed']} line 2: 'text' holds list, not text; every record needs a string there"),
        (j["broken"], "text", f"{j['broken']} line 2: not valid JSON (Invalid control character at)"),
        (j["latin1"], "text", f"{j['latin1']} line 2: not valid JSON ('utf-8' codec can't decode byte 0xe9"),
        (j["listed"], "text", f"{j['listed']} line 1: expected a JSON object, got list"),
        (j["nul"], "text", f"{j['nul']} line 1: the text holds a NUL character"),
        (j["surrogate"], "text", f"{j['surrogate']} line 2: the text holds a lone surrogate"),
        (cut_gz, "text", f"{cut_gz} cannot be read after line "),
        (cut_zst, "text", f"{cut_zst} cannot be read after line "),
        (write_records(tmp_path / "ok.parquet", TEXTS), "body", f"{tmp_path / 'ok.parquet'} has no column 'body' "
         "(columns: id, text); set data.text_field to the column that holds the text"),
        (write_records(tmp_path / "ids.parquet", TEXTS), "id",
         f"{tmp_path / 'ids.parquet'} row 0: 'id' holds int, not text"),
        (nulls, "text", f"{nulls} row 3: 'text' holds null, not text"),
        (damaged_parquet(tmp_path / "damaged.parquet"), "text",
         f"{tmp_path / 'damaged.parquet'} rows 2 to 3 (row group 1) cannot be read ("),
        (cut_parquet, "text", f"{cut_parquet} is not a readable Parquet file ("),
    ]


def test_a_bad_record_or_file_is_one_line_naming_the_file_and_the_row_and_nothing_is_cached(tmp_path):
    cases = bad_sources(tmp_path)
    for path, field, words in cases:
        with pytest.raises(DataError, match="^" + re.escape(words)) as err:
            prepare(cfg(tmp_path, path, text_field=field), verbose=False)
        assert "\n" not in str(err.value), str(err.value)
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir()), path  # no trace left
    # the files cut short fail at their end, with what the decompressor said
    assert "cut short" in str(pytest.raises(DataError, prepare, cfg(tmp_path, cases[7][0]), verbose=False).value)
    assert "Truncated compressed stream" in str(pytest.raises(DataError, prepare, cfg(tmp_path, cases[8][0]),
                                                              verbose=False).value)


def test_a_record_source_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kw):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    for name in ("d.parquet", "d.jsonl.zst"):
        path = tmp_path / name
        path.write_bytes(b"not read")
        words = f"reading {path} needs pyarrow: pip install 'gpt_jax[data]'"
        with pytest.raises(DataError, match="^" + re.escape(words)):
            list(corpora.record_texts(path, "text"))
    assert list(corpora.record_texts(write_records(tmp_path / "d.jsonl.gz", TEXTS), "text")) == TEXTS  # gzip: stdlib


def test_every_record_format_reads_back_the_texts_in_order(tmp_path):
    for suffix in (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst"):
        assert list(corpora.record_texts(write_records(tmp_path / f"r{suffix}", TEXTS), "text")) == TEXTS, suffix
    empty = np.asarray(corpora.text_files([write_records(tmp_path / "e.jsonl", ["", "ab", ""])], "none", "text",
                                          tmp_path / "texts", verbose=False)[0].ends)
    assert empty.tolist() == [0, 2, 2]  # where each record ends in the text copy


def test_each_document_ends_with_an_end_of_text_in_the_split_it_ends_in(tmp_path):
    """Val starts inside the second of three documents; the third is empty: its <|endoftext|> is the
    last val token, after the second's (the same for a folder of files and for records)."""
    texts = ["a first line\n" * 20, "a second line\n" * 20, ""]
    kw = dict(tokenizer="gpt2", tokenizer_path=str(data_path("gpt2-bpe")), val_fraction=0.25)
    for source in (write_dir(tmp_path / "docs", texts), write_records(tmp_path / "docs.jsonl", texts)):
        prepared = prepare(cfg(tmp_path, source, **kw), verbose=False)
        train, val = splits(prepared)
        assert train.count(50256) == 1 and val[-2:] == [50256, 50256] and val.count(50256) == 2, source
        assert prepared.tokenizer.decode(train + val) == "".join(t + "<|endoftext|>" for t in texts)
