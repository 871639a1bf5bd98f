import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import data_path
from gpt_jax import corpora
from gpt_jax import data as data_mod
from gpt_jax.config import DataConfig
from gpt_jax.data import (DataError, Sampler, check_batches, check_windows, eval_batches, prepare, resolve_source,
                          stdlib_files)


def cfg(tmp_path, source, **kw):
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def test_char_split_matches_nanogpt_counts(tmp_path):
    counts = json.loads(data_path("tinyshakespeare", "gpt2_token_counts.json").read_text())["char_level"]
    prepared = prepare(cfg(tmp_path, data_path("tinyshakespeare", "input.txt")), verbose=False)
    m = prepared.manifest
    assert (m["train_tokens"], m["val_tokens"], m["vocab_size"]) == (counts["train_tokens"], counts["val_tokens"], 65)
    assert m["dtype"] == "uint16" and len(prepared.tokens("train")) == counts["train_tokens"]
    assert not prepared.tokens("train").flags.writeable  # the cache is never written through
    assert m["tokenizer"]["kind"] == "char" and m["version"] == data_mod.FORMAT_VERSION
    source = data_path("tinyshakespeare", "input.txt")
    assert m["files"] == [{"path": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                           "bytes": source.stat().st_size}]
    text = data_path("tinyshakespeare", "input.txt").read_text()
    assert prepared.tokenizer.decode(prepared.tokens("val")[:50]) == text[counts["train_tokens"]:][:50]
    # beside the tokens, the character vocabulary: every character of the text once, in sorted order
    assert json.loads((prepared.dir / "tokenizer.json").read_text()) == {"kind": "char", "chars": "".join(sorted(set(text)))}


def test_gpt2_bpe_counts_and_chunking_do_not_change_tokens(tmp_path, monkeypatch):
    counts = json.loads(data_path("tinyshakespeare", "gpt2_token_counts.json").read_text())["gpt2_bpe_encode_ordinary"]
    source = data_path("tinyshakespeare", "input.txt")
    whole = prepare(cfg(tmp_path, source, tokenizer="gpt2", tokenizer_path=str(data_path("gpt2-bpe"))), verbose=False)
    assert (whole.manifest["train_tokens"], whole.manifest["val_tokens"]) == (counts["train_tokens"], counts["val_tokens"])
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 4096)  # stream in 4 KB pieces: the same tokens
    chunked = prepare(cfg(tmp_path / "b", source, tokenizer="gpt2", tokenizer_path=str(data_path("gpt2-bpe"))),
                      verbose=False)
    np.testing.assert_array_equal(chunked.tokens("train"), whole.tokens("train"))
    np.testing.assert_array_equal(chunked.tokens("val"), whole.tokens("val"))


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world, this is some text.\n" * 200)
    first = prepare(cfg(tmp_path, src), verbose=False)
    mtime = os.path.getmtime(first.dir / "train.bin")
    second = prepare(cfg(tmp_path, src), verbose=False)
    assert second.dir == first.dir and os.path.getmtime(second.dir / "train.bin") == mtime
    assert prepare(cfg(tmp_path, src, sentencepiece_vocab_size=99), verbose=False).dir == first.dir  # char ignores it

    def key(kind, vocab):
        return data_mod._cache_key(DataConfig(source=str(src), tokenizer=kind, sentencepiece_vocab_size=vocab), [src], ["h"])
    assert key("sentencepiece", 500) != key("sentencepiece", 400) and key("gpt2", 500) == key("gpt2", 400)
    src.write_text("different text entirely!\n" * 200)
    assert prepare(cfg(tmp_path, src), verbose=False).dir != first.dir


def test_directory_and_glob_sources_in_sorted_order_with_document_breaks(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in [("b.txt", "second doc here\n"), ("a.txt", "first doc here\n"), ("c.md", "third\n")]:
        (docs / name).write_text(text * 50)
    (docs / "sub").mkdir()
    (docs / "sub" / "d.txt").write_text("nested\n")
    (docs / ".hidden.txt").write_text("an editor's file\n")
    (tmp_path / "empty").mkdir()

    def names(source):
        return [p.relative_to(docs).as_posix() for p in resolve_source(str(source), tmp_path)]
    assert names(docs) == ["a.txt", "b.txt", "c.md", "sub/d.txt"]  # files only, in subfolders too, no hidden ones
    assert names(docs / "*.txt") == ["a.txt", "b.txt"]
    assert names(docs / "**" / "*.txt") == ["a.txt", "b.txt", "sub/d.txt"]  # ** is any depth
    with pytest.raises(DataError, match="directory .*empty holds no files"):
        resolve_source(str(tmp_path / "empty"), tmp_path)
    prepared = prepare(cfg(tmp_path, docs / "*.txt", tokenizer="gpt2", tokenizer_path=str(data_path("gpt2-bpe")),
                           val_fraction=0.3), verbose=False)
    train = list(prepared.tokens("train"))
    assert train.count(50256) == 1  # one break after a.txt, inside the train split
    assert prepared.tokenizer.decode(train[: train.index(50256)]) == "first doc here\n" * 50


def test_a_list_of_sources_is_one_corpus_in_the_listed_order(tmp_path):
    a, b = tmp_path / "x" / "books.txt", tmp_path / "y" / "reviews.txt"
    for path, text in [(a, "a book line\n" * 40), (b, "a review line\n" * 40)]:
        path.parent.mkdir()
        path.write_text(text)
    assert resolve_source([str(b), str(tmp_path / "x" / "*.txt")], tmp_path) == [b, a]  # listed order, not sorted
    data_path("gpt2-bpe")  # no tokenizer_path: the GPT-2 BPE files are found in $GPT_JAX_DATA/gpt2-bpe
    kw = dict(tokenizer="gpt2", val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    prepared = prepare(DataConfig(source=[str(b), str(a)], **kw), verbose=False)
    train, val = list(prepared.tokens("train")), list(prepared.tokens("val"))
    assert train.count(50256) == 1 and val.count(50256) == 1  # after each file (the last one ends val)
    tok = prepared.tokenizer
    assert tok.decode(train[: train.index(50256)]) == "a review line\n" * 40
    assert tok.decode(train[train.index(50256) + 1:] + val[:-1]) == "a book line\n" * 40  # val: the last quarter
    assert (prepared.manifest["train_tokens"], prepared.manifest["val_tokens"]) == (len(train), len(val))  # with the EOTs
    assert prepared.manifest["source"] == [str(b), str(a)]
    assert [f["path"] for f in prepared.manifest["files"]] == [str(b), str(a)]
    # the same files in another order are another corpus (another cache entry)
    assert prepare(DataConfig(source=[str(a), str(b)], **kw), verbose=False).dir != prepared.dir
    with pytest.raises(DataError, match="^data.source is an empty list: name at least one text file, directory, glob "
                                        "or URL$"):
        resolve_source([], tmp_path)
    with pytest.raises(DataError, match="more than once"):
        resolve_source([str(a), str(tmp_path / "x")], tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        resolve_source([str(a), str(tmp_path / "missing.txt")], tmp_path)


def test_a_list_source_in_a_config_file(tmp_path):
    from gpt_jax.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  source:\n    - one.txt\n    - two/\n")
    assert load_config(path).data.source == ["one.txt", "two/"]
    path.write_text("data:\n  source: 3\n")
    with pytest.raises(ConfigError, match="data.source: expected str or list"):
        load_config(path)


def test_python_stdlib_corpus_is_fixed_and_local_and_leaves_out_tests(tmp_path):
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert not [f for f in files if f.name.startswith("test_")]  # Lib/test, */tests, idlelib/idle_test
    assert resolve_source("python-stdlib", tmp_path) == files


def test_python_stdlib_corpus_leaves_out_each_folder_of_installed_packages_and_tests(tmp_path, monkeypatch):
    import sysconfig

    root = tmp_path / "lib"
    keep = ["a.py", "json/decoder.py", "json/z.py", "lib2to3/fixes/fix_x.py"]
    skip = ["site-packages/p.py", "dist-packages/q/r.py", "test/test_x.py", "tests/t.py", "idlelib/idle_test/i.py",
            "json/__pycache__/decoder.py", "sqlite3/test/s.py"]
    for name in keep + skip + ["README.txt", "json/decoder.pyc"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    assert stdlib_files() == [root / name for name in sorted(keep)]


def test_sentencepiece_trained_on_the_corpus(tmp_path):
    src = tmp_path / "s.txt"
    src.write_text(data_path("tinyshakespeare", "input.txt").read_text()[:200_000])
    prepared = prepare(cfg(tmp_path, src, tokenizer="sentencepiece", sentencepiece_vocab_size=500), verbose=False)
    assert prepared.tokenizer.vocab_size == 500 and prepared.manifest["tokenizer"]["kind"] == "sentencepiece"
    assert (prepared.dir / "tokenizer.model").is_file()
    assert prepared.tokenizer.spec() == {"kind": "sentencepiece", "path": str((prepared.dir / "tokenizer.model").resolve())}
    again = prepare(cfg(tmp_path, src, tokenizer="sentencepiece", sentencepiece_vocab_size=500), verbose=False)
    assert again.tokenizer.encode("To be, or not") == prepared.tokenizer.encode("To be, or not")
    other = tmp_path / "o.txt"
    other.write_text("To be, or not to be: that is the question.\n" * 50)
    given = prepare(cfg(tmp_path, other, tokenizer="sentencepiece", tokenizer_path=str(prepared.dir / "tokenizer.model"),
                        sentencepiece_vocab_size=300), verbose=False)  # a given model is used, not trained anew
    assert given.tokenizer.vocab_size == 500 and not (given.dir / "tokenizer.model").exists()
    assert given.tokenizer.encode("To be, or not") == prepared.tokenizer.encode("To be, or not")


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist: give a text file, a directory, a glob, a URL, or 'python-stdlib'"):
        prepare(cfg(tmp_path, tmp_path / "missing.txt"), verbose=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        prepare(cfg(tmp_path, tmp_path / "empty.txt"), verbose=False)
    with pytest.raises(DataError, match="matches no files"):
        prepare(cfg(tmp_path, tmp_path / "*.nothing"), verbose=False)
    with pytest.raises(DataError, match="set data.source to the local file path"):
        prepare(cfg(tmp_path, "http://127.0.0.1:9/corpus.txt"), verbose=False)
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(DataError, match=re.escape(f"data.source {str(tmp_path / 'one.txt')!r} gave 0 train and 1 val "
                                                  "tokens; it needs text in both splits (use more text or another "
                                                  "data.val_fraction)")):
        prepare(cfg(tmp_path, tmp_path / "one.txt"), verbose=False)
    assert not list((tmp_path / "cache").glob("one-*"))  # nothing of it is left in the cache
    (tmp_path / "ten.txt").write_text("abcdefghi\n")  # one token of val is enough here (training asks for more)
    assert [prepare(cfg(tmp_path, tmp_path / "ten.txt"), verbose=False).manifest[k] for k in ("train_tokens", "val_tokens")] \
        == [9, 1]
    (tmp_path / "locked.txt").write_text("secret")
    os.chmod(tmp_path / "locked.txt", 0)
    if os.getuid() == 0:  # root reads everything: as a user would see it
        monkeypatch.setattr(corpora.os, "access", lambda path, mode: Path(path).name != "locked.txt")
    with pytest.raises(DataError, match=f"^data source file {re.escape(str(tmp_path / 'locked.txt'))} is not readable$"):
        prepare(cfg(tmp_path, tmp_path / "locked.txt"), verbose=False)


TOKENS = np.arange(10_000, dtype=np.uint16)


def test_sampler_is_deterministic_and_resumable():
    a = Sampler(TOKENS, 16, 8, seed=3)
    batches = [a.next() for _ in range(200)]  # crosses epoch boundaries (587 windows / 8 per batch)
    assert a.epoch >= 2
    b = Sampler(TOKENS, 16, 8, seed=3)
    for expected in batches[:50]:
        np.testing.assert_array_equal(b.next(), expected)
    resumed = Sampler(TOKENS, 16, 8, seed=3, **b.state())
    for expected in batches[50:]:
        np.testing.assert_array_equal(resumed.next(), expected)
    assert not np.array_equal(Sampler(TOKENS, 16, 8, seed=4).next(), batches[0])
    assert batches[0].dtype == np.int32 and batches[0].shape == (8, 17)
    # windows are contiguous runs of the stream
    assert np.all(np.diff(batches[0], axis=1) == 1)


def test_sampler_draws_without_replacement_within_an_epoch():
    s = Sampler(TOKENS, 16, 8, seed=0)
    seen = []
    while s.epoch == 0:
        cursor_epoch = s.epoch
        batch = s.next()
        if s.epoch != cursor_epoch:
            break
        seen += [int(row[0]) for row in batch]
    assert len(seen) == len(set(seen)) and len(seen) >= 8 * ((10_000 - 17) // 17 // 8)


def test_each_epoch_reads_every_whole_window_once_at_an_offset_drawn_from_0_to_block_size():
    # The stream is its own positions, so a row names where it starts. Independent of the Sampler's
    # arithmetic: at offset o the whole windows of T + 1 tokens start at o, o + T + 1, ... up to N - T - 1.
    T, N = 4, 203
    s = Sampler(np.arange(N, dtype=np.uint16), T, 1, seed=0)
    rows = []
    while s.epoch < 200:
        row = s.next()[0]
        rows.append((s.epoch, row))
    offsets = []
    for epoch in range(200):
        got = sorted(int(r[0]) for e, r in rows if e == epoch)
        offset = got[0]
        assert 0 <= offset <= T and got == list(range(offset, N - T, T + 1)), epoch
        offsets.append(offset)
    assert all(np.array_equal(r, np.arange(r[0], r[0] + T + 1)) for _, r in rows)
    # every offset 0..T occurs, none outside, near uniformly: 200 draws, 40 expected each. For a
    # random seed, P(a count outside [20, 60]) < 0.3% (binomial tails); seed 0 is fixed, so no flakiness.
    counts = np.bincount(offsets, minlength=T + 1)
    assert len(counts) == T + 1 and counts.min() >= 20 and counts.max() <= 60, counts


def test_sampler_processes_read_their_own_rows():
    whole = Sampler(TOKENS, 16, 8, seed=5)
    parts = [Sampler(TOKENS, 16, 8, seed=5, process_index=p, process_count=4) for p in range(4)]
    for _ in range(10):
        np.testing.assert_array_equal(np.concatenate([p.next() for p in parts]), whole.next())
    with pytest.raises(DataError, match="does not divide"):
        Sampler(TOKENS, 16, 6, seed=0, process_count=4)


def test_eval_batches_are_fixed_and_errors_on_tiny_val():
    a = eval_batches(TOKENS, 16, 4, 3)
    b = eval_batches(TOKENS, 16, 4, 3)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(DataError, match="the val split"):
        eval_batches(TOKENS[:40], 16, 4, 3)


def test_url_source_is_downloaded_once_into_the_cache(tmp_path):
    import functools
    import http.server
    import threading

    served = tmp_path / "www"
    served.mkdir()
    line = "some text to learn from, line after line.\n"
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/corpus.txt"
        with pytest.raises(DataError, match="could not download"):  # not served yet: 404
            prepare(cfg(tmp_path, url), verbose=False)
        (served / "corpus.txt").write_text(line * 300)
        first = prepare(cfg(tmp_path, url), verbose=False)  # the failed try does not get in the way
        second = prepare(cfg(tmp_path, url), verbose=False)
        (tmp_path / "local.txt").write_text(line)
        listed = resolve_source([str(tmp_path / "local.txt"), url], tmp_path / "cache")  # a URL in a list: cached too
    finally:
        server.shutdown()
    assert hits == ["/corpus.txt"] * 2 and second.dir == first.dir
    assert listed == [tmp_path / "local.txt", Path(first.manifest["files"][0]["path"])]
    assert first.manifest["train_tokens"] + first.manifest["val_tokens"] == len(line) * 300
    downloaded = Path(first.manifest["files"][0]["path"])
    assert first.dir.name.startswith("corpus-char-")
    # one folder per URL (the first 16 hex digits of its SHA-256) under the cache's downloads/, the URL's file name
    folder = hashlib.sha256(url.encode()).hexdigest()[:16]
    assert downloaded == tmp_path / "cache" / "downloads" / folder / "corpus.txt"
    assert not list(tmp_path.rglob("*.part"))
    with pytest.raises(DataError, match="could not download https://"):
        resolve_source("https://127.0.0.1:9/corpus.txt", tmp_path)


def test_a_download_from_a_server_that_stops_answering_fails_with_one_line(tmp_path, monkeypatch):
    import socket
    import threading

    monkeypatch.setattr(corpora, "DOWNLOAD_TIMEOUT_S", 0.5)
    server = socket.create_server(("127.0.0.1", 0))  # takes the connection, never answers
    stop = threading.Timer(5, server.close)  # (a download without a time limit would wait for ever)
    stop.start()
    try:
        with pytest.raises(DataError, match="could not download .*timed out"):
            resolve_source(f"http://127.0.0.1:{server.getsockname()[1]}/corpus.txt", tmp_path)
    finally:
        stop.cancel()
        server.close()


def test_progress_is_on_stdout_when_verbose_and_the_command_line_prints_the_counts(tmp_path, capsys):
    src = tmp_path / "reviews.txt"
    src.write_text("It's GOOD!<br />Yes.\n" * 50)  # 1,000 characters
    prepared = prepare(cfg(tmp_path, src, normalize="sst"), verbose=False)
    assert capsys.readouterr() == ("", "")
    # the normalised copies the tokens were made from are gone; the cache holds the tokens, the vocabulary, the manifest
    assert sorted(p.name for p in prepared.dir.iterdir()) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [prepared.dir.name]
    assert data_mod.main([str(src), "--normalize", "sst", "--cache-dir", str(tmp_path / "cli")]) == 0
    out, err = capsys.readouterr()
    assert "normalizing (sst): 100%" in out and "tokenizing reviews: 100%" in out and err == ""
    # "it 's good ! yes .\n" is 19 characters: 950, of which the last tenth is val
    assert out.rstrip().splitlines()[-1].startswith("855 train / 95 val tokens (uint16)")


def test_a_split_is_refused_exactly_when_an_epoch_offset_leaves_less_than_a_batch():
    for T, B in [(4, 1), (4, 3), (7, 2)]:
        for n in range(1, 60):
            fewest = min((n - o) // (T + 1) for o in range(T + 1))  # the sampler's epoch offsets are 0..T
            if fewest >= B:
                check_windows(np.zeros(n), T, B)
                Sampler(np.zeros(n), T, B, seed=0)
                continue
            for split, fix in [("train", "use more text"), ("val", "raise data.val_fraction")]:
                words = f"the {split} split ({n:,} tokens) is smaller than one batch of {B} windows of {T + 1} tokens; {fix}, or"
                with pytest.raises(DataError, match=re.escape(words)):
                    check_windows(np.zeros(n), T, B, split)
            with pytest.raises(DataError, match="the train split"):
                Sampler(np.zeros(n), T, B, seed=0)


def test_check_batches_names_the_split_that_is_too_small(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghij" * 20)
    data = prepare(cfg(tmp_path, tmp_path / "c.txt"), verbose=False)  # 180 train, 20 val tokens
    check_batches(data, 4, 3)  # val: (20 - 4) // 5 = 3 windows at every offset
    with pytest.raises(DataError, match=r"the val split \(20 tokens\).*raise data.val_fraction"):
        check_batches(data, 4, 4)
    with pytest.raises(DataError, match=r"the train split \(180 tokens\).*use more text"):
        check_batches(data, 9, 18)  # train: (180 - 9) // 10 = 17 windows


def test_eval_batches_are_as_many_as_one_epoch_holds_and_never_read_a_token_twice():
    T, B = 4, 2
    for n in range(15, 60):
        fewest = min((n - o) // (T + 1) for o in range(T + 1))
        batches = eval_batches(np.arange(n, dtype=np.uint16), T, B, 100)
        assert len(batches) == fewest // B and all(b.shape == (B, T + 1) for b in batches)
        starts = sorted(int(row[0]) for b in batches for row in b)
        assert all(b - a >= T + 1 for a, b in zip(starts, starts[1:])), n
    whole = eval_batches(TOKENS, 16, 8, 3)
    parts = [eval_batches(TOKENS, 16, 8, 3, process_index=p, process_count=4) for p in range(4)]
    for i, batch in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([part[i] for part in parts]), batch)


def test_a_preparation_cut_off_midway_leaves_no_trace_in_the_next(tmp_path, monkeypatch):
    """A preparation that dies after it started writing (here: its split fails) leaves its unfinished folder;
    the next preparation of the same corpus clears it and starts again, and the cache ends up with one entry."""
    src = tmp_path / "corpus.txt"
    src.write_text("one line of text\n" * 100)

    def cut_off(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(corpora, "split_point", cut_off)
        with pytest.raises(KeyboardInterrupt):
            prepare(cfg(tmp_path, src), verbose=False)
    left = list((tmp_path / "cache").iterdir())
    assert len(left) == 1 and (left[0] / "tokenizer.json").is_file()  # the unfinished folder, part written
    prepared = prepare(cfg(tmp_path, src), verbose=False)
    assert prepared.manifest["train_tokens"] + prepared.manifest["val_tokens"] == 1700
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [prepared.dir.name]
    (prepared.dir / "manifest.json").unlink()  # an entry without its manifest (cut off while renaming, or edited)
    again = prepare(cfg(tmp_path, src), verbose=False)
    assert again.dir == prepared.dir and again.manifest == prepared.manifest


def test_the_split_falls_inside_a_middle_file_and_the_files_after_it_are_val(tmp_path):
    """Three files of 100 bytes, val_fraction 0.5: val starts 50 bytes into the second file and holds the
    whole third file."""
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    for f, letter in zip(files, "abc"):
        f.write_text(letter * 99 + "\n")
    prepared = prepare(DataConfig(source=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), val_fraction=0.5),
                       verbose=False)
    decode = prepared.tokenizer.decode
    assert decode(list(prepared.tokens("train"))) == "a" * 99 + "\n" + "b" * 50
    assert decode(list(prepared.tokens("val"))) == "b" * 49 + "\n" + "c" * 99 + "\n"


@pytest.mark.parametrize("vocab, dtype", [(1 << 16, "uint16"), ((1 << 16) + 1, "uint32")])
def test_token_ids_past_65535_are_stored_in_uint32(tmp_path, vocab, dtype):
    """A character vocabulary of 65,536 ids (0 to 65535) fits uint16; one more needs uint32, and every id
    reads back as written."""
    chars = [chr(c) for c in range(0x100, 0x30000) if not 0xD800 <= c <= 0xDFFF][: vocab - 1]  # and "\n"
    text = "".join("".join(chars[i: i + 1000]) + "\n" for i in range(0, len(chars), 1000))  # lines of 1000
    src = tmp_path / "wide.txt"
    src.write_text(text, encoding="utf-8")
    prepared = prepare(cfg(tmp_path, src, val_fraction=0.01), verbose=False)
    assert prepared.tokenizer.vocab_size == vocab and prepared.manifest["dtype"] == dtype
    ids = np.concatenate([prepared.tokens("train"), prepared.tokens("val")])
    assert prepared.tokenizer.decode(list(ids)) == text and int(ids.max()) == vocab - 1
