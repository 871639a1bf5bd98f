"""Tokenizing text files into train.bin / val.bin: in pieces, in several processes, resumable.

The text (`corpora.TextFile`s) is cut into work items in corpus order: every document, cut where val
starts, in pieces of at most about CHUNK_BYTES that end where no token can span the cut (after "x\ny",
`corpora.text_chunks`) or at the document's end; consecutive pieces of one split make an item of up
to CHUNK_BYTES. Each piece is encoded on its own (with <|endoftext|> after each document when the
corpus holds several), so any number of processes gives the tokens of one, and the tokens are
appended to the split's file in item order.

In the unfinished cache entry, `progress.json` records the stages done (the text copies, the
tokenizer) and `done.json` the items whose tokens are written and flushed; a preparation cut off goes
on from the last item recorded, and one that cannot says so and starts over in an emptied folder.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_jax import corpora
from gpt_jax.corpora import DataError, TextFile
from gpt_jax.tokenizer import load_tokenizer

PROGRESS = "progress.json"  # the stages done: text copies, tokenizer
DONE = "done.json"  # the work items whose tokens are in train.bin / val.bin, rewritten after each


def write_json(path: Path, value) -> None:
    """Whole or not at all: a file cut off while written is never read back."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value, indent=1))
    os.replace(part, path)


def _usable(tmp: Path, state: dict, done: dict | None) -> bool:
    if state["chunk_bytes"] != corpora.CHUNK_BYTES:
        return False  # cut into other pieces: its item count means nothing here
    # files shorter than recorded were not all written (a crash of the machine): nothing of them is trusted
    return done is None or all((tmp / f"{split}.bin").stat().st_size >= done[split] * done["itemsize"]
                               for split in ("train", "val"))


def resume_state(tmp: Path, verbose: bool) -> dict:
    """What an unfinished preparation in `tmp` finished, to go on from; else a fresh state in an emptied
    `tmp`. Keys: "texts" (the text copies are whole), "tokenizer" (its spec), "done" (work items written)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # multiprocessing's own test of this
        raise DataError("data is being prepared while a tokenizing process starts: the script that prepares it runs "
                        "it at import; put that under if __name__ == \"__main__\": (spawned processes import the "
                        "script), or set data.num_proc=1")
    try:
        state = json.loads((tmp / PROGRESS).read_text())
        done = json.loads((tmp / DONE).read_text()) if (tmp / DONE).exists() else None
        usable = _usable(tmp, state, done)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        usable = False
    if usable:
        if verbose:
            print(f"resuming the unfinished preparation in {tmp}: " + (f"{done['bytes']:,} bytes of text were "
                  "tokenized" if done else "its text and tokenizer are reused"))
        return {**state, "done": done} if done else state
    if tmp.exists() and verbose:
        print(f"starting over: {tmp} holds an unfinished preparation that cannot be resumed")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return {"chunk_bytes": corpora.CHUNK_BYTES}


def save_state(tmp: Path, state: dict) -> None:
    write_json(tmp / PROGRESS, {k: v for k, v in state.items() if k != "done"})


def dtype_for(tok) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)


def _documents(texts: list[TextFile], split_file: int, split_byte: int):
    """(split, path, start, stop, ends a document) of every document in corpus order, cut where val starts."""
    for i, t in enumerate(texts):
        cut = split_byte if i == split_file else (math.inf if i < split_file else -1)  # -1: an empty file is val too
        start = 0
        for end in t.document_ends():
            if start < cut < end:
                yield "train", t.path, start, cut, False
                yield "val", t.path, cut, end, True
            else:
                yield "train" if end <= cut else "val", t.path, start, end, True
            start = end


def _pieces(documents, eot: bool):
    """The documents' ranges, those over CHUNK_BYTES cut where no token spans the cut; the last piece
    of a document is marked for an end-of-text token when `eot` (the corpus holds several)."""
    for split, path, start, stop, ends in documents:
        if stop - start <= corpora.CHUNK_BYTES:
            yield split, path, start, stop, eot and ends
            continue
        for chunk in corpora.text_chunks(path, start, stop):
            n = len(chunk.encode("utf-8"))
            yield split, path, start, start + n, eot and ends and start + n == stop
            start += n


def _work(pieces):
    """Work items: (split, [(path, start, stop, eot), ...]), consecutive pieces of one split that together
    hold at most about CHUNK_BYTES (many small files make one item)."""
    split, group, size = None, [], 0
    for piece_split, path, start, stop, eot in pieces:
        if group and (piece_split != split or size + stop - start > corpora.CHUNK_BYTES):
            yield split, group
            group, size = [], 0
        split = piece_split
        group.append((str(path), start, stop, eot))
        size += stop - start
    if group:
        yield split, group


def _encode(tok, dtype, item) -> np.ndarray:
    ids: list[int] = []
    for path, pieces in itertools.groupby(item[1], key=lambda piece: piece[0]):
        with open(path, "rb") as f:
            for _, start, stop, eot in pieces:
                f.seek(start)
                ids += tok.encode(corpora.decode_text(f.read(stop - start), path, start))
                if eot and tok.eot_id is not None:
                    ids.append(tok.eot_id)
    return np.asarray(ids, dtype)


_WORKER: dict = {}


def _start_worker(spec: dict, dtype: str) -> None:
    _WORKER.update(tok=load_tokenizer(spec), dtype=np.dtype(dtype))


def _encode_in_worker(item) -> np.ndarray:
    return _encode(_WORKER["tok"], _WORKER["dtype"], item)


class ProcessesLost(DataError):
    """A tokenizing process ended before its work did; what is written is kept for the next run."""


def _encoded(items, tok, num_proc: int):
    """(item, its token ids) for each work item, in order. With num_proc > 1, spawned processes encode
    (never forked: JAX may run threads here); 2 items a process are in flight, so memory stays bounded.
    A process that dies (killed, out of memory) stops the run with one line instead of a wait for ever."""
    if num_proc <= 1:
        yield from ((item, _encode(tok, dtype_for(tok), item)) for item in items)
        return
    items = iter(items)
    pool = ProcessPoolExecutor(num_proc, multiprocessing.get_context("spawn"), _start_worker,
                               (tok.spec(), dtype_for(tok).name))

    def submit(n):
        return [(item, pool.submit(_encode_in_worker, item)) for item in itertools.islice(items, n)]
    try:
        pending = collections.deque(submit(2 * num_proc))
        while pending:
            item, result = pending.popleft()
            pending.extend(submit(1))  # before waiting, so the processes never wait for work
            yield item, result.result()
    except BrokenProcessPool:
        raise ProcessesLost("a tokenizing process ended before its work did (killed, or out of memory; or a script "
                            "that prepares data at import, without if __name__ == \"__main__\":, which the spawned "
                            "processes import); rerun to go on from the last piece written, or set "
                            "data.num_proc=1") from None
    finally:
        pool.shutdown(cancel_futures=True)


def tokenize(texts: list[TextFile], tok, val_fraction: float, num_proc: int | None, tmp: Path, state: dict, desc: str,
             verbose: bool) -> dict:
    """Append the tokens of every work item after those `state` records as done to train.bin / val.bin,
    recording each item as done once its tokens are written; returns the token counts."""
    split_file, split_byte = corpora.split_point([t.path for t in texts], val_fraction)
    items = _work(_pieces(_documents(texts, split_file, split_byte), sum(t.documents for t in texts) > 1))
    itemsize = dtype_for(tok).itemsize
    done = state.get("done") or {"items": 0, "bytes": 0, "train": 0, "val": 0, "itemsize": itemsize}
    total = sum(t.path.stat().st_size for t in texts)
    num_proc = min(num_proc or os.cpu_count() or 1, -(-(total - done["bytes"]) // corpora.CHUNK_BYTES))
    with open(tmp / "train.bin", "a+b") as train_f, open(tmp / "val.bin", "a+b") as val_f, \
            tqdm(total=total, initial=done["bytes"], unit="B", unit_scale=True, desc=desc, disable=not verbose,
                 file=sys.stdout) as bar:
        sinks = {"train": train_f, "val": val_f}
        for split, f in sinks.items():
            f.truncate(done[split] * itemsize)  # tokens written after the last recorded item are written again
        for item, ids in _encoded(itertools.islice(items, done["items"], None), tok, num_proc):
            sinks[item[0]].write(ids.tobytes())
            sinks[item[0]].flush()
            size = sum(stop - start for _, start, stop, _ in item[1])
            done = {**done, "items": done["items"] + 1, "bytes": done["bytes"] + size,
                    item[0]: done[item[0]] + len(ids)}
            write_json(tmp / DONE, done)
            bar.update(size)
    return done
