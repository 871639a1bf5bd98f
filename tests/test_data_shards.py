"""llm.c token shards as a data source: read in place (no re-tokenizing, no copy), headers checked
against the published layout, GPT-2 ids only, *_train_* / *_val_* shards as the splits; and
`python -m gpt_jax.data --format llmc` writes shards that read back as the prepared tokens."""

import os
import re
import struct

import numpy as np
import pytest

from conftest import data_path
from gpt_jax import data as data_mod
from gpt_jax import shards
from gpt_jax.config import DataConfig
from gpt_jax.data import DataError, Sampler, eval_batches, prepare
from gpt_jax.shards import TokenStream


def write_llmc(path, tokens, version=1, magic=20240520, count=None):
    """A shard as llm.c's dev/data/data_common.py lays it out: 256 little-endian int32 (magic, version,
    token count, zeros), then the tokens as uint16 (version 1) or uint32 (version 2)."""
    tokens = np.asarray(tokens)
    header = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *[0] * 253)
    path.write_bytes(header + tokens.astype("<u2" if version == 1 else "<u4").tobytes())
    return path


def gpt2_ids(n, seed):
    ids = np.random.default_rng(seed).integers(0, 50257, n)
    ids[:: 97] = 50256  # <|endoftext|> between documents, as llm.c writes it
    return ids


def cfg(tmp_path, source, **kw):
    return DataConfig(source=source if isinstance(source, list) else str(source), tokenizer="gpt2",
                      tokenizer_path=str(data_path("gpt2-bpe")), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture
def fineweb(tmp_path):
    """A val shard and two train shards named as llm.c's fineweb.py names them, and their tokens."""
    folder = tmp_path / "fineweb10B"
    folder.mkdir()
    val, train1, train2 = gpt2_ids(3000, 0), gpt2_ids(5000, 1), gpt2_ids(4000, 2)
    write_llmc(folder / "fineweb_val_000000.bin", val)
    write_llmc(folder / "fineweb_train_000001.bin", train1)
    write_llmc(folder / "fineweb_train_000002.bin", train2, version=2)  # uint32 tokens are read too
    return folder, np.concatenate([train1, train2]), val


def test_shards_are_the_two_splits_read_in_place(tmp_path, fineweb):
    folder, train, val = fineweb
    prepared = prepare(cfg(tmp_path, folder), verbose=False)
    m = prepared.manifest
    assert (m["train_tokens"], m["val_tokens"], m["format"], m["vocab_size"]) == (9000, 3000, "llmc", 50257)
    np.testing.assert_array_equal(np.asarray(prepared.tokens("train")), train)
    np.testing.assert_array_equal(np.asarray(prepared.tokens("val")), val)
    assert [p.name for p in prepared.dir.iterdir()] == ["manifest.json"]  # no copy of a token
    window = prepared.tokens("train")[100:400]  # inside the first shard: a view of its memory map
    assert isinstance(window, np.memmap) and str(window.filename) == str(folder / "fineweb_train_000001.bin")
    assert not window.flags.writeable
    np.testing.assert_array_equal(prepared.tokens("train")[4990:5010], train[4990:5010])  # across two shards
    assert prepared.tokenizer.kind == "gpt2" and prepared.tokenizer.vocab_size == 50257


def test_the_sampler_reads_a_shard_stream_as_it_reads_one_array(tmp_path, fineweb):
    folder, train, val = fineweb
    prepared = prepare(cfg(tmp_path, folder), verbose=False)
    stream, whole = Sampler(prepared.tokens("train"), 64, 8, seed=1), Sampler(train, 64, 8, seed=1)
    for _ in range(40):  # past an epoch: windows across the shard boundary included
        np.testing.assert_array_equal(stream.next(), whole.next())
    for a, b in zip(eval_batches(prepared.tokens("val"), 32, 4, 5), eval_batches(val, 32, 4, 5)):
        np.testing.assert_array_equal(a, b)


def test_without_val_shards_val_is_the_last_fraction_of_the_train_tokens(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    a, b = gpt2_ids(700, 3), gpt2_ids(300, 4)
    write_llmc(folder / "tiny_train_000000.bin", a)
    write_llmc(folder / "tiny_train_000001.bin", b)
    prepared = prepare(cfg(tmp_path, folder, val_fraction=0.25), verbose=False)
    whole = np.concatenate([a, b])
    np.testing.assert_array_equal(np.asarray(prepared.tokens("train")), whole[:750])
    np.testing.assert_array_equal(np.asarray(prepared.tokens("val")), whole[750:])


def test_llmc_tiny_shakespeare_names_give_the_splits(tmp_path):
    """llm.c's tinyshakespeare.py writes tiny_shakespeare_val.bin and tiny_shakespeare_train.bin."""
    folder = tmp_path / "tinyshakespeare"
    folder.mkdir()
    write_llmc(folder / "tiny_shakespeare_val.bin", gpt2_ids(100, 5))
    write_llmc(folder / "tiny_shakespeare_train.bin", gpt2_ids(900, 6))
    m = prepare(cfg(tmp_path, folder / "*.bin"), verbose=False).manifest
    assert (m["train_tokens"], m["val_tokens"]) == (900, 100)
    assert re.fullmatch(r"tiny_shakespeare-llmc-[0-9a-f]{16}", prepare(cfg(tmp_path, folder), verbose=False).dir.name)


def test_bad_shards_are_one_line_naming_the_file(tmp_path):
    ids = gpt2_ids(1000, 7)
    cases = {
        "magic": (write_llmc(tmp_path / "a_train_0.bin", ids, magic=20240801), "is not an llm.c token shard: its header "
                  "starts with 20240801, not the magic 20240520"),
        "raw": (tmp_path / "train.bin", "is not an llm.c token shard"),  # gpt_jax's own token file has no header
        "cut": (tmp_path / "c_train_0.bin", "its llm.c header says 1,000 tokens, 3,024 bytes with the header, but the "
                "file holds 2,024 bytes: it is cut short or damaged"),
        "count": (write_llmc(tmp_path / "d_train_0.bin", ids, count=999), "its llm.c header says 999 tokens, 3,022 bytes"),
        "short": (tmp_path / "e_train_0.bin", "its 100 bytes are fewer than the 1,024 of an llm.c header: it is cut short"),
        "version": (write_llmc(tmp_path / "f_train_0.bin", ids, version=3), "llm.c shard version 3 is not one this reads"),
        "tiny": (tmp_path / "g_train_0.bin", "is not an llm.c token shard: it holds 2 bytes, no header"),
        "llama": (write_llmc(tmp_path / "h_train_0.bin", np.append(ids, 128000), version=2),
                  "holds token id 128,000, outside GPT-2's 50,257 ids"),
    }
    ids.astype("<u2").tofile(tmp_path / "train.bin")
    (tmp_path / "c_train_0.bin").write_bytes(write_llmc(tmp_path / "whole.bin", ids).read_bytes()[:-1000])
    (tmp_path / "e_train_0.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:100])
    (tmp_path / "g_train_0.bin").write_bytes(b"\x01\x02")
    for name, (path, words) in cases.items():
        with pytest.raises(DataError, match="^" + re.escape(f"{path}") + ":? " + re.escape(words)) as err:
            prepare(cfg(tmp_path, path), verbose=False)
        assert "\n" not in str(err.value), name
    with pytest.raises(DataError, match="holds llm.c token shards, which are GPT-2 tokens; set data.tokenizer=gpt2"):
        prepare(DataConfig(source=str(tmp_path / "whole.bin"), tokenizer="char", cache_dir=str(tmp_path / "cache")),
                verbose=False)
    with pytest.raises(DataError, match=re.escape(f"the llm.c shards ({tmp_path / 'x_val_000000.bin'}, ...) are all "
                                                  "val shards; add the *_train_* shards")):
        prepare(cfg(tmp_path, write_llmc(tmp_path / "x_val_000000.bin", ids)), verbose=False)
    (tmp_path / "notes.txt").write_text("some text\n")
    with pytest.raises(DataError, match="mixes llm.c token shards .* with other files .*notes.txt"):
        prepare(cfg(tmp_path, [str(tmp_path / "whole.bin"), str(tmp_path / "notes.txt")]), verbose=False)


def test_the_token_range_is_scanned_once_while_the_shards_are_unchanged(tmp_path, fineweb, monkeypatch):
    folder, train, _ = fineweb
    first = prepare(cfg(tmp_path, folder), verbose=False)
    scans = []
    monkeypatch.setattr(shards, "check_gpt2_range", lambda found, vocab: scans.append(len(found)))
    assert prepare(cfg(tmp_path, folder), verbose=False).dir == first.dir and scans == []
    shard = folder / "fineweb_train_000001.bin"
    write_llmc(shard, np.full(5000, 60000), version=2)  # rewritten: a new size and time, scanned again
    os.utime(shard, ns=(1, 1))
    assert prepare(cfg(tmp_path, folder), verbose=False).dir != first.dir and scans == [3]


def test_a_token_stream_reads_windows_as_the_concatenation_does():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, n).astype(np.uint16) for n in (5, 0, 1, 7, 0, 4)]
    whole = np.concatenate(parts)
    for start, stop in [(0, None), (3, 15), (5, 6)]:
        stream, ref = TokenStream(parts, start, stop), whole[start:stop]
        assert len(stream) == len(ref)
        for a in range(len(ref) + 1):
            for b in range(a, len(ref) + 2):
                np.testing.assert_array_equal(stream[a:b], ref[a:b])
        assert [stream[i] for i in range(-len(ref), len(ref))] == ref[-len(ref):].tolist() + ref.tolist()
        assert list(stream) == ref.tolist()
        with pytest.raises(IndexError):
            stream[len(ref)]
    with pytest.raises(IndexError, match="no step"):
        TokenStream(parts)[::2]


def test_prepared_tokens_written_as_llmc_shards_follow_the_layout_and_read_back(tmp_path, monkeypatch, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text(data_path("tinyshakespeare", "input.txt").read_text()[:60_000])
    monkeypatch.setattr(shards, "SHARD_TOKENS", 4000)
    out = tmp_path / "llmc"
    args = [str(src), "--tokenizer", "gpt2", "--tokenizer-path", str(data_path("gpt2-bpe")), "--cache-dir",
            str(tmp_path / "cache"), "--format", "llmc", "--out-dir", str(out), "--num-proc", "1"]
    assert data_mod.main(args) == 0
    prepared = prepare(cfg(tmp_path, src), verbose=False)
    names = sorted(p.name for p in out.iterdir())
    n_val, n_train = -(-prepared.manifest["val_tokens"] // 4000), -(-prepared.manifest["train_tokens"] // 4000)
    assert n_val == 1 and names == sorted([f"corpus_val_{0:06d}.bin"] + [f"corpus_train_{i:06d}.bin"
                                                                         for i in range(1, n_train + 1)])
    tokens = {}
    for name in names:  # read with llm.c's layout, not with gpt_jax's reader
        raw = (out / name).read_bytes()
        magic, version, count = struct.unpack("<3i", raw[:12])
        assert (magic, version, len(raw)) == (20240520, 1, 1024 + 2 * count) and count <= 4000
        tokens.setdefault("val" if "_val_" in name else "train", []).append(np.frombuffer(raw[1024:], "<u2"))
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.concatenate(tokens[split]), prepared.tokens(split))
    again = prepare(cfg(tmp_path, out), verbose=False)  # and they are a source
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(again.tokens(split)), prepared.tokens(split))
    assert capsys.readouterr().out.rstrip().endswith(f"{len(names)} llm.c shard(s) in {out}")
    with pytest.raises(DataError, match="--format llmc writes GPT-2 tokens"):
        data_mod._write_llmc(prepare(DataConfig(source=str(src), cache_dir=str(tmp_path / "c")), verbose=False), None)
