"""Every core: tokenizing in several processes gives the tokens of one, in one progress bar of bytes; a
preparation killed half-way goes on from the last piece it wrote, and one that cannot says so and
starts over, never trusting half-written files."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, data_path
from gpt_jax import corpora, tokenizing
from gpt_jax.config import DataConfig
from gpt_jax.data import prepare


def corpus(tmp_path):
    """A list source: Tiny Shakespeare (1.1 MB, many pieces), a folder of small files and JSONL records."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(5):
        (docs / f"{i}.txt").write_text(f"document {i}\n" * (i * 40))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"text": f"record {i}\n" * i}) + "\n" for i in range(30)))
    return [str(data_path("tinyshakespeare", "input.txt")), str(docs), str(tmp_path / "r.jsonl")]


def cfg(cache, source, **kw):
    return DataConfig(source=source, tokenizer="gpt2", tokenizer_path=str(data_path("gpt2-bpe")), cache_dir=str(cache),
                      **kw)


def tokens(prepared):
    return [np.asarray(prepared.tokens(s)) for s in ("train", "val")]


class Bar:
    """tqdm's interface, recording each bar made and what it was told."""
    made: list = []

    def __init__(self, **kw):
        self.kw, self.total_updates = kw, 0
        Bar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.total_updates += n


def test_any_number_of_processes_gives_the_tokens_of_one_in_one_bar_of_bytes(tmp_path, monkeypatch):
    source = corpus(tmp_path)
    whole = prepare(cfg(tmp_path / "whole", source, num_proc=1), verbose=False)  # 8 MB pieces: the corpus in one go
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 1 << 16)  # 64 KB pieces: about 20 work items
    monkeypatch.setattr(tokenizing, "tqdm", Bar)
    Bar.made = []
    two = prepare(cfg(tmp_path / "two", source, num_proc=2), verbose=True)
    for a, b in zip(tokens(two), tokens(whole)):
        np.testing.assert_array_equal(a, b)
    text_bytes = sum(f.stat().st_size for f in corpora.resolve_source(source[:2], tmp_path)) + \
        sum(len(f"record {i}\n".encode()) * i for i in range(30))
    [bar] = Bar.made
    assert (bar.kw["unit"], bar.kw["total"], bar.kw["initial"], bar.total_updates) == ("B", text_bytes, 0, text_bytes)
    # how many processes is no part of the cache key: the same entry serves any number
    assert prepare(cfg(tmp_path / "two", source, num_proc=1), verbose=False).dir == two.dir


KILLED_RUN = """
import sys, time
from gpt_jax import corpora, tokenizing
from gpt_jax.config import DataConfig
from gpt_jax.data import prepare

corpora.CHUNK_BYTES = 1 << 16
write_json = tokenizing.write_json

def slowly(path, value):  # a slow machine, so the test has time to kill it between pieces
    write_json(path, value)
    if path.name == tokenizing.DONE:
        time.sleep(0.2)

tokenizing.write_json = slowly
prepare(DataConfig(source=sys.argv[1], tokenizer="gpt2", tokenizer_path=sys.argv[2], cache_dir=sys.argv[3],
                   num_proc=2), verbose=False)
"""


def kill_half_way(source, cache):
    """Run a 2-process preparation and SIGKILL it (and its workers) once 3 work items are written; what
    its done.json recorded."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, source, str(data_path("gpt2-bpe")), str(cache)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            found = list(cache.glob(f"*.tmp/{tokenizing.DONE}"))
            if found and json.loads(found[0].read_text())["items"] >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the run and the processes it spawned
        proc.wait()
    return json.loads(found[0].read_text())


def test_a_preparation_killed_half_way_resumes_without_redoing_finished_pieces(tmp_path, monkeypatch, capsys):
    source = str(data_path("tinyshakespeare", "input.txt"))
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 1 << 16)
    encoded, encode = [], tokenizing._encode
    monkeypatch.setattr(tokenizing, "_encode",
                        lambda tok, dtype, item: encoded.append(item) or encode(tok, dtype, item))
    fresh = prepare(cfg(tmp_path / "fresh", source, num_proc=1), verbose=False)
    items, encoded[:] = list(encoded), []

    done = kill_half_way(source, tmp_path / "cache")
    assert 3 <= done["items"] < len(items) - 3  # really half-way
    [unfinished] = (tmp_path / "cache").iterdir()
    assert unfinished.name.endswith(".tmp") and not (unfinished / "manifest.json").exists()
    resumed = prepare(cfg(tmp_path / "cache", source, num_proc=1), verbose=True)
    assert f"resuming the unfinished preparation in {unfinished}: {done['bytes']:,} bytes of text were tokenized" \
        in capsys.readouterr().out
    assert encoded == items[done["items"]:]  # the items written before the kill are not encoded again
    for a, b in zip(tokens(resumed), tokens(fresh)):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [resumed.dir.name]
    assert sorted(p.name for p in resumed.dir.iterdir()) == ["manifest.json", "train.bin", "val.bin"]


class Stop(Exception):
    pass


def cut_off_after(n_items, monkeypatch):
    """Make the next preparation stop (as if killed) once `n_items` work items are recorded."""
    write_json = tokenizing.write_json

    def stop(path, value):
        write_json(path, value)
        if path.name == tokenizing.DONE and value["items"] == n_items:
            raise Stop

    monkeypatch.setattr(tokenizing, "write_json", stop)


@pytest.mark.parametrize("damage", ["chunk_bytes", "short_file"])
def test_an_unfinished_preparation_that_cannot_resume_says_so_and_starts_over(tmp_path, monkeypatch, capsys, damage):
    source = str(data_path("tinyshakespeare", "input.txt"))
    expected = tokens(prepare(cfg(tmp_path / "fresh", source, num_proc=1), verbose=False))
    with monkeypatch.context() as m:
        m.setattr(corpora, "CHUNK_BYTES", 1 << 16)
        cut_off_after(4, m)
        with pytest.raises(Stop):
            prepare(cfg(tmp_path / "cache", source, num_proc=1), verbose=False)
    [unfinished] = (tmp_path / "cache").iterdir()
    if damage == "chunk_bytes":  # cut into other pieces (CHUNK_BYTES is back to 8 MB): its item count means nothing
        pass
    else:  # the machine went down: train.bin holds fewer tokens than done.json says were written
        monkeypatch.setattr(corpora, "CHUNK_BYTES", 1 << 16)
        with open(unfinished / "train.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 2)
    resumed = prepare(cfg(tmp_path / "cache", source, num_proc=1), verbose=True)
    out = capsys.readouterr().out
    assert f"starting over: {unfinished} holds an unfinished preparation that cannot be resumed" in out
    for a, b in zip(tokens(resumed), expected):
        np.testing.assert_array_equal(a, b)


UNGUARDED_SCRIPT = """
import sys
from gpt_jax import corpora
from gpt_jax.config import DataConfig
from gpt_jax.data import prepare

corpora.CHUNK_BYTES = 1 << 16
prepare(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], num_proc=2), verbose=False)  # at import: no guard
"""


def test_a_script_that_prepares_at_import_stops_with_one_line_and_keeps_its_work(tmp_path, monkeypatch):
    """Spawned processes import the main script; one that prepares data at import would start the
    preparation again in each of them. They stop before touching the cache, and the run ends with one
    line naming the fix (a multiprocessing.Pool would wait for ever, starting processes again)."""
    script = tmp_path / "prepare_at_import.py"
    script.write_text(UNGUARDED_SCRIPT)
    source = str(data_path("tinyshakespeare", "input.txt"))
    proc = subprocess.run([sys.executable, str(script), source, str(tmp_path / "cache")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("gpt_jax.tokenizing.ProcessesLost: a tokenizing process ended "
                                                    "before its work did"), proc.stderr[-3000:]
    assert 'if __name__ == "__main__":' in last and "data.num_proc=1" in last
    monkeypatch.setattr(corpora, "CHUNK_BYTES", 1 << 16)  # what it wrote is kept, and the next run goes on from it
    resumed = prepare(DataConfig(source=source, cache_dir=str(tmp_path / "cache"), num_proc=1), verbose=False)
    fresh = prepare(DataConfig(source=source, cache_dir=str(tmp_path / "fresh"), num_proc=1), verbose=False)
    for a, b in zip(tokens(resumed), tokens(fresh)):
        np.testing.assert_array_equal(a, b)
