"""A run directory is only changed by the run that owns it: train.py refuses (one line, its exit
code, nothing written) a command that does not match the checkpoint there, bad data, and a second
process on the same directory; torn metrics survive. Checkpoint-level fallbacks: test_checkpoint.py."""

import errno
import json
import os
import signal
import subprocess
import sys

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
    from gpt_jax.errors import EXIT_FILESYSTEM, explain

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
     ["is not a fine-tuning run (finetune.json is missing); train one with train.py and mode: finetune"]),
    (["gpt_jax.data", "{tmp}/ls", "--cache-dir", "{tmp}/cache"], 2, ["not UTF-8 text"]),
    (["gpt_jax.data", "{corpus}", "--cache-dir", "/bin/ls/cache"], 5, ["Not a directory", "/bin/ls"]),
    (["gpt_jax.bench", "--config", "configs/quickstart.yaml", "train.batch_size=0"], 2,
     ["train.batch_size must be >= 1"]),
    (["gpt_jax.sample", "--checkpoint", "{run}", "--prompt", "A", "--max-new-tokens", "1099511627776"], 2,
     ["argument --max-new-tokens: must be in [1, 1000000], got 1099511627776"]),  # every flag: test_command_lines.py
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
