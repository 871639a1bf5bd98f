"""Orbax checkpoints of the whole training state, saved asynchronously; the last N (and every k-th
step, if asked) and the best kept.

A checkpoint holds the train state (params, optimizer state, step, RNG) and a JSON part (sampler
state, resolved config, best validation loss, and a checksum of every array). Orbax writes each
step to a temporary folder and renames it when complete, so a run killed mid-save leaves no half
checkpoint under a step name.

`restore_latest` tells two failures apart. A checkpoint that cannot be read (damaged or partial
files, an array whose checksum differs) is reported and moved to `corrupt/` in the run directory,
and the one before it is tried. A readable checkpoint that does not belong to the command (its
saved config or its arrays differ from what the command builds) stops the command with RunDirError
and is left as it is. What orbax, TensorStore and asyncio log meanwhile (tracebacks of the failed
reads, more or fewer by timing) goes to `orbax.log` in the run directory, not the terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gpt_jax.distributed import barrier
from gpt_jax.rundir import RunDirError

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def checksums(tree):
    """Per array: the sum of its bits (as unsigned words) times odd weights 2 * index + 1, mod 2^32.
    Any single flipped bit changes it (2^k times an odd number is never 0 mod 2^32)."""
    def one(x):
        x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
        bits = jax.lax.bitcast_convert_type(x, _UINT.get(x.dtype.itemsize, jnp.uint8)).astype(jnp.uint32)
        index = jnp.zeros(bits.shape, jnp.uint32)
        for d, n in enumerate(bits.shape):
            index = index * n + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d)
        return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)

    return jax.tree.map(one, tree)


def _path(keys) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _named_checksums(tree) -> dict[str, int]:
    values = jax.device_get(checksums(tree))
    return {_path(p): int(v) for p, v in jax.tree_util.tree_flatten_with_path(values)[0]}


def array_differences(saved_tree, target) -> list[str]:
    """How the saved arrays (orbax tree metadata) differ from `target`'s: names, shapes, dtypes."""
    def arrays(tree):
        return {_path(p): (tuple(x.shape), str(jnp.dtype(x.dtype))) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    saved, now = arrays(saved_tree), arrays(target)
    out = [f"{k}: saved {saved[k][0]} {saved[k][1]}, now {now[k][0]} {now[k][1]}"
           for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]
    only_saved, only_now = sorted(saved.keys() - now.keys()), sorted(now.keys() - saved.keys())
    if only_saved:
        out.append(f"{len(only_saved)} array(s) only in the checkpoint, e.g. {only_saved[0]}")
    if only_now:
        out.append(f"{len(only_now)} array(s) only in this command's state, e.g. {only_now[0]}")
    return out


class _Unreadable(Exception):
    """A checkpoint whose files cannot be read as the checkpoint they claim to be."""


# What orbax, TensorStore and asyncio say while they work: an unreadable checkpoint makes them log errors
# with tracebacks from the reads still in flight, fewer or more with the machine's load (threads, tasks
# collected late, callbacks into an event loop already closed); a failed save logs the error that orbax
# raises again in the thread that waits for it. `restore_latest` reports the checkpoint in one line and the
# command reports a failed save, so none of this belongs on the terminal: the run directory keeps it.
LIBRARY_LOG = "orbax.log"  # in the run directory
_LIBRARY_LOGGERS = ("absl", "asyncio")  # orbax logs through absl's logger
_LIBRARY_PACKAGES = ("orbax", "tensorstore", "asyncio")


class _LibraryLog(logging.Handler):
    """The one handler of the library loggers (which no longer pass records up to the root's): appends
    each record to `path`, the log of the run directory whose checkpoints this process writes, or drops it
    when there is none (a reader writes nothing into a run directory)."""

    def __init__(self):
        super().__init__()
        self.path: Path | None = None
        self.setFormatter(logging.Formatter("%(asctime)s process %(process)d %(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - a full or read-only disk: the command's own error says so
            pass


_LOG = _LibraryLog()


def _from_library(exc, tb, obj=None) -> bool:
    """Whether an exception nobody could catch (in a callback, a finaliser, a thread) is the libraries':
    raised in or for their code, or TensorStore's callback into orbax's closed event loop."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    where = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)] + [getattr(obj, "__module__", None) or ""]
    return any(f"{os.sep}{p}{os.sep}" in name or name.split(".")[0] == p for name in where for p in _LIBRARY_PACKAGES)


def _log_error(name: str, message: str, exc_info) -> None:
    _LOG.handle(logging.makeLogRecord({"name": name, "levelno": logging.ERROR, "levelname": "ERROR", "msg": message,
                                       "exc_info": exc_info}))


def _route_library_noise() -> None:
    """Once per process: the library loggers, and the unraisable and thread exceptions of the libraries'
    code, go to `_LOG`; anything else passes to the hooks that were there."""
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _LOG not in logger.handlers:
            logger.addHandler(_LOG)
            logger.propagate = False
    if getattr(sys.unraisablehook, "gpt_jax_routed", False):
        return
    unraisable, in_thread = sys.unraisablehook, threading.excepthook

    def unraisable_hook(u):
        if not _from_library(u.exc_value, u.exc_traceback, u.object):
            return unraisable(u)
        _log_error("unraisable", f"{u.err_msg or 'Exception ignored in'}: {u.object!r}",
                   (u.exc_type, u.exc_value, u.exc_traceback))

    def thread_hook(a):
        if not _from_library(a.exc_value, a.exc_traceback):
            return in_thread(a)
        _log_error("thread", f"exception in thread {getattr(a.thread, 'name', '?')}",
                   (a.exc_type, a.exc_value, a.exc_traceback))

    unraisable_hook.gpt_jax_routed = True
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook


class Checkpointer:
    def __init__(self, run_dir, keep: int = 2, read_only: bool = False, keep_every: int | None = None):
        """Keeps the newest `keep` checkpoints and every one whose step is a multiple of `keep_every`
        (orbax decides from the steps on disk, so a resumed run keeps them too). `read_only`: a reader
        (sampling, evaluation) skips unreadable checkpoints without moving them."""
        run_dir = Path(run_dir).resolve()
        self.read_only, self.set_aside = read_only, []
        _route_library_noise()
        self.log = None if read_only else run_dir / LIBRARY_LOG
        if self.log is not None:
            _LOG.path = self.log

        def manager(name, keep_n, every=None):
            policies = ocp.checkpoint_managers
            keep_policy = policies.AnyPreservationPolicy(
                [policies.LatestN(keep_n)] + ([policies.EveryNSteps(every)] if every is not None else []))
            options = ocp.CheckpointManagerOptions(preservation_policy=keep_policy, create=not read_only,
                                                   cleanup_tmp_directories=not read_only,
                                                   enable_async_checkpointing=True,
                                                   # two managers save the same step at once: distinct barriers
                                                   multiprocessing_options=ocp.options.MultiprocessingOptions(
                                                       barrier_sync_key_prefix=name))
            handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
            return ocp.CheckpointManager(run_dir / name, options=options, item_handlers=handlers)

        self.last, self.best = manager("checkpoints", keep, keep_every), manager("best", 1)

    def save(self, step: int, state, meta: dict, best: bool = False) -> None:
        """Start an asynchronous save of `state` at `step` (and as the best one if `best`)."""
        meta = {**meta, "checksums": _named_checksums(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        for manager in [self.last, self.best] if best else [self.last]:
            if step in manager.all_steps():  # a resumed run retraces steps a later checkpoint had reached
                manager.wait_until_finished()
                manager.delete(step)
            manager.save(step, args=args, force=True)

    def steps(self) -> list[int]:
        return sorted(self.last.all_steps())

    def restore_latest(self, abstract_state, manager=None, check=None):
        """(state, meta, step) of the newest checkpoint that restores, or None when there is none.

        `check(meta, differences)` may raise to refuse a checkpoint that belongs to another run;
        `differences` lists how its arrays differ from `abstract_state`'s. Without `check`, such a
        difference raises RunDirError; with it, a difference `check` accepts counts as damage."""
        manager = manager or self.last
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return (*self._restore(manager, step, abstract_state, check), step)
            except _Unreadable as e:
                self._set_aside(manager, step, str(e))
        return None

    def restore_step(self, abstract_state, step: int):
        """(state, meta) of the checkpoint at `step` (one that `keep_every` kept, say), or RunDirError."""
        try:
            return self._restore(self.last, step, abstract_state, None)
        except _Unreadable as e:
            raise RunDirError(f"the checkpoint at step {step} in {self.last.directory} cannot be restored ({e})") from None

    def _restore(self, manager, step: int, abstract_state, check):
        """(state, meta) of one checkpoint; _Unreadable if damaged, RunDirError (or `check`'s error) if
        it belongs to another run."""
        meta, saved_tree = self._read_meta(manager, step)
        differences = array_differences(saved_tree, abstract_state)
        if check is not None:
            check(meta, differences)
        elif differences:
            raise RunDirError(f"the checkpoint at step {step} in {manager.directory} holds other arrays than "
                              f"its run's config.yaml describes: {'; '.join(differences[:3])}")
        if differences:
            raise _Unreadable(f"its arrays disagree with its own saved config: {'; '.join(differences[:2])}")
        state = self._read_state(manager, step, abstract_state)
        expected = meta.pop("checksums", None)
        if expected is not None:
            bad = [k for k, v in _named_checksums(state).items() if expected.get(k) != v]
            if bad:
                raise _Unreadable(f"{len(bad)} array(s) do not match their checksums, e.g. {bad[0]}")
        return state, meta

    @staticmethod
    def _read_meta(manager, step):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            saved_tree = manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - whatever orbax raises for a file it cannot parse
            raise _Unreadable(f"{type(e).__name__}: {str(e)[:200]}") from e
        if not isinstance(meta, dict) or saved_tree is None:
            raise _Unreadable("its metadata is missing")
        return meta, saved_tree

    @staticmethod
    def _read_state(manager, step, abstract_state):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except (MemoryError, PermissionError, jax.errors.JaxRuntimeError):
            raise  # the machine's trouble, not the checkpoint's
        except Exception as e:  # noqa: BLE001 - damaged array files fail in many ways inside TensorStore
            raise _Unreadable(f"{type(e).__name__}: {str(e)[:200]}") from e
        return restored["state"]

    def _set_aside(self, manager, step: int, reason: str) -> None:
        """Report an unreadable checkpoint; the run that owns the directory moves it to corrupt/."""
        where = f"checkpoint at step {step} in {manager.directory} cannot be restored ({reason})"
        if self.read_only:
            print(f"{where}; trying the previous one", file=sys.stderr)
            return
        aside = Path(manager.directory).parent / "corrupt" / f"{Path(manager.directory).name}-{step}"
        if jax.process_index() == 0:  # one process moves it; the others wait and see it gone
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            shutil.move(str(Path(manager.directory) / str(step)), aside)
        barrier(f"gpt_jax: checkpoint {step} moved aside")
        manager.reload()
        self.set_aside.append(aside)
        print(f"{where}; moved it to {aside} and trying the previous one", file=sys.stderr)

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()
        if self.log is not None and _LOG.path == self.log:
            _LOG.path = None
