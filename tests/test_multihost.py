"""Multi-host training and fine-tuning: 2 processes x 2 fake CPU devices on 127.0.0.1 (jax.distributed, gloo
collectives) give the single-process losses, save, restore under another strategy, and split the
data and the logging as a multi-host run must."""

import json
import re
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, data_path, orchestration_env

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(data_path("tinyshakespeare", "input.txt").read_text()[:60_000])
    return path


def base_args(corpus, out, cache):
    # decay_steps fixed so a 3- or 6-step run continued to 8 follows the 8-step run's schedule
    return ["model.preset=gpt2-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_positions=32",
            "train.batch_size=16", "train.log_every=1", "train.eval_every=4", "train.save_every=5",
            "train.eval_batches=1", "train.sample_tokens=0", "optim.warmup_steps=2", "optim.lr=3e-3",
            f"optim.decay_steps={STEPS}", f"data.source={corpus}", f"data.cache_dir={cache}", f"train.out_dir={out}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(argv, timeout=420):
    """`python *argv(port, i)` for i = 0, 1, with 2 devices each and a free coordinator port; returns their
    (returncode, output)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *argv(port, i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=orchestration_env(2), cwd=ROOT) for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs)]


def run_two_processes(args):
    """train.py in 2 processes with 2 devices each; returns their (returncode, output)."""
    return two_processes(lambda port, i: [str(ROOT / "train.py"), *args, f"parallel.coordinator_address=127.0.0.1:{port}",
                                          "parallel.num_processes=2", f"parallel.process_id={i}"])


def train_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_losses(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *base_args(corpus, tmp / "run", tmp / "cache"),
                           f"train.steps={STEPS}", "parallel.strategy=single"],
                          capture_output=True, text=True, env=orchestration_env(1), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in train_records(tmp / "run") if r["kind"] == "train"]


def test_two_processes_match_single_process_and_resume_across_strategies(tmp_path, corpus, single_losses):
    """pmap to step 3, then mesh (data 2 x fsdp 2) to step 6, then pmap to step 8, each run restoring the
    2-process checkpoint the other strategy saved: the single-process losses, one log line per step."""
    run_dir = tmp_path / "run"
    args = base_args(corpus, run_dir, tmp_path / "cache")
    chain = [(3, ["parallel.strategy=pmap"]), (6, ["parallel.strategy=mesh", "parallel.data=2", "parallel.fsdp=2"]),
             (STEPS, ["parallel.strategy=pmap"])]
    previous = None
    for steps, strategy in chain:
        (rc0, out0), (rc1, out1) = run_two_processes(args + [f"train.steps={steps}"] + strategy)
        assert rc0 == 0 and rc1 == 0, f"process 0:\n{out0[-4000:]}\nprocess 1:\n{out1[-4000:]}"
        # each process reads its own half of every global batch
        assert "process 0 of 2: 2 of 4 devices; reads rows 0..7 of each global batch of 16" in out0
        assert "process 1 of 2: 2 of 4 devices; reads rows 8..15 of each global batch of 16" in out1
        # only process 0 reports
        assert f"done: step {steps}" in out0 and "config:" in out0 and "val loss" in out0
        assert "done:" not in out1 and "val loss" not in out1 and "config:" not in out1
        assert (run_dir / "checkpoints" / str(steps)).is_dir()
        assert (previous is None) == ("resuming from step" not in out0)
        if previous is not None:
            assert f"resuming from step {previous}" in out0
        if strategy == ["parallel.strategy=pmap"]:
            assert "parallel: pmap over 2 local devices on each of 2 processes (cpu); global batch 16, " in out0
        else:
            assert "parallel: mesh {'data': 2, 'fsdp': 2, " in out0
        previous = steps

    records = train_records(run_dir)
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1)), "one writer: every step logged exactly once"
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 4, 6, 8]  # every 4 steps and each run's end


def test_single_strategy_in_a_multi_process_run_is_a_clear_error(tmp_path, corpus):
    results = run_two_processes(base_args(corpus, tmp_path / "run", tmp_path / "cache")
                                + ["train.steps=1", "parallel.strategy=single"])
    for rc, out in results:
        assert rc == 2, out[-2000:]
        assert ("parallel.strategy=single runs on one device, but this is a 2-process run; use parallel.strategy=pmap "
                "or mesh\n") in out, out[-2000:]


def test_where_the_distributed_settings_come_from(monkeypatch):
    from gpt_jax.config import ConfigError, ParallelConfig
    from gpt_jax.distributed import distributed_args

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_PROCID",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_args(ParallelConfig()) is None  # a plain single-process run
    # `on` hands everything unset to JAX's own cluster detection (TPU pod slices)
    assert distributed_args(ParallelConfig(distributed="on")) == {
        "coordinator_address": None, "num_processes": None, "process_id": None}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed_args(ParallelConfig()) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed_args(ParallelConfig(distributed="off")) is None
    # the config wins over the environment
    assert distributed_args(ParallelConfig(coordinator_address="h:9", process_id=0))["coordinator_address"] == "h:9"
    with pytest.raises(ConfigError, match=r"process_id=4 is outside \[0, 4\)"):
        distributed_args(ParallelConfig(process_id=4))
    with pytest.raises(ConfigError, match="needs a port"):
        distributed_args(ParallelConfig(coordinator_address="10.0.0.1"))
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='x' is not an integer"):
        distributed_args(ParallelConfig())
    # a 2-task SLURM step is detected without an address: JAX finds the coordinator itself
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert distributed_args(ParallelConfig()) == {"coordinator_address": None, "num_processes": None,
                                                  "process_id": None}
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed_args(ParallelConfig()) is None


def test_a_multi_process_run_locks_its_directory_once_and_every_process_stops(tmp_path, corpus):
    """Process 0 takes the run directory's lock; when another run holds it, every process stops."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from test_rundir import LOCKER

    owner = subprocess.Popen([sys.executable, "-c", LOCKER, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert owner.stdout.readline().strip() == "locked"
        (rc0, out0), (rc1, out1) = run_two_processes(base_args(corpus, run_dir, tmp_path / "cache")
                                                     + ["train.steps=1", "parallel.strategy=pmap"])
    finally:
        owner.kill()
        owner.wait()
    assert rc0 == 4 and f"in use by process {owner.pid}" in out0 and "Traceback" not in out0, out0[-2000:]
    assert rc1 == 4 and "process 0 could not lock" in out1 and "Traceback" not in out1, out1[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


SAVER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    port, pid, run_dir = sys.argv[1:]
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(pid))
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from orbax.checkpoint._src.multihost import multihost
    from gpt_jax.checkpoint import Checkpointer

    keys, make = [], multihost.unique_barrier_key  # every barrier key orbax builds, in order
    def record(key, **kw):
        keys.append(make(key, **kw))
        return keys[-1]
    multihost.unique_barrier_key = record
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P())
    state = lambda step: {"w": jax.make_array_from_callback((4,), sharding, lambda i: np.arange(4.0)[i] + step)}
    ckpt = Checkpointer(run_dir)
    for step in range(1, 7):  # the newest and the best checkpoint of each step, saved at once
        ckpt.save(step, state(step), {"step": step}, best=True)
    ckpt.wait()
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)}
    restored = [ckpt.restore_latest(abstract, manager=m) for m in (ckpt.last, ckpt.best)]
    ckpt.close()
    print(json.dumps({"keys": keys, "restored": [[r[2], np.asarray(r[0]["w"]).tolist()] for r in restored]}))
""")


def test_two_processes_save_the_newest_and_the_best_checkpoint_of_a_step_at_once(tmp_path):
    """A step's newest and best checkpoints are written by two orbax managers at once, each finishing in
    background threads that wait at barriers across the processes. orbax asks that no process wait on one
    barrier name twice: a key shared by the two managers can pair one process's wait for the newest checkpoint
    with the other's for the best (seen: both processes hang at a barrier, most runs).
    Two processes save both checkpoints of 6 steps: they finish, each step's barrier names are used once per
    process, and both checkpoints restore the last step's array."""
    try:
        results = two_processes(lambda port, i: ["-c", SAVER, str(port), str(i), str(tmp_path / "run")], timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the two processes saving checkpoints hung at a barrier")
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i}:\n{out[-4000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        per_step = [k for k in result["keys"] if re.search(r"\.[1-6]$", k)]  # those naming a step
        assert len(per_step) >= 6 * 2 * 2, result["keys"]  # written and committed, newest and best, each step
        assert len(set(per_step)) == len(per_step), sorted(per_step)
        assert result["restored"] == [[6, [6.0, 7.0, 8.0, 9.0]]] * 2


def test_two_processes_fine_tune_as_one(tmp_path, corpus):
    rng = np.random.default_rng(0)
    for name, n in (("train.tsv", 44), ("dev.tsv", 20)):
        texts = ["".join(rng.choice(list("ab "), rng.integers(4, 12))) for _ in range(n)]
        (tmp_path / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{int(s.count('a') > s.count('b'))}\n"
                                                                   for s in texts))
    args = ["mode=finetune", "model.preset=gpt1-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "model.n_positions=16", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            f"finetune.train_file={tmp_path / 'train.tsv'}", f"finetune.dev_file={tmp_path / 'dev.tsv'}",
            "finetune.batch_size=8", "finetune.epochs=1", "finetune.lr=3e-3", "finetune.dropout=0",
            "finetune.clf_pdrop=0", "train.log_every=1"]
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"train.out_dir={tmp_path / 'single'}"],
                            capture_output=True, text=True, env=orchestration_env(1), cwd=ROOT, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    results = run_two_processes(args + [f"train.out_dir={tmp_path / 'two'}", "parallel.strategy=mesh",
                                        "parallel.data=2", "parallel.fsdp=2"])
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"process {i}:\n{out[-4000:]}"
    assert "reads rows 4..7 of each global batch of 8" in results[1][1]
    assert "done: step 6 of 6 (1 epochs)" in results[0][1] and "done:" not in results[1][1]
    one, two = train_records(tmp_path / "single"), train_records(tmp_path / "two")
    assert [r["step"] for r in two if r["kind"] == "train"] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in two if r["kind"] == "train"],
                               [r["loss"] for r in one if r["kind"] == "train"], rtol=1e-5)
    assert [r["dev_accuracy"] for r in two if r["kind"] == "eval"] == [r["dev_accuracy"] for r in one
                                                                       if r["kind"] == "eval"]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, corpus):
    """SIGTERM to process 1 alone: both processes save one checkpoint at the same step and exit with
    128 + 15, and process 0 says that another process received the signal."""
    import signal
    import time

    run_dir = tmp_path / "run"
    port = free_port()
    args = base_args(corpus, run_dir, tmp_path / "cache") + ["train.steps=100000", "train.eval_every=100000",
                                                             "train.save_every=100000", "parallel.strategy=pmap"]
    logs = [open(tmp_path / f"out{i}.txt", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args,
                               f"parallel.coordinator_address=127.0.0.1:{port}", "parallel.num_processes=2",
                               f"parallel.process_id={i}"], stdout=logs[i], stderr=subprocess.STDOUT, text=True,
                              env=orchestration_env(2), cwd=ROOT) for i in range(2)]
    try:
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and len(train_records(run_dir)) >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "out0.txt").read_text()
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    out0 = (tmp_path / "out0.txt").read_text()
    assert codes == [128 + signal.SIGTERM] * 2, out0[-3000:]
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    steps = [r["step"] for r in train_records(run_dir) if r["kind"] == "train"]
    assert len(saved) == 1 and steps[-1] == saved[0] and steps == list(range(1, saved[0] + 1))
    assert f"another process received SIGTERM: saved a checkpoint at step {saved[0]}" in out0
