"""A run directory belongs to one run.

- `lock_run_dir`: an advisory lock (`flock` on `.lock`, which holds the owner's pid and host), so a
  second process on the same `train.out_dir` stops at once. The kernel drops the lock when its
  process dies, so the lock of a killed run is simply taken over.
- `resume_check`: whether a checkpoint found there belongs to this command: the same model, task
  and tokenizer, and an optimizer whose state has the same arrays. A checkpoint that does not is
  never touched; the run stops with what differs and the two ways out.
- `drop_torn_line` / `read_jsonl`: metrics.jsonl survives a write cut short (power loss).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
from pathlib import Path


class RunDirError(Exception):
    """The run directory is in use, or holds a run or checkpoint that does not match the command."""


LOCK_FILE = ".lock"


class RunLock:
    """An exclusive flock on RUN/.lock, held until `release` (or the process ends)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().split() or ["unknown"]
            self.file.close()
            where = f" on host {owner[1]}" if len(owner) > 1 and owner[1] != socket.gethostname() else ""
            raise RunDirError(f"{run_dir} is in use by process {owner[0]}{where} (another run on this train.out_dir); "
                              "wait for it to finish or set another train.out_dir") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()} {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def lock_run_dir(run_dir) -> RunLock | None:
    """Create `run_dir` and lock it for this run; a multi-host run locks once, on process 0, and every
    process stops if that fails. None on the other processes."""
    import jax

    from gpt_jax.distributed import any_process

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            lock = RunLock(Path(run_dir))
        except (RunDirError, OSError) as e:
            error = e
    if any_process(error is not None):
        raise error if error is not None else RunDirError(f"process 0 could not lock {run_dir}; see its message")
    return lock


def check_new_run_dir(run_dir) -> None:
    """For a run that never resumes (fine-tuning): a directory that already holds checkpoints (or a
    fine-tuning run) belongs to another run, and is refused before anything in it is written."""
    held = [p for name in ("checkpoints", "best") for p in sorted((Path(run_dir) / name).glob("*"))]
    held += [p for p in [Path(run_dir) / "finetune.json"] if p.exists()]
    if held:
        raise RunDirError(f"{run_dir} already holds a run ({held[0]}); fine-tuning starts afresh from "
                          "finetune.init_from and does not resume: set another train.out_dir (or delete this one)")


def lock_new_run_dir(run_dir) -> RunLock | None:
    """`lock_run_dir`, then `check_new_run_dir` under the lock."""
    lock = lock_run_dir(run_dir)
    try:
        check_new_run_dir(run_dir)
    except RunDirError:
        if lock is not None:
            lock.release()
        raise
    return lock


# --- does a checkpoint belong to this command? ---------------------------------------------------

_HOW_IT_RUNS = {"model.remat", "model.attention", "model.attention_platform", "model.scan_layers", "model.dtype"}  # not what the model is


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "fields":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _defines_run(key: str) -> bool:
    """A setting that makes another run: the model, the task."""
    return (key.startswith("model.") and key not in _HOW_IT_RUNS) or key in ("mode", "finetune.task")


def _shapes_state(key: str) -> bool:
    """A setting that may change which arrays the state holds (optimizer, head, vocabulary)."""
    return key.startswith(("model.", "optim.", "finetune.")) or key.startswith("data.tokenizer")


def _file_digest(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (OSError, TypeError):
        return None


def _tokenizer_change(saved: dict | None, now: dict) -> str | None:
    """What differs between two tokenizer specs, or None: char vocabularies by their characters, a
    sentencepiece model by its file's contents, a BPE by its kind (its files are fixed)."""
    if saved is None:
        return None
    if saved.get("kind") != now.get("kind"):
        return f"the tokenizer (saved {saved.get('kind')}, now {now.get('kind')})"
    if now["kind"] == "char" and saved.get("chars") != now["chars"]:
        new, gone = set(now["chars"]) - set(saved.get("chars", "")), set(saved.get("chars", "")) - set(now["chars"])
        return (f"the character vocabulary (saved {len(saved.get('chars', ''))} characters, now {len(now['chars'])}; "
                f"new {''.join(sorted(new))[:20]!r}, gone {''.join(sorted(gone))[:20]!r})")
    if now["kind"] == "sentencepiece" and _file_digest(saved.get("path")) not in (None, _file_digest(now["path"])):
        return f"the sentencepiece model (saved {saved.get('path')}, now {now['path']}: other contents)"
    return None


BEFORE_IT_EXISTED = {"model.pad_vocab_multiple": 1}  # what runs saved before a setting existed used


def resume_check(run_dir, config, tokenizer):
    """check(meta, differences) for `Checkpointer.restore_latest`: raises RunDirError when the checkpoint
    (its saved config, its arrays' `differences` from this command's state) belongs to another run.
    Returning means the config agrees; array differences left then are damage."""
    run_dir = Path(run_dir)
    now = _flat(config.to_dict())
    saved_tok = run_dir / "tokenizer.json"
    tokenizer_change = _tokenizer_change(json.loads(saved_tok.read_text()) if saved_tok.is_file() else None,
                                         tokenizer.spec())

    def check(meta: dict, differences: list[str]) -> None:
        saved = _flat(meta.get("config") or {})
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
        reasons = [f"{k} (saved {a}, now {b})" for k, (a, b) in changed.items() if _defines_run(k)]
        reasons += [tokenizer_change] if tokenizer_change else []
        if (run_dir / "finetune.json").is_file() and now.get("mode") != "finetune":
            reasons.append("it is a fine-tuning run (finetune.json), and this command pretrains")
        if differences and not reasons:
            state_keys = [f"{k} (saved {a}, now {b})" for k, (a, b) in changed.items() if _shapes_state(k)]
            state_keys += [f"{k} (not in the saved config, now {v}; the run's value is {BEFORE_IT_EXISTED[k]}: add "
                           f"{k}={BEFORE_IT_EXISTED[k]} to resume it)" if k in BEFORE_IT_EXISTED else
                           f"{k} (not in the saved config, now {v})" for k, v in now.items()
                           if saved and k not in saved and _shapes_state(k)]  # a setting newer than the run
            if state_keys or not saved:
                reasons.append(", ".join(state_keys or ["its saved config is missing"]) + " changes the arrays of the "
                               f"state ({'; '.join(differences[:2])})")
        if reasons:
            raise RunDirError(f"{run_dir} holds a run that does not match this command: {'; '.join(reasons)}. "
                              f"Resume it with its saved settings (python train.py --config {run_dir / 'config.yaml'}) "
                              "or set another train.out_dir for a new run")

    return check


# --- metrics.jsonl ---------------------------------------------------------------------------------

def drop_torn_line(path) -> None:
    """Cut a last line that was never finished (no newline: its writer died mid-write), with a warning,
    so that appending starts on a line of its own."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    print(f"warning: dropped a torn last line of {path} ({len(data) - keep} bytes, written when the run was cut "
          "off)", file=sys.stderr)


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file; a line that does not parse is skipped with a warning."""
    records, bad = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
    if bad:
        print(f"warning: skipped {bad} damaged line(s) of {path}", file=sys.stderr)
    return records
