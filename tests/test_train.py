"""End-to-end runs of train.py in real subprocesses, with real signals."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, data_path

TINY = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_positions=32",
        "model.resid_pdrop=0.1", "model.embd_pdrop=0.1",  # dropout on: resume must replay its RNG too
        "train.batch_size=8", "train.eval_batches=2", "train.log_every=1", "optim.warmup_steps=5", "optim.lr=3e-3",
        "train.sample_tokens=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(data_path("tinyshakespeare", "input.txt").read_text()[:60_000])
    return path


def train_args(tmp_path, corpus, run, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
            *TINY, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / run}",
            *extra]


def start(tmp_path, corpus, run, *extra, **popen):
    args = train_args(tmp_path, corpus, run, *extra)
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def run_train(tmp_path, corpus, run, *extra, timeout=300):
    proc = start(tmp_path, corpus, run, *extra)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(run_dir: Path) -> dict:
    """step -> train loss, the last record of each step winning (a resumed run re-logs some steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("ref")
    code, out, err = run_train(tmp, corpus, "run", "train.steps=30", "train.save_every=5", "train.eval_every=10")
    assert code == 0, err[-3000:]
    return tmp / "run", out, err


def test_end_to_end_run_writes_everything(reference_run):
    run_dir, out, _ = reference_run
    assert "config: " in out and "done: step 30" in out and "val loss" in out
    assert "tokenizing shakespeare" in out  # the first run prepares the token files, with its progress
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, 31))
    assert ref[30] < ref[1] - 0.5, "the loss should fall"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rec = next(r for r in records if r["kind"] == "train")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(train_rec)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20, 30]
    done = out.split("done: step 30", 1)[1].splitlines()[0]  # reports the last evaluation's loss
    assert f"val loss {[r['val_loss'] for r in records if r['kind'] == 'eval'][-1]:.4f}, " in done, done
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer.json").is_file()
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["25", "30"]  # keep 2
    assert any(p.name.isdigit() for p in (run_dir / "best").iterdir())


NO_TENSORBOARD = "tensorboard is not installed (pip install -e '.[test]')"


def test_tensorboard_reads_every_logged_number_of_the_run(reference_run):
    """The events file, read by TensorBoard's own loader, holds each metrics.jsonl number at its step."""
    EventAccumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason=NO_TENSORBOARD).EventAccumulator
    run_dir = reference_run[0]
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    want = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                want.setdefault(f"{r['kind']}/{k}", []).append((r["step"], v))
    assert {"train/loss", "train/lr", "eval/val_loss"} <= set(want)
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in points], rtol=1e-6, err_msg=tag)  # float32


def test_tensorboard_event_records_carry_the_tfrecord_checksums(tmp_path):
    from gpt_jax.runlog import EventWriter, crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)
    EventFileLoader = pytest.importorskip(
        "tensorboard.backend.event_processing.event_file_loader", reason=NO_TENSORBOARD).LegacyEventFileLoader
    writer = EventWriter(tmp_path / "tb")
    writer.scalar("train/loss", 2.5, 300)
    writer.scalar("eval/val_loss", -1.25, 2**40)
    writer.close()
    (path,) = (tmp_path / "tb").iterdir()
    events = list(EventFileLoader(str(path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in events[1:]] == [
        (300, "train/loss", 2.5), (2**40, "eval/val_loss", -1.25)]
    data = bytearray(path.read_bytes())
    data[-6] ^= 1  # a flipped bit in the last record's payload: the reader's checksum drops that record
    path.write_bytes(bytes(data))
    assert [e.step for e in EventFileLoader(str(path)).Load()] == [0, 300]


def test_sigkill_at_any_moment_then_resume_gives_identical_losses(tmp_path, corpus, reference_run):
    ref = losses(reference_run[0])
    args = ("train.steps=30", "train.save_every=5", "train.eval_every=10")
    proc = start(tmp_path, corpus, "run", *args)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(0.37)  # somewhere after the first checkpoint, possibly during a save
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed = losses(tmp_path / "run")
    code, out, err = run_train(tmp_path, corpus, "run", *args)
    assert code == 0, err[-3000:]
    assert "resuming from step" in out
    resumed = losses(tmp_path / "run")
    assert resumed == ref, {s: (resumed.get(s), ref[s]) for s in ref if resumed.get(s) != ref[s]}
    assert len(killed) < 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_then_resume(tmp_path, corpus, reference_run, sig):
    ref = losses(reference_run[0])
    # A long run (still going when the signal lands) on the reference's schedule (decay over 30 steps).
    args = ("train.save_every=1000", "train.eval_every=1000", "optim.decay_steps=30")
    proc = start(tmp_path, corpus, "run", "train.steps=2000", *args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, err[-2000:]
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 1 <= saved[0] < 2000
    # the whole line (the progress bar's carriage returns apart): this process received it, at which step, where
    assert (f"received {sig.name}: saved a checkpoint at step {saved[0]} in {tmp_path / 'run'}; rerun the same "
            "command to resume") in out.replace("\r", "\n").splitlines(), out[-2000:]
    code, out, err = run_train(tmp_path, corpus, "run", "train.steps=30", *args)
    assert code == 0, err[-2000:]
    if saved[0] < 30:
        assert f"resuming from step {saved[0]}" in out
    resumed = losses(tmp_path / "run")
    assert {s: resumed[s] for s in ref} == ref


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, corpus, reference_run):
    ref = losses(reference_run[0])
    args = ("train.save_every=5", "train.eval_every=10", "optim.decay_steps=30")  # the reference's schedule
    code, _, err = run_train(tmp_path, corpus, "run", "train.steps=20", *args)
    assert code == 0, err[-2000:]
    newest = tmp_path / "run" / "checkpoints" / "20"
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncate every file
    # Extending the run to 30 steps resumes from step 15 and retraces the reference exactly.
    code, out, err = run_train(tmp_path, corpus, "run", "train.steps=30", *args)
    assert code == 0, err[-2000:]
    assert "checkpoint at step 20" in err and "cannot be restored" in err
    assert "Traceback" not in err and "Event loop is closed" not in err  # orbax's noise on a failed read is quiet
    assert (tmp_path / "run" / "corrupt" / "checkpoints-20").is_dir()
    assert "resuming from step 15" in out
    assert losses(tmp_path / "run") == ref


def test_every_checkpoint_damaged_restarts_from_step_0_with_one_line_each(tmp_path, corpus, reference_run):
    """The newest checkpoint truncated, the one before it without its array files: each is moved to corrupt/
    with one line, one more line says the run starts again, and orbax's logged errors go to orbax.log."""
    shutil.copytree(reference_run[0], tmp_path / "run")
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == [25, 30]
    for f in (tmp_path / "run" / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "/30/" in str(f):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
        elif f.is_file() and "/25/" in str(f) and f.parent.name == "d":
            f.unlink()
    args = ("train.save_every=5", "train.eval_every=10", "optim.decay_steps=30")  # the reference's settings
    code, out, err = run_train(tmp_path, corpus, "run", "train.steps=2", *args)
    assert code == 0 and "done: step 2" in out and "resuming" not in out, err[-3000:]
    checkpoints, corrupt = tmp_path / "run" / "checkpoints", tmp_path / "run" / "corrupt"
    assert [line for line in err.splitlines() if line.strip()] == [
        *(f"checkpoint at step {s} in {checkpoints} cannot be restored ({why}); moved it to {corrupt / f'checkpoints-{s}'} "
          "and trying the previous one" for s, why in zip((30, 25), re.findall(r"restored \((.*?)\); moved", err))),
        f"no checkpoint in {checkpoints} restores; starting again from step 0"], err[-3000:]
    assert "Failed to json parse Metadata file" in (tmp_path / "run" / "orbax.log").read_text()
    assert sorted(p.name for p in corrupt.iterdir()) == ["checkpoints-25", "checkpoints-30"]
    ref, before = losses(reference_run[0]), len((reference_run[0] / "metrics.jsonl").read_text().splitlines())
    restarted = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[before:]]
    assert {r["step"]: r["loss"] for r in restarted if r["kind"] == "train"} == {1: ref[1], 2: ref[2]}, restarted


def test_non_finite_stops_before_saving_and_names_a_checkpoint_that_resumes(tmp_path, corpus):
    args = ("train.save_every=1", "train.eval_every=1000", "optim.warmup_steps=3", "optim.decay_steps=30",
            "optim.grad_clip=0")
    code, out, err = run_train(tmp_path, corpus, "run", "train.steps=30", "optim.lr=1e12", *args)
    assert code == 3, (out[-1000:], err[-2000:])
    assert re.search(r"(loss is (nan|inf)|the updated parameters are not finite) at step \d+; stopping", err), err
    named = re.search(r"last good checkpoint is step (\d+)", err)
    assert named, err
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == int(named[1])  # the newest checkpoint is the one named: the rerun resumes there
    losses_before = losses(tmp_path / "run")
    assert all(math.isfinite(losses_before[s]) for s in range(1, saved[-1] + 2))  # its parameters give a finite loss
    # following the advice: a lower lr resumes from the named checkpoint and trains on
    code, out, err = run_train(tmp_path, corpus, "run", "train.steps=8", "optim.lr=1e-3", *args)
    assert code == 0, err[-2000:]
    assert f"resuming from step {saved[-1]} in {tmp_path / 'run' / 'checkpoints'}\n" in out
    resumed = losses(tmp_path / "run")
    assert all(math.isfinite(resumed[s]) for s in range(saved[-1] + 1, 9))


@pytest.mark.parametrize("extra, words", [
    (["model.n_layers=2"], ["unknown config key model.n_layers", "n_layer"]),
    (["train.batch_size=eight"], ["train.batch_size", "expected int"]),
    (["data.source=/nonexistent/file.txt"], ["does not exist"]),
    (["optim.grad_accum=3"], ["not divisible by optim.grad_accum"]),
    (["train.steps=0"], ["train.steps must be >= 1, got 0"]),
    (["optim.lr=-1e-3"], ["optim.lr must be > 0, got -0.001"]),
    (["train.out_dir=/bin/ls"], ["train.out_dir=/bin/ls is an existing file"]),
])
def test_bad_config_or_data_fails_fast_with_a_clear_message(tmp_path, corpus, extra, words):
    t = time.time()
    code, out, err = run_train(tmp_path, corpus, "run", *extra)
    assert code == 2, err[-2000:]
    for w in words:
        assert w in err, err[-2000:]
    assert "Traceback" not in err
    assert time.time() - t < 60


def test_gradient_accumulation_matches_full_batch(tmp_path, corpus):
    """Four micro-batches of 2 rows give the losses of one batch of 8, step after step (in this process:
    the run's data pipeline, schedule and AdamW, without two more interpreter starts)."""
    from gpt_jax.config import load_config
    from gpt_jax.trainer import train

    args = [*TINY, "train.steps=6", "train.eval_every=1000", "train.save_every=1000", "model.resid_pdrop=0",
            "model.embd_pdrop=0", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]
    for run, extra in (("full", []), ("accum", ["optim.grad_accum=4"])):
        train(load_config(ROOT / "configs" / "quickstart.yaml", args + extra + [f"train.out_dir={tmp_path / run}"]),
              verbose=False)
    full, accum = losses(tmp_path / "full"), losses(tmp_path / "accum")
    assert sorted(full) == sorted(accum) == list(range(1, 7))
    for step in full:
        assert abs(full[step] - accum[step]) <= 1e-5 * abs(full[step]), (step, full[step], accum[step])


def test_sample_cli_loads_a_training_run(reference_run):
    run_dir = reference_run[0]
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", str(run_dir), "--prompt", "ROMEO:",
                           "--max-new-tokens", "20", "--num-samples", "2", "--seed", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = proc.stdout.split("--- sample 2 ---")
    assert len(samples) == 2 and all("ROMEO:" in s for s in samples)
    assert proc.stderr.count("[20 tokens in") == 2


def test_bf16_compute_keeps_fp32_master_parameters():
    import jax
    import numpy as np

    from gpt_jax.config import load_config
    from gpt_jax.optim import make_optimizer, make_schedule
    from gpt_jax.pretrain import init_state, make_train_step

    config = load_config(None, ["model.preset=gpt2-tiny", "model.dtype=bfloat16", "train.batch_size=4"])
    optimizer = make_optimizer(config.optim, 10)
    state = init_state(config, optimizer)
    step = jax.jit(make_train_step(config, optimizer, make_schedule(config.optim, 10)))
    batch = np.random.default_rng(0).integers(0, 512, (2, 2, 65)).astype(np.int32)  # 2 micro-batches
    new, metrics = step(state, batch)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(new.params))
    assert np.isfinite(float(metrics["loss"])) and abs(float(metrics["loss"]) - np.log(512)) < 0.5
    assert int(new.step) == 1
