"""A run directory is only changed by the run that owns it: train.py refuses (one line, its exit
code, nothing written) a command that does not match the checkpoint there, bad data, and a second
process on the same directory; unreadable checkpoints (checksum) fall back; torn metrics survive."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from test_train import corpus, run_train  # noqa: F401 - corpus is a fixture


def snapshot(run_dir):
    """Every file under run_dir with its size and modification time."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("owned")
    code, _, err = run_train(tmp, corpus, "run", "train.steps=4", "train.save_every=2", "train.eval_every=2")
    assert code == 0, err[-3000:]
    return tmp


def binary_source(tmp):
    (tmp / "ls").write_bytes(open("/bin/ls", "rb").read())
    return f"data.source={tmp / 'ls'}"


def other_vocabulary(tmp):
    (tmp / "digits.txt").write_text("0123456789 \n" * 5000)
    return f"data.source={tmp / 'digits.txt'}"


def tiny_source(tmp):
    (tmp / "tiny.txt").write_text("To be, or not to be.\n" * 3)
    return f"data.source={tmp / 'tiny.txt'}"


@pytest.mark.parametrize("extra, code, words", [
    (lambda tmp: "model.n_layer=3", 4, ["does not match", "model.n_layer (saved 2, now 3)", "config.yaml",
                                        "another train.out_dir"]),
    (lambda tmp: "optim.grad_clip=0", 4, ["does not match", "optim.grad_clip (saved 1.0, now 0.0)", "arrays"]),
    (other_vocabulary, 4, ["does not match", "the character vocabulary"]),
    (binary_source, 2, ["not UTF-8 text"]),
    (tiny_source, 2, ["smaller than one batch"]),
])
def test_command_that_does_not_match_the_run_stops_and_writes_nothing(finished_run, corpus, extra, code, words):
    run_dir = finished_run / "run"
    before = snapshot(run_dir)
    rc, _, err = run_train(finished_run, corpus, "run", "train.steps=6", extra(finished_run))
    line = one_error_line(err)
    assert rc == code, err[-3000:]
    for word in words:
        assert word in line, line
    after = snapshot(run_dir)
    after.pop(".lock", None), before.pop(".lock", None)  # the lock file is the command's only trace
    assert after == before and not (run_dir / "corrupt").exists()


def test_fine_tuning_into_a_pretraining_run_directory_is_refused(finished_run):
    run_dir = finished_run / "run"
    (finished_run / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    before = snapshot(run_dir)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "mode=finetune", f"finetune.init_from={run_dir}",
                           f"finetune.train_file={finished_run / 'train.tsv'}", f"train.out_dir={run_dir}"],
                          cwd=finished_run, capture_output=True, text=True, timeout=300)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 4 and "does not match this command" in line and "mode (saved pretrain, now finetune)" in line \
        and "another train.out_dir" in line, line
    after = snapshot(run_dir)
    after.pop(".lock", None), before.pop(".lock", None)  # the lock file is the command's only trace
    assert after == before and not (run_dir / "corrupt").exists()


LOCKER = "import sys, time; from gpt_jax.rundir import RunLock; from pathlib import Path; " \
         "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"


def test_second_process_on_a_run_directory_is_refused_until_the_owner_dies(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", LOCKER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert owner.stdout.readline().strip() == "locked"
        rc, _, err = run_train(tmp_path, corpus, "run", "train.steps=2")
        assert rc == 4 and f"is in use by process {owner.pid}" in one_error_line(err), err[-3000:]
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    from gpt_jax.rundir import RunLock

    lock = RunLock(run_dir)  # the dead owner's lock is taken over
    assert (run_dir / ".lock").read_text().split()[0] == str(os.getpid())
    lock.release()


def test_full_disk_is_one_line(tmp_path, corpus):
    """A file size limit (EFBIG, as a full disk's ENOSPC) makes the checkpoint write fail: one line, exit 5."""
    from test_train import train_args

    limit = 'trap "" XFSZ; ulimit -f 150; exec "$@"'  # 150 KiB: the data cache fits, the checkpoint does not
    args = ["bash", "-c", limit, "bash", *train_args(tmp_path, corpus, "run", "train.steps=2", "train.save_every=1",
                                                     "model.n_embd=64")]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the tests' cache: no writes
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 5 and os.strerror(errno.EFBIG) in line and "rerun the same command" in line, line


def test_filesystem_errors_are_explained_through_exception_chains():
    from gpt_jax.cli import EXIT_FILESYSTEM, explain

    code, message = explain(PermissionError(errno.EACCES, "Permission denied", "/runs/x/.lock"))
    assert code == EXIT_FILESYSTEM and message.startswith("Permission denied: /runs/x/.lock;")
    try:
        try:
            raise ValueError("Error writing \"/runs/x/checkpoints/5/d\" [os_error_code='28']")
        except ValueError as inner:
            raise RuntimeError("commit failed") from inner
    except RuntimeError as outer:
        code, message = explain(outer)
    assert code == EXIT_FILESYSTEM and "No space left on device: /runs/x/checkpoints/5/d" in message
    assert explain(KeyError("a bug")) is None  # an unexpected error keeps its traceback


def test_checksums_change_with_every_single_bit():
    import jax.numpy as jnp

    from gpt_jax.checkpoint import checksums

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    base = int(checksums({"x": jnp.asarray(x)})["x"])
    bits = x.view(np.uint32)
    seen = []
    for i in range(bits.size):
        for b in range(32):
            flipped = bits.copy().reshape(-1)
            flipped[i] ^= np.uint32(1 << b)
            seen.append(int(checksums({"x": jnp.asarray(flipped.reshape(x.shape).view(np.float32))})["x"]))
    assert len(seen) == bits.size * 32 and base not in seen
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # the same values in another order
    assert int(checksums({"x": jnp.asarray(swapped)})["x"]) != base


def test_checkpoint_names_each_array_by_its_dotted_path(tmp_path):
    """The saved checksums and the mismatch messages name arrays as `params.wte.embedding`,
    `opt_state.0.mu.w` (dict keys, tuple indices, named-tuple fields joined by dots): the names a
    checkpoint written by an earlier version holds, so another spelling would fail every checksum."""
    import jax
    import jax.numpy as jnp
    import optax

    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.rundir import RunDirError

    state = {"params": {"wte": {"embedding": jnp.ones(4)}},
             "opt_state": (optax.ScaleByAdamState(jnp.zeros((), jnp.int32), {"w": jnp.ones(2)}, {"w": jnp.ones(2)}),),
             "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, state, {"config": {}})
    ckpt.wait()
    ckpt.close()
    saved = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert sorted(saved["checksums"]) == ["opt_state.0.count", "opt_state.0.mu.w", "opt_state.0.nu.w",
                                          "params.wte.embedding", "step"]
    other = {**state, "params": {"wte": {"embedding": jnp.ones(5)}}}
    ckpt = Checkpointer(tmp_path, keep=1)
    with pytest.raises(RunDirError) as e:
        ckpt.restore_latest(jax.eval_shape(lambda: other))
    ckpt.close()
    assert "params.wte.embedding: saved (4,) float32, now (5,) float32" in str(e.value)


def test_array_differences_name_an_array_found_on_one_side_only():
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import array_differences

    def tree(**shapes):
        return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}

    assert array_differences(tree(a=(2,), b=(3,)), tree(a=(2,), c=(4,))) == [
        "1 array(s) only in the checkpoint, e.g. b", "1 array(s) only in this command's state, e.g. c"]
    assert array_differences(tree(a=(2,)), tree(a=(2,))) == []


def test_only_the_failures_checkpoint_reports_itself_are_kept_out_of_the_logs(monkeypatch):
    """orbax's ERROR records of a failed write (os_error_code=N, in the message or its traceback) and of
    a damaged checkpoint's metadata are dropped, once the filter is installed; warnings and other errors
    pass, and so do unraisable exceptions other than TensorStore's "Event loop is closed"."""
    import logging
    import types

    from gpt_jax import checkpoint

    def record(level, message, error=None):
        exc_info = None
        if error is not None:
            try:
                raise error
            except OSError:
                exc_info = sys.exc_info()
        return logging.LogRecord("absl", level, __file__, 1, message, None, exc_info)

    keep = checkpoint._ReportedErrorLogs().filter
    assert not keep(record(logging.ERROR, "write failed: os_error_code=28 [No space left]"))
    assert not keep(record(logging.ERROR, "Failed to read Metadata file at /run/checkpoints/2"))
    assert not keep(record(logging.ERROR, "save failed", OSError("INTERNAL: os_error_code=28")))
    assert keep(record(logging.ERROR, "save failed", OSError("permission denied")))
    assert keep(record(logging.ERROR, "an error of another kind"))
    assert keep(record(logging.WARNING, "os_error_code=28 retrying"))

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    checkpoint._quiet_known_noise()
    hook = sys.unraisablehook
    checkpoint._quiet_known_noise()  # once per process: not wrapped again, no second filter
    assert sys.unraisablehook is hook
    assert [type(f) for f in logging.getLogger("absl").filters] == [checkpoint._ReportedErrorLogs]
    assert [type(f) for f in logging.getLogger("asyncio").filters] == [checkpoint._ReportedErrorLogs]
    closed, other = (types.SimpleNamespace(exc_value=e) for e in (RuntimeError("Event loop is closed"),
                                                                  RuntimeError("something else")))
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert seen == [other]


def test_checkpointer_keeps_the_newest_and_every_kth_and_a_reader_changes_nothing(tmp_path):
    """keep (2 by default) newest plus every keep_every-th step; a writer clears a killed save's
    temporary folder; a reader (read_only) creates nothing, clears nothing and moves no damaged
    checkpoint aside: it falls back to the previous one and leaves the directory as it was."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    def saved(root, steps, **kw):
        ckpt = Checkpointer(root, **kw)
        for step in steps:
            ckpt.save(step, {"w": jnp.full((2,), float(step))}, {"config": {}})
        ckpt.wait()
        ckpt.close()
        return ckpt.steps()

    assert saved(tmp_path / "default", range(1, 5)) == [3, 4]
    assert saved(tmp_path / "every", range(1, 8), keep=2, keep_every=3) == [3, 6, 7]

    Checkpointer(tmp_path / "none", read_only=True).close()
    assert not (tmp_path / "none").exists()
    Checkpointer(tmp_path / "new").close()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["best", "checkpoints"]

    run = tmp_path / "every"
    leftover = run / "checkpoints" / "9.orbax-checkpoint-tmp-1733000000"  # a save killed mid-write
    leftover.mkdir()
    meta = run / "checkpoints" / "7" / "meta" / "metadata"
    damaged = json.loads(meta.read_text())
    damaged["checksums"]["w"] ^= 1
    meta.write_text(json.dumps(damaged))
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    reader = Checkpointer(run, read_only=True)
    state, _, step = reader.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(2)}), check=lambda m, d: None)
    reader.close()
    assert step == 6 and float(state["w"][0]) == 6.0
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    Checkpointer(run).close()
    deadline = time.time() + 10  # orbax clears it in the background
    while leftover.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not leftover.exists()


def test_best_holds_only_the_step_saved_as_best_and_a_retraced_step_replaces_the_saved_one(tmp_path):
    """best/ gets a step only when saved with best=True and keeps one; a resumed run that saves a step
    again (its step 2 after a checkpoint at 3 existed) replaces the old one rather than skipping it."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    abstract = jax.eval_shape(lambda: {"w": jnp.zeros(2)})
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, {"w": jnp.full((2,), 1.0)}, {"config": {}})
    ckpt.save(2, {"w": jnp.full((2,), 2.0)}, {"config": {}}, best=True)
    ckpt.save(3, {"w": jnp.full((2,), 3.0)}, {"config": {}}, best=True)
    ckpt.save(4, {"w": jnp.full((2,), 4.0)}, {"config": {}})
    ckpt.wait()
    assert ckpt.best.all_steps() == [3] and ckpt.steps() == [2, 3, 4]
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(2, {"w": jnp.full((2,), 20.0)}, {"config": {}})
    ckpt.wait()
    state, _ = ckpt.restore_step(abstract, 2)
    ckpt.close()
    assert float(state["w"][0]) == 20.0


def test_why_a_checkpoint_cannot_be_restored_is_named(tmp_path, capsys):
    """Each fallback line says what is wrong with the checkpoint it skips; a checkpoint from before
    checksums restores; restore_step reads that step's own JSON part."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.rundir import RunDirError

    names = ("a", "b", "c", "d")
    abstract = jax.eval_shape(lambda: {k: jnp.zeros(2) for k in names})

    def run(name):
        ckpt = Checkpointer(tmp_path / name, keep=2)
        for step in (1, 2):
            ckpt.save(step, {k: jnp.full((2,), float(step)) for k in names}, {"config": {}, "n": step})
        ckpt.wait()
        ckpt.close()
        return tmp_path / name / "checkpoints" / "2" / "meta" / "metadata"

    def reason(name, check=lambda meta, differences: None, target=abstract):
        reader = Checkpointer(tmp_path / name, read_only=True)
        state, meta, step = reader.restore_latest(target, check=check)
        reader.close()
        line = capsys.readouterr().err.strip()
        assert step == 1 and meta["n"] == 1 and float(state["a"][0]) == 1.0, line
        assert line.startswith(f"checkpoint at step 2 in {tmp_path / name / 'checkpoints'} cannot be restored (")
        assert line.endswith("); trying the previous one") and "\n" not in line
        return line[line.index("(") + 1: -len("); trying the previous one")]

    meta = run("checksum")
    saved = json.loads(meta.read_text())
    saved["checksums"]["c"] ^= 1
    meta.write_text(json.dumps(saved))
    assert reason("checksum") == "1 array(s) do not match their checksums, e.g. c"

    meta = run("not-a-dict")
    meta.write_text("[1]")
    assert reason("not-a-dict") == "its metadata is missing"

    meta = run("not-json")
    meta.write_text("{")
    assert reason("not-json") == "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"

    run("no-arrays")
    for f in (tmp_path / "no-arrays" / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    kind, _, text = reason("no-arrays").partition(": ")  # TensorStore's error, cut at 200 characters
    assert kind.isidentifier() and kind.endswith("Error") and len(text) == 200, (kind, text)

    run("shapes")  # arrays that a `check` accepts as the run's but that differ from the saved ones: damage
    seen = []
    wider = jax.eval_shape(lambda: {k: jnp.zeros(3) for k in names})
    reader = Checkpointer(tmp_path / "shapes", read_only=True)
    assert reader.restore_latest(wider, check=lambda meta, differences: seen.append(differences)) is None
    reader.close()
    assert seen[0] == [f"{k}: saved (2,) float32, now (3,) float32" for k in names]
    assert capsys.readouterr().err.splitlines()[0].endswith(
        "cannot be restored (its arrays disagree with its own saved config: a: saved (2,) float32, now (3,) float32; "
        "b: saved (2,) float32, now (3,) float32); trying the previous one")
    ckpt = Checkpointer(tmp_path / "shapes")
    with pytest.raises(RunDirError) as e:  # without a `check`: another run's checkpoint, three examples
        ckpt.restore_latest(wider)
    assert str(e.value).endswith("holds other arrays than its run's config.yaml describes: " + "; ".join(
        f"{k}: saved (2,) float32, now (3,) float32" for k in names[:3]))
    state, meta = ckpt.restore_step(abstract, 1)  # its own JSON part, not the newest one's
    assert meta["n"] == 1 and float(state["a"][0]) == 1.0
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checksum", read_only=True)  # the reader above left step 2 in place
    with pytest.raises(RunDirError) as e:
        ckpt.restore_step(abstract, 2)
    ckpt.close()
    assert str(e.value) == (f"the checkpoint at step 2 in {tmp_path / 'checksum' / 'checkpoints'} cannot be restored "
                            "(1 array(s) do not match their checksums, e.g. c)")

    meta = run("before-checksums")
    saved = json.loads(meta.read_text())
    del saved["checksums"]
    meta.write_text(json.dumps(saved))
    ckpt = Checkpointer(tmp_path / "before-checksums", read_only=True)
    state, meta, step = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 2 and float(state["d"][0]) == 2.0 and "checksums" not in meta


def test_the_owner_sets_aside_each_damaged_checkpoint_and_every_process_waits_for_it(tmp_path, monkeypatch, capsys):
    """Two damaged checkpoints in a row both go to corrupt/ (the folder exists for the second); one set
    aside again replaces the earlier copy under that name instead of nesting inside it; every process
    meets at a barrier named for the step (a multi-process run's processes must pass the same name)."""
    import jax
    import jax.numpy as jnp

    from gpt_jax import checkpoint
    from gpt_jax.checkpoint import Checkpointer

    waits = []
    monkeypatch.setattr(checkpoint, "barrier", waits.append)
    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((2,), float(step))}, {"config": {}})
    ckpt.wait()
    ckpt.close()
    for step in (2, 3):
        meta = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        saved = json.loads(meta.read_text())
        saved["checksums"]["w"] ^= 1
        meta.write_text(json.dumps(saved))
    earlier = tmp_path / "corrupt" / "checkpoints-2"
    earlier.mkdir(parents=True)
    (earlier / "from-an-earlier-run").write_text("")
    ckpt = Checkpointer(tmp_path, keep=3)
    state, _, step = ckpt.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(2)}), check=lambda m, d: None)
    ckpt.close()
    assert step == 1 and float(state["w"][0]) == 1.0 and ckpt.steps() == [1]
    assert waits == ["gpt_jax: checkpoint 3 moved aside", "gpt_jax: checkpoint 2 moved aside"]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["checkpoints-2", "checkpoints-3"]
    assert sorted(p.name for p in earlier.iterdir()) == sorted(p.name for p in (tmp_path / "corrupt" / "checkpoints-3").iterdir())
    assert "meta" in {p.name for p in earlier.iterdir()}
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == (f"checkpoint at step 2 in {tmp_path / 'checkpoints'} cannot be restored (1 array(s) do not match "
                        f"their checksums, e.g. w); moved it to {earlier} and trying the previous one")


def test_checkpoint_whose_arrays_fail_their_checksum_is_set_aside(tmp_path):
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"config": {}})
    ckpt.wait()
    ckpt.close()
    meta = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["checksums"]["w"] ^= 1  # as a flipped bit in the array file would read
    meta.write_text(json.dumps(saved))
    ckpt = Checkpointer(tmp_path, keep=3)
    state, _, step = ckpt.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(4)}), check=lambda m, d: None)
    ckpt.close()
    assert step == 1 and float(state["w"][0]) == 1.0
    assert (tmp_path / "corrupt" / "checkpoints-2").is_dir() and ckpt.steps() == [1]


RESTORE = """import sys, jax, jax.numpy as jnp
from gpt_jax.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep=3)
state = {f"w{i}": jnp.zeros((64, 64)) for i in range(20)}
print(ckpt.restore_latest(jax.eval_shape(lambda: state), check=lambda m, d: None)[2])
ckpt.close()
"""


@pytest.mark.parametrize("damage", ["truncate every file", "delete the array files"])
def test_unreadable_checkpoint_falls_back_with_one_line(tmp_path, damage):
    """The fallback is reported once: no logged errors, tracebacks or "Event loop is closed" noise."""
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


def test_torn_metrics_line_is_dropped_and_plots(tmp_path):
    from gpt_jax.rundir import drop_torn_line, read_jsonl
    from gpt_jax.runlog import plot_losses

    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "train", "step": s, "loss": 3.0 - s / 10} for s in (1, 2)] + [{"kind": "eval", "step": 2,
                                                                                  "val_loss": 2.9}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"kind": "train", "st')
    assert read_jsonl(path) == good
    drop_torn_line(path)
    assert path.read_text().endswith("\n") and read_jsonl(path) == good
    assert plot_losses(tmp_path).stat().st_size > 1000


@pytest.mark.parametrize("command, code, words", [
    (["gpt_jax.sample", "--checkpoint", "{tmp}/nothing"], 2, ["not a training run"]),
    (["gpt_jax.evaluate", "--checkpoint", "{run}", "perplexity", "--input", "{tmp}/ls"], 2, ["not UTF-8 text"]),
    (["gpt_jax.evaluate", "--checkpoint", "{run}", "choice", "--input", "{tmp}/ls.tsv", "--labels", "0", "1",
      "--candidates", " a", " b"], 2, ["ls.tsv is not UTF-8 text"]),
    (["gpt_jax.predict", "--checkpoint", "{run}", "--input", "{tmp}/ls.tsv", "--output", "{tmp}/p.tsv"], 2,
     ["is not a fine-tuning run"]),
    (["gpt_jax.data", "{tmp}/ls", "--cache-dir", "{tmp}/cache"], 2, ["not UTF-8 text"]),
    (["gpt_jax.data", "{corpus}", "--cache-dir", "/bin/ls/cache"], 5, ["Not a directory", "/bin/ls"]),
    (["gpt_jax.bench", "--config", "configs/quickstart.yaml", "train.batch_size=0"], 2,
     ["train.batch_size must be >= 1"]),
])
def test_every_entry_point_reports_expected_failures_in_one_line(finished_run, corpus, command, code, words):
    binary_source(finished_run)
    (finished_run / "ls.tsv").write_bytes((finished_run / "ls").read_bytes())
    fill = {"tmp": finished_run, "run": finished_run / "run", "corpus": corpus}
    proc = subprocess.run([sys.executable, "-m", *[arg.format(**fill) for arg in command]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = one_error_line(proc.stderr)
    assert proc.returncode == code, proc.stderr[-3000:]
    for word in words:
        assert word in line, line


def test_evaluate_stride_zero_is_refused_by_the_parser(capsys):
    from gpt_jax.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", "unused", "perplexity", "--input", "unused", "--stride", "0"])
    assert exit_.value.code == 2 and "--stride: must be >= 1, got 0" in capsys.readouterr().err


def test_checkpoint_of_an_older_run_or_of_fine_tuning_is_refused_not_set_aside(tmp_path):
    from gpt_jax.config import load_config
    from gpt_jax.rundir import RunDirError, resume_check
    from gpt_jax.tokenizer import CharTokenizer

    config = load_config(None, ["model.preset=gpt2-tiny"])
    saved = config.to_dict()
    del saved["model"]["pad_vocab_multiple"]  # written before the setting existed
    check = resume_check(tmp_path, config, CharTokenizer("ab"))
    with pytest.raises(RunDirError, match=r"model.pad_vocab_multiple \(not in the saved config, now 128; .* add model.pad_vocab_multiple=1 to resume it\)"):
        check({"config": saved}, ["params.wte.embedding: saved (65, 32) float32, now (128, 32) float32"])
    check({"config": config.to_dict()}, [])  # the same run: accepted
    (tmp_path / "finetune.json").write_text("{}")
    with pytest.raises(RunDirError, match="it is a fine-tuning run"):
        resume_check(tmp_path, config, CharTokenizer("ab"))({"task": "classification"}, ["params.head: ..."])


def test_resume_after_a_torn_metrics_line_drops_it_with_a_warning(finished_run, corpus):
    """Last in this file: it extends the shared finished run."""
    metrics = finished_run / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # power lost mid-write
    code, out, err = run_train(finished_run, corpus, "run", "train.steps=6", "train.save_every=2",
                               "train.eval_every=2")
    assert code == 0 and "resuming from step 4" in out, err[-3000:]
    assert "dropped a torn last line" in err
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (finished_run / "run" / "loss.png").stat().st_size > 1000
