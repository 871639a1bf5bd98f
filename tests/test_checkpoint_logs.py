"""What a reader of checkpoints sees when one cannot be restored: one line from gpt_jax.checkpoint, and none of what
orbax, TensorStore and asyncio log or leave uncaught meanwhile (more or less of it with the machine's load): that
goes to orbax.log in the run directory."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


RESTORE = """import sys, jax, jax.numpy as jnp
from gpt_jax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=3)
state = {f"w{i}": jnp.zeros((64, 64)) for i in range(20)}
print(ckpt.restore_latest(jax.eval_shape(lambda: state), check=lambda m, d: None)[2])
ckpt.close()
"""


@pytest.mark.parametrize("damage", ["truncate every file", "delete the array files"])
def test_unreadable_checkpoint_falls_back_with_one_line(tmp_path, damage):
    """The fallback is reported once: no logged errors, tracebacks or "Event loop is closed" noise (orbax.log
    in the run directory keeps them)."""
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    state = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(20)}  # many arrays: many reads in flight
    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, state, {"config": {}})
    ckpt.wait()
    ckpt.close()
    for f in (tmp_path / "checkpoints" / "2").rglob("*"):
        if damage.startswith("truncate") and f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        elif f.is_file() and f.parent.name == "d":
            f.unlink()
    proc = subprocess.run([sys.executable, "-c", RESTORE, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip() == "1" and (tmp_path / "corrupt" / "checkpoints-2").is_dir(), proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "checkpoint at step 2" in lines[0] and "moved it to" in lines[0], proc.stderr[-3000:]
    if damage.startswith("truncate"):  # orbax logs its truncated metadata file: into the run directory
        assert "Failed to json parse Metadata file" in (tmp_path / "orbax.log").read_text()


NOISE = """import asyncio, gc, sys, threading
from absl import logging
from gpt_jax.checkpoint import Checkpointer
closed = asyncio.new_event_loop()
closed.close()


class Callback:  # TensorStore's late callback into orbax's closed event loop, run by a finaliser
    def __del__(self):
        closed.call_soon_threadsafe(print)


class Mine:
    def __del__(self):
        raise ValueError("a bug of ours in a finaliser")


async def fails():
    raise ValueError("a read that failed while another was reported")


def noise(tag):
    logging.error("orbax says %s", tag, exc_info=ValueError("read failed"))
    loop = asyncio.new_event_loop()
    task = loop.create_task(fails())
    loop.run_until_complete(asyncio.sleep(0))  # the task fails; nobody retrieves its exception
    del task
    loop.close()
    Callback()
    thread = threading.Thread(target=closed.call_soon_threadsafe, args=(print,), name="reader-" + tag)
    thread.start()
    thread.join()
    gc.collect()


ckpt = Checkpointer(sys.argv[1])
noise("owner")
Mine()
ckpt.close()
Checkpointer(sys.argv[2], read_only=True)
noise("reader")
print("done")
"""


def test_what_the_libraries_log_or_leave_uncaught_goes_to_the_run_directory_not_the_terminal(tmp_path):
    """orbax's absl records, asyncio's "Task exception was never retrieved", and the exceptions no one can catch
    that the libraries raise in finalisers and threads (a callback into a closed event loop) go to the owner's
    orbax.log, however many a failed restore makes; a reader writes nothing and they are dropped. Our own uncaught
    exceptions still reach the terminal."""
    (tmp_path / "reader").mkdir()
    proc = subprocess.run([sys.executable, "-c", NOISE, str(tmp_path / "owner"), str(tmp_path / "reader")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-3000:]
    assert "a bug of ours in a finaliser" in proc.stderr, proc.stderr[-3000:]
    for word in ("orbax says", "never retrieved", "Event loop is closed", "read that failed", "reader-"):
        assert word not in proc.stderr, proc.stderr[-3000:]
    log = (tmp_path / "owner" / "orbax.log").read_text()
    assert "orbax says owner" in log and "ValueError: read failed" in log
    assert "Task exception was never retrieved" in log and "ValueError: a read that failed" in log
    assert log.count("RuntimeError: Event loop is closed") == 2 and "exception in thread reader-owner" in log
    assert "a bug of ours" not in log and "reader" not in log.replace("reader-owner", "")
    assert os.listdir(tmp_path / "reader") == []
