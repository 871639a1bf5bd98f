"""The training loop (gpt_jax/loop.py), in process on tiny models: prefetching and several steps per
dispatch change nothing, metrics are read a step behind, the multi-host stop check runs only every
log interval, evaluation reads the device once; fine-tuning through the same loop resumes (its data
order too) after SIGKILL or SIGTERM, runs on every strategy, and its runs stay readable."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, compiled_alike, orchestration_env
from gpt_jax import loop
from gpt_jax.config import load_config

# every test here compares runs of the loop with one another or reads their logs (conftest.compiled_alike); the
# SIGKILL/SIGTERM test's train.py processes compile as a user's run does
pytestmark = pytest.mark.usefixtures("unoptimized")

LM = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_positions=16",
      "train.batch_size=8", "train.eval_batches=2", "train.log_every=1", "train.sample_tokens=0", "optim.lr=3e-3",
      "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loop")
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text("".join(rng.choice(list("abcd \n"), 20_000)))

    def rows(n):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            s = "".join(rng.choice(list("ab "), rng.integers(4, 12)))
            lines.append(f"{s}\t{int(s.count('a') > s.count('b'))}")
        return "\n".join(lines) + "\n"

    (tmp / "train.tsv").write_text(rows(44))  # 6 batches of 8, the last one padded
    (tmp / "dev.tsv").write_text(rows(20))
    (tmp / "train_long.tsv").write_text(rows(236))  # 30 batches of 8
    return tmp


def lm_config(corpus, out, *extra):
    return load_config(None, LM + [f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
                                   f"train.out_dir={out}", *extra])


def ft_args(corpus, out, *extra):
    return ["mode=finetune", "model.preset=gpt1-tiny", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
            "model.n_positions=16", f"data.source={corpus / 'corpus.txt'}", f"data.cache_dir={corpus / 'cache'}",
            f"finetune.train_file={corpus / 'train.tsv'}", f"finetune.dev_file={corpus / 'dev.tsv'}",
            "finetune.batch_size=8", "finetune.epochs=2", "finetune.lr=1e-3", "train.log_every=1",
            f"train.out_dir={out}", *extra]


def ft_config(corpus, out, *extra):
    return load_config(None, ft_args(corpus, out, *extra))


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def another_process_takes(run_dir) -> bool:
    """Whether another process can lock `run_dir` at once (the run that had it let go)."""
    from test_rundir import LOCKER

    taker = subprocess.Popen([sys.executable, "-c", LOCKER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        return taker.stdout.readline().strip() == "locked"
    finally:
        taker.kill()
        taker.wait()


def run_task(config, loop_cls=loop.Loop, **attrs):
    from gpt_jax.finetune import FinetuneTask
    from gpt_jax.pretrain import PretrainTask

    task = (FinetuneTask if config.mode == "finetune" else PretrainTask)(config, verbose=False)
    lp = loop_cls(task, verbose=False)
    for k, v in attrs.items():
        setattr(lp, k, v)
    return lp.run()


def test_prefetch_and_steps_per_call_give_the_same_run_one_read_per_evaluation_and_true_rates(corpus, tmp_path, monkeypatch):
    from gpt_jax.data import eval_batches, prepare
    from gpt_jax.pretrain import make_eval_step

    reads, real_evaluate, real_get = [], loop.Loop._evaluate, jax.device_get

    def evaluate_counting_reads(self, step):  # every device read during an evaluation
        reads.append(0)
        outside = jax.device_get
        monkeypatch.setattr(jax, "device_get", lambda x: (reads.__setitem__(-1, reads[-1] + 1), real_get(x))[1])
        try:
            return real_evaluate(self, step)
        finally:
            monkeypatch.setattr(jax, "device_get", outside)

    monkeypatch.setattr(loop.Loop, "_evaluate", evaluate_counting_reads)
    args = ("train.steps=9", "train.eval_every=5", "train.save_every=5", "train.eval_batches=3")
    ref = run_task(lm_config(corpus, tmp_path / "ref", "data.prefetch=0", *args))
    # batches from a background thread, and up to 3 steps per dispatch: steps 1-3, 4-5, 6-8, 9. Every read
    # of a call's metrics takes at least 0.2 s here, so no call of n <= 3 steps runs faster than
    # n * tokens_per_step / 0.2 tokens/s: each logged rate must respect that bound.
    monkeypatch.setattr(jax, "device_get", lambda x: (time.sleep(0.2), real_get(x))[1])
    got = run_task(lm_config(corpus, tmp_path / "got", "data.prefetch=2", "train.steps_per_call=3", *args))
    monkeypatch.setattr(jax, "device_get", real_get)
    rates = [r["tokens_per_s"] for r in records(tmp_path / "got")]
    assert all(0 < r <= 3 * 8 * 16 / 0.2 for r in rates), rates
    np.testing.assert_allclose([r["loss"] for r in records(tmp_path / "got")],
                               [r["loss"] for r in records(tmp_path / "ref")], rtol=1e-6)
    assert [r["step"] for r in records(tmp_path / "got")] == list(range(1, 10))
    assert [r["step"] for r in records(tmp_path / "got", "eval")] == [5, 9]
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(ref["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert sorted(int(p.name) for p in (tmp_path / "got" / "checkpoints").iterdir() if p.name.isdigit()) == [5, 9]
    assert reads == [1] * 4  # each evaluation is one device call, read once
    config = ref["config"]
    step = jax.jit(make_eval_step(config))
    val = eval_batches(prepare(config.data, verbose=False).tokens("val"), 16, 8, 3)
    direct = np.mean([float(step(ref["params"], b)) for b in val])
    np.testing.assert_allclose(records(tmp_path / "ref", "eval")[-1]["val_loss"], direct, rtol=1e-5)
    # each step logs the learning rate the schedule gives its optimizer step (0 for the first: warmup starts at 0)
    from gpt_jax.optim import make_schedule

    schedule = make_schedule(config.optim, config.train.steps)
    for run in ("ref", "got"):
        np.testing.assert_allclose([r["lr"] for r in records(tmp_path / run)], [float(schedule(s)) for s in range(9)],
                                   rtol=1e-6, atol=1e-12)
    # the summary train() returns: the last evaluation's loss and the lowest (the two differ: the loss falls)
    evals = [r["val_loss"] for r in records(tmp_path / "ref", "eval")]
    assert "evals" not in ref and ref["val_loss"] == evals[-1] and ref["best_val"] == min(evals) != max(evals)
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in records(tmp_path / "ref", "eval"))


def test_the_config_line_lists_the_settings_that_differ_from_the_defaults():
    """A run's `config:` line: each setting that differs from the defaults, as section.key=value (a
    run config pads the vocabulary to 128), the top-level mode when not `train`, and the finetune section
    only in a fine-tuning run."""
    from gpt_jax.loop import describe_config

    assert describe_config(load_config(None, ["train.steps=7", "model.n_layer=3", "finetune.lr=0.5"])) == \
        "model.n_layer=3 model.pad_vocab_multiple=128 train.steps=7"
    assert describe_config(load_config(None, ["mode=finetune", "finetune.lr=0.5", "model.pad_vocab_multiple=1"])) == \
        "finetune.lr=0.5 mode=finetune"


def test_calls_group_up_to_steps_per_call_and_end_at_each_evaluation_checkpoint_and_the_last_step():
    """placed_chunks: from the step a run starts after, calls of up to `train.steps_per_call` steps, each
    ending at the latest on a boundary (an evaluation, a checkpoint, the last step); a call of n > 1
    steps stacks their batches [n, ...] and places them with the rows on axis 2 (lead 2); each call
    carries the data state after its last batch."""
    import types

    from gpt_jax.loop import boundary, placed_chunks

    tc = types.SimpleNamespace(steps=11, eval_every=5, save_every=4)
    assert [s for s in range(1, 13) if boundary(tc, s)] == [4, 5, 8, 10, 11, 12]

    def batches(data_state):
        i = data_state["i"]
        while True:
            i += 1
            yield {"x": np.full((2, 3), i)}, {"i": i}  # a batch [A, b] and the data state after it

    task = types.SimpleNamespace(config=types.SimpleNamespace(train=tc), batches=batches)
    strategy = types.SimpleNamespace(put_batch=lambda batch, lead: (lead, batch))
    calls = [(first, n, lead, batch["x"], state["i"]) for first, n, (lead, batch), state
             in placed_chunks(task, strategy, start=1, data_state={"i": 1}, per_call=3)]
    assert [c[:3] + (c[4],) for c in calls] == [(2, 3, 2, 4), (5, 1, 1, 5), (6, 3, 2, 8), (9, 2, 2, 10), (11, 1, 1, 11)]
    for first, n, _, x, _ in calls:  # batch i for step i
        want = np.full((2, 3), first) if n == 1 else np.stack([np.full((2, 3), first + k) for k in range(n)])
        np.testing.assert_array_equal(x, want)


def test_a_non_finite_step_names_the_last_good_checkpoint_and_removes_the_later_ones(tmp_path):
    """A non-finite loss at step s condemns the parameters of step s - 1 (they gave it), non-finite
    updated parameters those of step s: the error says which happened, removes every checkpoint from the
    first bad step on, and names the newest one left, or says that a rerun starts from step 0."""
    import types

    from gpt_jax.loop import nonfinite_error

    class Saved:  # the checkpoints on disk, as the Checkpointer lists and deletes them
        def __init__(self, steps):
            self.saved, self.waited = list(steps), False
            self.last = types.SimpleNamespace(delete=self.saved.remove)

        def wait(self):
            self.waited = True

        def steps(self):
            return list(self.saved)

    advice = ". Lower optim.lr, raise optim.warmup_steps or check the data, then rerun to resume"
    ckpt = Saved([2, 3, 4])
    e = nonfinite_error(4, {"loss": float("nan")}, ckpt, tmp_path)
    assert ckpt.waited and ckpt.saved == [2]
    assert str(e) == (f"loss is nan at step 4; stopping. The last good checkpoint is step 2 in {tmp_path / 'checkpoints'} "
                      f"(removed step 3, 4: non-finite from there){advice}")
    ckpt = Saved([2, 4])
    e = nonfinite_error(5, {"loss": 2.5}, ckpt, tmp_path)
    assert ckpt.saved == [2, 4] and str(e) == ("the updated parameters are not finite at step 5; stopping. The last good "
                                               f"checkpoint is step 4 in {tmp_path / 'checkpoints'}{advice}")
    ckpt = Saved([1])
    e = nonfinite_error(2, {"loss": float("inf")}, ckpt, tmp_path)
    assert ckpt.saved == [] and str(e) == (f"loss is inf at step 2; stopping. No checkpoint comes before it, so a rerun "
                                           f"starts from step 0 in {tmp_path} (removed step 1: non-finite from there){advice}")
    assert isinstance(e, FloatingPointError)


def test_prefetcher_keeps_order_passes_errors_and_stops_its_thread():
    def items():
        yield from range(5)
        raise ValueError("bad batch")

    for depth in (0, 1, 2):
        got, prefetch = [], loop.Prefetcher(items(), depth)
        with pytest.raises(ValueError, match="bad batch"):
            for x in prefetch:
                got.append(x)
        prefetch.close()
        assert got == list(range(5))
    for depth in (1, 2):
        endless = loop.Prefetcher(iter(int, 1), depth)  # an endless source, abandoned after one item
        assert next(endless) == 0
        # a daemon, so it never keeps the process alive, named for thread dumps
        assert endless.thread.daemon and endless.thread.name == "gpt_jax-prefetch"
        time.sleep(0.05)  # the thread fills the queue and waits for room
        endless.close()
        assert not endless.thread.is_alive()


def test_each_logged_rate_counts_the_steps_and_seconds_since_the_last_record_leaving_out_evaluations(
        corpus, tmp_path, monkeypatch):
    """A train record's tokens_per_s: the steps since the previous record times tokens per step, over the
    seconds their calls took, from the start of the run or the end of the last evaluation and checkpoint. Here
    the run's clock moves only while the main thread reads a result from the device, one second per read, so
    every rate is one step's tokens per second, windows of two steps and a window an evaluation splits alike."""
    import threading
    import types

    from gpt_jax.flops import flops_per_token

    clock, real_get = [1000.0], jax.device_get

    def device_get(x):
        if threading.current_thread() is threading.main_thread():
            clock[0] += 1.0
        return real_get(x)

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(jax, "device_get", device_get)
    monkeypatch.setattr(loop, "device_peak_flops", lambda dtype: (1e12, "a stated peak"))
    args = ("train.steps=6", "train.log_every=2", "train.eval_every=3", "train.save_every=100", "data.prefetch=0")
    summary = run_task(lm_config(corpus, tmp_path / "one", *args))
    rates = {r["step"]: r["tokens_per_s"] for r in records(tmp_path / "one")}
    assert rates == {2: 8 * 16, 4: 8 * 16, 6: 8 * 16}  # batch 8 x 16 positions per step, one step a second
    model = load_config(tmp_path / "one" / "config.yaml", saved_run=True).model  # with the data's vocabulary
    for r in records(tmp_path / "one"):  # model FLOPs per second over the stated peak
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token(model, 16) / 1e12, rel=1e-9)
    assert summary["loss"] == records(tmp_path / "one")[-1]["loss"]  # the closing line's train loss
    assert all(set(r) == {"kind", "step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
               for r in records(tmp_path / "one"))  # what a step's metrics hold ("finite" is read, not logged)
    # two steps per call (1-2, 3, 4-5, 6): a call's second is shared by its steps, so steps 1-2 took 1 s,
    # steps 3-4 and 5-6 1.5 s each
    run_task(lm_config(corpus, tmp_path / "two", *args, "train.steps_per_call=2"))
    rates = {r["step"]: r["tokens_per_s"] for r in records(tmp_path / "two")}
    assert rates == {2: 2 * 8 * 16 / 1.0, 4: 2 * 8 * 16 / 1.5, 6: 2 * 8 * 16 / 1.5}


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    """A non-finite loss read at step 5 stops the run with one error: the loss, the step, the checkpoint at
    step 4 removed (its parameters gave that loss) and step 2 named as the last good one."""
    reads, real_get = [], jax.device_get

    def device_get(x):  # the fifth read of a step's metrics says its loss is nan
        out = real_get(x)
        if isinstance(out, dict) and "finite" in out:
            reads.append(1)
            if len(reads) == 5:
                out = {**out, "loss": np.full_like(out["loss"], np.nan)}
        return out

    monkeypatch.setattr(jax, "device_get", device_get)
    run_dir = tmp_path / "run"
    with pytest.raises(FloatingPointError) as stop:
        run_task(lm_config(corpus, run_dir, "train.steps=8", "train.save_every=2", "train.eval_every=100",
                           "data.prefetch=0", "train.keep_checkpoints=5"))
    assert str(stop.value).startswith(f"loss is nan at step 5; stopping. The last good checkpoint is step 2 in "
                                      f"{run_dir / 'checkpoints'} (removed step 4: non-finite from there).")
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / "best").exists() or not any(p.name.isdigit() for p in (run_dir / "best").iterdir()), \
        "no evaluation ran, so no checkpoint is the best"
    # the run let go of its directory though its error (and every frame of the run) is still alive, as a
    # notebook keeps the last one: another process takes it at once
    assert stop.tb is not None and another_process_takes(run_dir)


def test_multi_host_stop_check_runs_every_log_interval(corpus, tmp_path, monkeypatch):
    calls, stop_at = [], [3]  # as if another process had received SIGTERM by the third check
    monkeypatch.setattr(loop, "any_process", lambda flag: calls.append(flag) or len(calls) in stop_at)
    config = lm_config(corpus, tmp_path / "run", "train.steps=20", "train.log_every=3", "train.eval_every=100",
                       "train.save_every=100")
    result = run_task(config, processes=2)
    assert calls == [False] * 3  # this process's own flag: it received no signal
    assert result["interrupted"] == "SIGTERM" and result["step"] == 9  # checks at steps 3, 6 and 9 only
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()] == ["9"]
    calls.clear(), stop_at.clear()
    run_dir = tmp_path / "run"
    (run_dir / "loss.png").unlink()  # drawn by the first run, as process 0
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    run_task(config, processes=2, main=False)  # resumed as process 1: checks at 12, 15, 18 and the last step, 20
    assert calls == [False] * 4
    # only process 0 writes metrics.jsonl and draws loss.png (the run directory may be shared)
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics and not (run_dir / "loss.png").exists()
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [9, 20]


@pytest.mark.parametrize("process", [0, 1])
def test_process_0_prepares_the_data_before_the_others_look_for_it(monkeypatch, process):
    """In a multi-host run process 0 prepares the token files (showing its progress) and then meets the
    others at a barrier; every other process prepares (finds them in the shared cache) only after it, quietly."""
    from gpt_jax import runs

    events = []
    monkeypatch.setattr(runs.jax, "process_index", lambda: process)
    monkeypatch.setattr(runs, "barrier", lambda name: events.append("barrier"))
    config = load_config(None, LM)
    monkeypatch.setattr(runs, "prepare", lambda data, **kw: events.append(("prepare", kw)) or
                        (data is config.data and "tokens"))
    assert runs.prepare_data(config, verbose=True) == "tokens"
    assert events == ([("prepare", {"verbose": True}), "barrier"] if process == 0
                      else ["barrier", ("prepare", {"verbose": False})])


@pytest.mark.parametrize("index, count, strategy, samples", [
    (0, 1, "single", True), (0, 1, "mesh", True), (0, 2, "pmap", True), (1, 2, "pmap", False), (0, 2, "mesh", False)])
def test_only_process_0_samples_and_not_from_a_mesh_sharded_across_processes(corpus, tmp_path, monkeypatch,
                                                                            index, count, strategy, samples):
    """Samples during pretraining come from process 0 alone, and not at all when the mesh strategy spreads
    the model over several processes (sampling would need every one of them). A new task starts with no loss,
    and hands the loop its tokens per step, its parameters' logical axes and its state's shapes."""

    from gpt_jax import pretrain, runs
    from gpt_jax.model import init_params, logical_axes

    monkeypatch.setattr(pretrain.jax, "process_index", lambda: index)
    monkeypatch.setattr(pretrain.jax, "process_count", lambda: count)
    monkeypatch.setattr(runs, "barrier", lambda name: None)
    task = pretrain.PretrainTask(lm_config(corpus, tmp_path / "run", f"parallel.strategy={strategy}"), verbose=False)
    assert task.can_sample is samples and math.isnan(task.last_loss)
    # what the loop takes from a task: tokens per step (batch 8 x 16 positions), the parameters' logical
    # axes for the mesh, and the state's shapes (those of the model's own parameters)
    assert (task.seq_len, task.tokens_per_step) == (16, 8 * 16)
    assert task.param_specs == logical_axes(task.config.model)
    shapes = jax.tree.map(lambda x: x.shape, task.abstract_state().params)
    assert shapes == jax.tree.map(lambda x: x.shape, init_params(task.config.model, jax.random.key(0)))


def test_each_evaluation_reports_its_losses_and_a_sample_of_the_configured_length(corpus, tmp_path):
    """After an evaluation the task reports the step's train and validation losses and, with
    train.sample_tokens > 0, a sample: train.sample_prompt continued by that many tokens at
    train.sample_temperature, seeded by the step, as `sample_text` (what train.py prints at the end) gives it."""
    import dataclasses

    from gpt_jax.pretrain import PretrainTask, init_state

    from gpt_jax.runs import sample_text

    task = PretrainTask(lm_config(corpus, tmp_path / "run", "train.sample_tokens=5", "train.sample_prompt=ab",
                                  "train.sample_temperature=1.5"), verbose=False)
    # initial weights times 6: peaked next-token distributions, so the temperature changes the sample
    params = jax.tree.map(lambda x: x * 6, init_state(task.config, task.optimizer).params)
    task.observe({"loss": 2.5})
    record = {"val_loss": 2.25, "val_ppl": 9.4877}

    def sample(n, seed=7, temperature=1.5):
        return sample_text(task.config, params, task.tokenizer, "ab", n, seed=seed, temperature=temperature)

    lines = task.after_eval(params, 7, record, improved=True)
    assert lines == ["step 7: train loss 2.5000, val loss 2.2500 (ppl 9.49)", sample(5)]
    assert len(lines[1]) == 2 + 5 and lines[1].startswith("ab")  # one character per token
    assert sample(5) not in (sample(5, seed=8), sample(5, temperature=0.8))  # seed and temperature both show
    for n in (1, 0):
        task.config = dataclasses.replace(task.config, train=dataclasses.replace(task.config.train, sample_tokens=n))
        assert task.after_eval(params, 7, record, improved=False)[1:] == ([sample(1)] if n else [])


def test_sample_text_defaults_empty_prompt_and_a_sample_longer_than_the_context(monkeypatch):
    """sample_text (train.py's samples) asks generate for temperature 0.8, top-k 200 (at most the
    vocabulary) and seed 0 unless told otherwise; an empty prompt starts from <|endoftext|> (token 0 for a
    tokenizer without one); a sample stops at the context (model.n_positions)."""
    import importlib
    import types

    from gpt_jax.runs import sample_text

    calls = []

    def generate(model, params, prompts, n, **kw):  # what sample_text asks for, and n tokens of id 5
        calls.append((model.vocab_size, prompts, n, kw))
        return [[5] * n], None

    monkeypatch.setattr(importlib.import_module("gpt_jax.runs"), "generate", generate)
    big, small = (load_config(None, ["model.preset=gpt2-tiny", "model.n_positions=16", f"model.vocab_size={v}"])
                  for v in (512, 100))
    tok = types.SimpleNamespace(encode=lambda s: [ord(c) for c in s], decode=lambda ids: "".join("f" for _ in ids),
                                eot_id=None)
    assert sample_text(big, None, tok, "ab", 3) == "abfff"
    assert calls[-1] == (512, [[97, 98]], 3, {"temperature": 0.8, "top_k": 200, "rng": 0})
    assert sample_text(small, None, tok, "ab", 100, seed=3, temperature=1.5, top_k=None) == "ab" + "f" * 14
    assert calls[-1] == (100, [[97, 98]], 14, {"temperature": 1.5, "top_k": 0, "rng": 3})
    sample_text(small, None, tok, "", 2)
    assert calls[-1][1:] == ([[0]], 2, {"temperature": 0.8, "top_k": 100, "rng": 0})
    sample_text(small, None, types.SimpleNamespace(**{**vars(tok), "eot_id": 7}), "", 2)
    assert calls[-1][1] == [[7]]


def test_keep_every_keeps_those_steps_besides_the_newest_also_after_resuming(corpus, tmp_path):
    from gpt_jax.config import ConfigError

    def on_disk():
        return sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())

    keep = ["train.save_every=1", "train.eval_every=100", "train.keep_checkpoints=1", "train.keep_every=3"]
    run_task(lm_config(corpus, tmp_path / "run", "train.steps=4", *keep))
    assert on_disk() == [3, 4]
    run_task(lm_config(corpus, tmp_path / "run", "train.steps=8", *keep))  # resumed from step 4
    assert on_disk() == [3, 6, 8]
    # a kept step restores as itself: the first 3 steps of the 4-step run, run again on their own
    from gpt_jax.runs import restore_params

    run_task(lm_config(corpus, tmp_path / "three", "train.steps=3", "optim.decay_steps=4", *keep))
    kept, newest = (jax.tree.leaves(restore_params(tmp_path / "run", step=s)) for s in (3, 8))
    for a, b in zip(kept, jax.tree.leaves(restore_params(tmp_path / "three", "last")), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(a, b) for a, b in zip(kept, newest, strict=True))
    with pytest.raises(ConfigError, match="train.keep_every=3 is not a multiple of train.save_every=2"):
        lm_config(corpus, tmp_path / "other", "train.save_every=2", "train.keep_every=3")
    with pytest.raises(ConfigError, match="train.keep_every must be >= 1, got 0"):
        lm_config(corpus, tmp_path / "other", "train.keep_every=0")


class Recording(loop.Loop):
    """Records, for every step's metrics, how many steps had been dispatched when they were read."""

    def _flush(self):
        if self.pending is not None:
            self.reads.append((self.pending[0], int(jax.device_get(self.state.step))))
        super()._flush()


@pytest.fixture(scope="module")
def ft_run(corpus, tmp_path_factory):
    """A fine-tuning run through the loop, with when its metrics were read."""
    run_dir, reads = tmp_path_factory.mktemp("ft") / "run", []
    with compiled_alike():
        run_task(ft_config(corpus, run_dir, "train.save_every=100"), Recording, reads=reads)
    return run_dir, reads


def test_finetuning_reads_metrics_a_step_behind_and_evaluates_each_epoch(ft_run):
    run_dir, reads = ft_run
    steps = 12  # 2 epochs of 6 batches
    evals = records(run_dir, "eval")
    assert [(r["step"], r["epoch"]) for r in evals] == [(6, 1), (12, 2)]
    assert all(0 <= r["dev_accuracy"] <= 1 and r["dev_loss"] > 0 for r in evals)
    for r in records(run_dir):  # the objective: the task's loss plus lm_coef (0.5) times the auxiliary LM loss
        np.testing.assert_allclose(r["loss"], r["task_loss"] + 0.5 * r["lm_loss"], rtol=1e-5)
    for r in evals:  # fractions of each epoch's 44 training examples and of the 20 dev examples, counted from 0
        assert abs(r["train_accuracy"] * 44 - round(r["train_accuracy"] * 44)) < 1e-5, r
        assert abs(r["dev_accuracy"] * 20 - round(r["dev_accuracy"] * 20)) < 1e-5, r
    assert [r["step"] for r in records(run_dir)] == list(range(1, steps + 1))
    behind = {step for step, dispatched in reads if dispatched > step}
    assert behind == set(range(1, steps + 1)) - {6, 12}  # only evaluation steps wait for their own metrics
    # GPT-1's schedule: warmup over finetune.warmup_fraction 0.002 of the 12 steps (at least one step, from 0),
    # then linear to 0 at step 12; each step logs the rate its optimizer step used (finetune.lr 1e-3)
    np.testing.assert_allclose([r["lr"] for r in records(run_dir)], [0.0] + [1e-3 * (1 - k / 11) for k in range(11)],
                               rtol=1e-6, atol=1e-12)


def test_predict_and_evaluate_read_new_and_earlier_fine_tuning_runs(ft_run, corpus, tmp_path, capsys):
    import shutil

    from gpt_jax import evaluate
    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.predict import predict_file
    from gpt_jax.runs import restore_params
    from gpt_jax.trainer import train

    run_dir = ft_run[0]
    new = predict_file(run_dir, corpus / "dev.tsv", tmp_path / "new.tsv")
    best = max(records(run_dir, "eval"), key=lambda r: r["dev_accuracy"])
    assert new["n"] == 20 and new["accuracy"] == pytest.approx(best["dev_accuracy"])
    # the run's dev loss: the mean over the 20 examples (3 batches of 8, the last with 4 padding rows) of
    # minus the log-probability predict_file gives the gold label
    gold = [int(line.split("\t")[1]) for line in (corpus / "dev.tsv").read_text().splitlines()[1:]]
    probs = [[float(p) for p in line.split("\t")[1:]] for line in (tmp_path / "new.tsv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(best["dev_loss"], -np.mean([np.log(p[y]) for p, y in zip(probs, gold)]), rtol=1e-4)
    # an earlier gpt_jax saved only {"params": ...} and a finetune.json without "format"
    old = tmp_path / "old"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("checkpoints", "best"))
    info = json.loads((old / "finetune.json").read_text())
    del info["format"]
    (old / "finetune.json").write_text(json.dumps(info))
    ckpt = Checkpointer(old, keep=1)
    ckpt.save(best["step"], {"params": restore_params(run_dir)}, {**info, **best}, best=True)
    ckpt.wait()
    ckpt.close()
    assert predict_file(old, corpus / "dev.tsv", tmp_path / "old.tsv")["accuracy"] == new["accuracy"]
    assert (tmp_path / "old.tsv").read_text() == (tmp_path / "new.tsv").read_text()
    (tmp_path / "text.txt").write_text("ab ba aab\nbba " * 8)
    scores = []
    for run in (run_dir, old):
        capsys.readouterr()
        assert evaluate.main(["--checkpoint", str(run), "perplexity", "--input", str(tmp_path / "text.txt")]) == 0
        scores.append(capsys.readouterr().out)
    assert scores[0].startswith("perplexity ") and scores[0] == scores[1]
    with pytest.raises(Exception, match=r"earlier gpt_jax .* cannot be resumed; set train.out_dir to a new directory "
                                        r"\(gpt_jax.predict and gpt_jax.evaluate still read it\)$"):
        train(ft_config(corpus, old), verbose=False)


def test_finetuning_data_order_resumes_mid_epoch(corpus, tmp_path):
    from gpt_jax.finetune import FinetuneTask

    task = FinetuneTask(ft_config(corpus, tmp_path / "run"), verbose=False)
    straight = task.batches({"epoch": 0, "cursor": 0})
    seen = [next(straight) for _ in range(9)]
    assert seen[5][1] == {"epoch": 0, "cursor": 48} and seen[6][1] == {"epoch": 1, "cursor": 8}
    resumed = task.batches(seen[3][1])  # from the state saved after the 4th batch
    for batch, state in seen[4:]:
        again, again_state = next(resumed)
        assert again_state == state
        jax.tree.map(np.testing.assert_array_equal, again, batch)
    first_epoch = np.concatenate([b["labels"][0][b["weight"][0] > 0] for b, _ in seen[:6]])
    assert len(first_epoch) == 44  # every example once per epoch


def test_a_fine_tuning_training_loss_applies_dropout_when_any_one_rate_is_set(corpus, tmp_path):
    """The classifier's dropout or any one of the transformer's three rates alone turns dropout on in the fine-tuning
    loss (two keys, two losses)."""
    from gpt_jax.finetune import FinetuneTask

    for kind in ("clf", "embd", "attn", "resid"):
        rates = [f"model.{k}_pdrop={0.5 if k == kind else 0}" for k in ("embd", "attn", "resid")]
        task = FinetuneTask(ft_config(corpus, tmp_path / kind, "finetune.dropout=null", *rates,
                                      f"finetune.clf_pdrop={0.5 if kind == 'clf' else 0}"), verbose=False)
        batch = jax.tree.map(lambda x: x[0], next(task.batches({"epoch": 0, "cursor": 0}))[0])  # one micro-batch
        loss = jax.jit(lambda p, b, k, task=task: task.loss(p, b, k)[0])
        a, b = (float(loss(task.params, batch, jax.random.key(i))) for i in (1, 2))
        assert abs(a - b) > 1e-5, (kind, a, b)


def test_an_epoch_that_fills_its_last_batch_is_followed_by_the_next_epoch(corpus, tmp_path):
    from gpt_jax.finetune import FinetuneTask

    even = tmp_path / "even.tsv"  # 16 examples: two full batches of 8, no padding
    even.write_text("sentence\tlabel\n" + "".join(f"{'ab'[i % 2] * (i + 1)}\t{i % 2}\n" for i in range(16)))
    task = FinetuneTask(ft_config(corpus, tmp_path / "run", f"finetune.train_file={even}"), verbose=False)
    batches = task.batches({"epoch": 0, "cursor": 0})
    got = [next(batches) for _ in range(4)]
    assert [state for _, state in got] == [{"epoch": e, "cursor": c} for e in (0, 1) for c in (8, 16)]
    assert all(int((b["weight"] > 0).sum()) == 8 for b, _ in got)  # no batch of padding alone between epochs


def test_a_fine_tuning_step_counts_the_correct_predictions_of_its_real_examples(corpus, tmp_path):
    """The train accuracy's counts: a batch's real examples (44 = 5 x 8 + 4: the epoch's sixth batch holds 4 and
    padding) and, of those, the ones whose highest logit is the label's."""
    from gpt_jax.finetune import FinetuneTask, forward

    task = FinetuneTask(ft_config(corpus, tmp_path / "run", "finetune.dropout=0", "finetune.clf_pdrop=0"), verbose=False)
    batches = task.batches({"epoch": 0, "cursor": 0})
    counts = []
    for i in range(6):
        batch = jax.tree.map(lambda x: x[0], next(batches)[0])  # its one micro-batch
        if i in (0, 5):
            _, metrics = task.loss(task.params, batch, jax.random.key(0))
            logits, _ = forward(task.model, "classification", task.params, batch["tokens"], batch["lengths"])
            n = 8 if i == 0 else 4
            hits = (np.asarray(logits).argmax(-1) == np.asarray(batch["labels"]))[:n]
            assert float(metrics["examples"]) == n and float(metrics["correct"]) == hits.sum(), (i, metrics, hits)
            counts.append((int(hits.sum()), n))
    assert any(2 * c != n for c, n in counts), counts  # so a count of the misses would not pass


def test_new_token_rows_and_the_head_are_separate_random_draws(corpus, tmp_path):
    """The special tokens' embedding rows, the classifier head and a random base model each come from their own
    key: no value drawn for one reappears in another (one key for two draws repeats its normals)."""
    from gpt_jax.finetune import FinetuneTask

    task = FinetuneTask(ft_config(corpus, tmp_path / "run"), verbose=False)
    special = task.special
    wte = np.asarray(task.params["gpt"]["wte"]["embedding"])
    rows = wte[[special.start, special.delimiter, special.classify]]

    def values(x):  # all three are N(0, initializer_range) draws in float32: equal draws give equal values
        return set(np.asarray(x, np.float32).ravel().tolist()) - {0.0}

    head, new, base = values(task.params["head"]["kernel"]), values(rows), values(wte[:special.start])
    assert len(head) == task.params["head"]["kernel"].size and len(new) == rows.size
    assert not head & new and not head & base and not new & base


def test_a_fine_tuning_task_pads_to_a_multiple_of_8_and_names_the_file_of_a_bad_example(corpus, tmp_path):
    from gpt_jax.data import DataError
    from gpt_jax.finetune import FinetuneTask

    long = tmp_path / "long.tsv"  # 15 characters + start + classify: 17 tokens, padded to 24 (the context is 32)
    long.write_text("sentence\tlabel\n" + "".join(f"{'ab' * 7}{'ab'[i % 2]}\t{i % 2}\n" for i in range(9)))
    task = FinetuneTask(ft_config(corpus, tmp_path / "run", "model.n_positions=32", f"finetune.train_file={long}"),
                        verbose=False)
    assert task.seq_len == 24 and task.tokens_per_step == 8 * 1 * 24
    assert task.describe() == ["fine-tuning (classification, labels ['0', '1']) from random initialisation: 9 training "
                               "examples, 20 dev; 1 sequence(s) of 24 tokens per example; batch 8, 2 epochs = 4 steps; "
                               "lm_coef 0.5"]
    cut = FinetuneTask(ft_config(corpus, tmp_path / "run", "model.n_positions=32", f"finetune.train_file={long}",
                                 "finetune.max_length=8"), verbose=False)
    long_dev = sum(len(line.split("\t")[0]) + 2 > 8 for line in (corpus / "dev.tsv").read_text().splitlines()[1:])
    assert 0 < long_dev < 20
    assert cut.describe()[1:] == ["truncated 9 of 9 training examples to 8 tokens (finetune.max_length)",
                                  f"truncated {long_dev} of 20 dev examples to 8 tokens (finetune.max_length)"]
    summary = {"best": 0.75, "evals": [{"step": 2}], "step": 2}  # what the loop hands the task at the end
    cut.summarize(summary)
    assert summary == {"step": 2, "best": 0.75, "epochs": [{"step": 2}], "best_dev_accuracy": 0.75,
                       "train_examples": 9, "labels": ["0", "1"], "special": cut.special, "model": cut.model,
                       "truncated": 9 + long_dev}
    pairs = tmp_path / "pairs.tsv"  # similarity: both orderings, two sequences per example, both counted
    pairs.write_text("a\tb\tlabel\nab\tba\t1\nbb\taa\t0\n")
    sim = FinetuneTask(ft_config(corpus, tmp_path / "run", "finetune.task=similarity", f"finetune.train_file={pairs}",
                                 "finetune.dev_file=", "finetune.fields={text: a, text_b: b, label: label}"),
                       verbose=False)
    assert sim.seq_len == 8 and sim.tokens_per_step == 8 * 2 * 8 and " 2 sequence(s) of 8 tokens " in sim.describe()[0]
    bad_dev = tmp_path / "bad_dev.tsv"
    bad_dev.write_text("sentence\tlabel\nab\t1\nba\t7\n")
    with pytest.raises(DataError, match=r"bad_dev.tsv line 3: label '7' is not one of"):
        FinetuneTask(ft_config(corpus, tmp_path / "run", f"finetune.dev_file={bad_dev}"), verbose=False)
    no_text = tmp_path / "no_text.tsv"
    no_text.write_text("text\tlabel\nab\t1\n")
    with pytest.raises(DataError, match=r"no_text.tsv line 2: no field 'sentence'"):
        FinetuneTask(ft_config(corpus, tmp_path / "run", f"finetune.train_file={no_text}"), verbose=False)


def test_a_fine_tuning_task_counts_each_epoch_s_train_accuracy_also_across_a_resume(corpus, tmp_path):
    """The loop hands the task each step's metrics (observe), an epoch's end (eval_record: the train accuracy is
    the correct predictions over the examples seen since the last one; the score that picks the best checkpoint
    is the dev accuracy, or without dev data the train accuracy), a checkpoint's progress and a resume's."""
    from gpt_jax.finetune import FinetuneTask

    task = FinetuneTask(ft_config(corpus, tmp_path / "run"), verbose=False)  # 6 steps an epoch
    assert task.observe({"loss": 1.5, "correct": 3.0, "examples": 8.0}) == {"loss": 1.5}
    task.observe({"correct": 5.0, "examples": 8.0})
    saved = json.loads(json.dumps(task.progress()))  # as a checkpoint's metadata keeps it
    task.observe({"correct": 8.0, "examples": 8.0})  # a step the killed run took after that checkpoint
    task.restore(saved)
    task.observe({"correct": 1.0, "examples": 4.0})
    record, score = task.eval_record(6, {"correct": 7.0, "nll": 9.0})
    assert record == {"kind": "eval", "step": 6, "epoch": 1, "train_accuracy": 9 / 20, "dev_accuracy": 7 / 20,
                      "dev_loss": 9 / 20} and type(record["epoch"]) is int and score == 7 / 20
    assert task.after_eval(None, 6, record, True) == ["epoch 1: train accuracy 0.4500, dev accuracy 0.3500 (best so far)"]
    for step, correct, examples in [(12, 0.0, 1.0), (18, 1.0, 1.0)]:  # each epoch counts from nothing
        task.observe({"correct": correct, "examples": examples})
        record, score = task.eval_record(step, {})  # without dev data
        assert record == {"kind": "eval", "step": step, "epoch": step // 6, "train_accuracy": correct / examples}
        assert score == correct / examples
    assert task.after_eval(None, 18, record, False) == ["epoch 3: train accuracy 1.0000"]
    task.restore({})  # a checkpoint of a run that had seen nothing of its epoch
    task.observe({"correct": 1.0, "examples": 1.0})
    assert task.eval_record(24, {})[0]["train_accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------
# Fine-tuning runs of train.py: SIGKILL, SIGTERM, resume; the parallel strategies on 8 fake devices


def start(corpus, run_dir, *extra):
    args = ft_args(corpus, run_dir, f"finetune.train_file={corpus / 'train_long.tsv'}", "finetune.epochs=3",
                   "train.save_every=4", *extra)  # 90 steps, dropout on: resume must replay its keys too
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=corpus, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc, ready, what):
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None and time.time() < deadline, f"no {what}: {proc.communicate()[1][-2000:]}"
        time.sleep(0.02)


def last_params(run_dir):
    from gpt_jax.runs import restore_params

    return jax.tree.leaves(restore_params(run_dir, "last"))


def test_finetuning_survives_sigkill_and_sigterm_bitwise(corpus, tmp_path):
    ref = start(corpus, tmp_path / "ref")
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    assert "done: step 90 of 90 (3 epochs)" in out and "attention: einsum reference" in out

    run_dir = tmp_path / "run"
    proc = start(corpus, run_dir)  # stopped by SIGTERM after its first step
    metrics = run_dir / "metrics.jsonl"
    wait_for(proc, lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, "first step")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM.value, err[-2000:]
    assert "received SIGTERM: saved a checkpoint at step" in out
    stopped = int(out.split("saved a checkpoint at step ")[1].split()[0])
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert stopped < 90 and max(saved) == stopped  # (a periodic save may come before it on a slow machine)

    proc = start(corpus, run_dir)  # resumes, and is killed somewhere after its next checkpoint
    ckpts = run_dir / "checkpoints"
    wait_for(proc, lambda: any(p.name.isdigit() and int(p.name) > stopped for p in ckpts.iterdir()), "checkpoint")
    time.sleep(np.random.default_rng().uniform(0.0, 0.2))
    assert proc.poll() is None, "the run ended before SIGKILL"
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    assert f"resuming from step {stopped}" in out

    proc = start(corpus, run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming from step" in out
    for a, b in zip(last_params(run_dir), last_params(tmp_path / "ref"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    final = {r["step"]: r["loss"] for r in records(run_dir)}
    assert final == {r["step"]: r["loss"] for r in records(tmp_path / "ref")}
    # each epoch's evaluation, its train accuracy counted over the whole epoch across the interruptions too
    def evals(path):
        return {r["step"]: (r["train_accuracy"], r["dev_accuracy"], r["dev_loss"]) for r in records(path, "eval")}

    assert evals(run_dir) == evals(tmp_path / "ref") and sorted(evals(run_dir)) == [30, 60, 90]


STRATEGIES = textwrap.dedent("""
    import json, sys
    import jax
    from gpt_jax.config import load_config
    from gpt_jax.trainer import train

    args, out = json.loads(sys.argv[1]), sys.argv[2]
    runs = {"single": ["parallel.strategy=single"], "pmap8": ["parallel.strategy=pmap"],
            "mesh_fsdp4_tp2": ["parallel.strategy=mesh", "parallel.data=1", "parallel.fsdp=4", "parallel.tensor=2"]}
    assert jax.device_count() == 8
    result = {}
    for name, extra in runs.items():
        train(load_config(None, args + extra + [f"train.out_dir={out}/{name}"]), verbose=False)
        lines = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
        result[name] = {"loss": [r["loss"] for r in lines if r["kind"] == "train"],
                        "dev_accuracy": [r["dev_accuracy"] for r in lines if r["kind"] == "eval"]}
    print("RESULT " + json.dumps(result))
""")


def test_finetuning_strategies_on_8_devices_match_single_device(corpus, tmp_path):
    args = ft_args(corpus, "unused", "finetune.dropout=0", "finetune.clf_pdrop=0", "finetune.lr=3e-3")
    proc = subprocess.run([sys.executable, "-c", STRATEGIES, json.dumps(args), str(tmp_path)], capture_output=True,
                          text=True, env=orchestration_env(8), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    ref = result.pop("single")
    assert len(ref["loss"]) == 12 and len(ref["dev_accuracy"]) == 2
    for name, got in result.items():
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, err_msg=name)
        assert got["dev_accuracy"] == ref["dev_accuracy"], name


def test_dry_run_of_a_fine_tuning_config_is_a_clear_error():
    from gpt_jax.config import ConfigError
    from gpt_jax.trainer import dry_run

    with pytest.raises(ConfigError, match="mode: finetune run needs its base model and task files"):
        dry_run(load_config(None, ["mode=finetune"]))


def test_a_quiet_run_prints_nothing(corpus, tmp_path, capsys, monkeypatch):
    import io

    from gpt_jax.trainer import train

    class Terminal(io.StringIO):  # where a progress bar would show by default
        def isatty(self):
            return True

    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", Terminal())
    train(lm_config(corpus, tmp_path / "run", "train.steps=2", "train.eval_every=2"), verbose=False)
    assert sys.stdout.getvalue() == ""
    monkeypatch.undo()
    assert capsys.readouterr().out == ""
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"kind": "train"') == 2
    # a fresh run reads the sampler from its start: its checkpoint holds the state after the first 2 batches
    from gpt_jax.data import Sampler, prepare

    config = lm_config(corpus, tmp_path / "run")
    sampler = Sampler(prepare(config.data, verbose=False).tokens("train"), 16, 8, config.train.seed)
    sampler.next(), sampler.next()
    meta = json.loads((tmp_path / "run" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["sampler"] == sampler.state()
    # a command refused by the run's checkpoint lets go of the directory at once, even while its error (and
    # with it every frame of the refused call) is kept, as a notebook keeps the last one
    from gpt_jax.rundir import RunDirError, RunLock

    with pytest.raises(RunDirError, match="does not match") as refused:
        train(lm_config(corpus, tmp_path / "run", "train.steps=2", "train.eval_every=2", "model.n_layer=3"), verbose=False)
    RunLock(tmp_path / "run").release()
    assert refused.tb is not None
    quiet = ("finetune.epochs=1", "finetune.dropout=null", "model.attn_pdrop=0.05")  # fine-tuning too
    m = train(ft_config(corpus, tmp_path / "ft", *quiet), verbose=False)["model"]
    assert capsys.readouterr().out == ""
    assert (tmp_path / "ft" / "metrics.jsonl").read_text().count('"kind": "train"') == 6
    base = ft_config(corpus, tmp_path / "ft", *quiet).model  # finetune.dropout null keeps the model's rates
    assert (m.embd_pdrop, m.attn_pdrop, m.resid_pdrop) == (base.embd_pdrop, 0.05, base.resid_pdrop)


def test_a_resumed_run_keeps_its_best_validation_loss(corpus, tmp_path, monkeypatch, capsys):
    """best/ holds the lowest validation loss across a resume: an evaluation after resuming that is worse than
    one before it, or one only as good, leaves best/ alone (validation losses scripted: 2.0 at step 2, 3.0 at step
    4, 2.0 at step 6). The summary train() returns holds the run's last evaluation, step, parameters and tokenizer.
    Each evaluation prints its step line and a sample drawn from the parameters of that step."""
    from gpt_jax import pretrain
    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.pretrain import PretrainTask
    from gpt_jax.trainer import train

    scripted, real = {2: 2.0, 4: 3.0, 6: 2.0}, PretrainTask.eval_record

    def eval_record(self, step, raw):
        record, _ = real(self, step, raw)
        return {**record, "val_loss": scripted[step]}, -scripted[step]

    monkeypatch.setattr(PretrainTask, "eval_record", eval_record)
    samples = []  # (seed, parameters) of each sample drawn
    monkeypatch.setattr(pretrain, "sample_text", lambda config, params, tokenizer, prompt, n, seed, temperature:
                        samples.append((seed, params)) or f"a sample of {n} tokens, seed {seed}")
    run_dir, args = tmp_path / "run", ("train.eval_every=2", "train.save_every=2", "train.sample_tokens=3")

    def best_step():
        ckpt = Checkpointer(run_dir, read_only=True)
        try:
            return ckpt.best.all_steps()
        finally:
            ckpt.close()

    assert train(lm_config(corpus, run_dir, "train.steps=2", *args), verbose=False)["best_val"] == 2.0
    capsys.readouterr()
    second = train(lm_config(corpus, run_dir, "train.steps=4", *args))
    assert second["start_step"] == 2 and second["best_val"] == 2.0 and best_step() == [2]
    out = capsys.readouterr().out.splitlines()
    loss, ppl = records(run_dir)[-1]["loss"], records(run_dir, "eval")[-1]["val_ppl"]
    at = out.index(f"step 4: train loss {loss:.4f}, val loss 3.0000 (ppl {ppl:.2f})")
    after = [line for line in out[at + 1:] if line.strip() and not line.startswith("train:")]  # not the bar
    assert after[0] == "a sample of 3 tokens, seed 4" and [seed for seed, _ in samples] == [2, 4]
    # what train() returns: the last evaluation, the step, the final parameters, the tokenizer, the time taken
    assert second["val_loss"] == 3.0 and second["step"] == 4 and 0 < second["seconds"] < 3600
    from gpt_jax.runs import restore_params

    for a, b, c in zip(jax.tree.leaves(second["params"]), jax.tree.leaves(restore_params(run_dir, "last")),
                       jax.tree.leaves(samples[-1][1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))  # the sample came from step 4's parameters
    assert second["tokenizer"].spec() == json.loads((run_dir / "tokenizer.json").read_text())
    # and the run let go of its directory: another process takes it at once
    assert another_process_takes(run_dir)
    third = train(lm_config(corpus, run_dir, "train.steps=6", *args), verbose=False)
    assert third["best_val"] == 2.0 and best_step() == [2]  # as good as the best is not better


def test_a_run_reports_its_set_up_in_order_and_a_fine_tuning_run_without_dev_data_keeps_its_best_train_accuracy(
        corpus, tmp_path, capsys):
    """Before its first step a run prints its config line, the task's description, the attention path and the
    parallel line, in that order; it returns its run directory and the step it started from. Here a fine-tuning
    run on a one-device mesh (its head has no logical axes of the GPT's own) without finetune.dev_file: each
    epoch's record holds the train accuracy alone, and that picks the best checkpoint."""
    from gpt_jax.trainer import train

    run_dir, args = tmp_path / "ft", ("finetune.dev_file=", "parallel.strategy=mesh", "finetune.dropout=0.25")
    capsys.readouterr()
    summary = train(ft_config(corpus, run_dir, *args))
    out = capsys.readouterr().out.splitlines()
    lines = out[[i for i, line in enumerate(out) if line.startswith("config: ")][0]:]  # after any tokenizing
    assert "parallel.strategy=mesh" in lines[0] and lines[0].endswith(" mode=finetune")
    assert lines[1] == ("fine-tuning (classification, labels ['0', '1']) from random initialisation: 44 training "
                        "examples; 1 sequence(s) of 16 tokens per example; batch 8, 2 epochs = 12 steps; lm_coef 0.5")
    assert lines[2] == "attention: einsum reference for cpu"
    assert lines[3].startswith("parallel: mesh {'data': 1, 'fsdp': 1, 'tensor': 1}"), lines[3]
    assert "None" not in out
    evals = records(run_dir, "eval")
    assert [(r["step"], r["epoch"]) for r in evals] == [(6, 1), (12, 2)]
    assert all(set(r) == {"kind", "step", "epoch", "train_accuracy"} for r in evals), evals
    # each epoch's line, "(best so far)" when its accuracy beats every earlier epoch's
    best, want = -math.inf, []
    for r in evals:
        want.append(f"epoch {r['step'] // 6}: train accuracy {r['train_accuracy']:.4f}"
                    + (" (best so far)" if r["train_accuracy"] > best else ""))
        best = max(best, r["train_accuracy"])
    assert [line for line in out if line.startswith("epoch ")] == want
    assert summary["best_dev_accuracy"] is None and summary["best"] == max(r["train_accuracy"] for r in evals)
    assert summary["epochs"] == evals and summary["train_examples"] == 44 and summary["truncated"] == 0
    info = json.loads((run_dir / "finetune.json").read_text())  # what predict and evaluate read back
    assert info == {"format": 2, "task": "classification", "labels": ["0", "1"], "max_length": 16,
                    "special_ids": dataclasses.asdict(summary["special"]), "model": dataclasses.asdict(summary["model"]),
                    "fields": {"text": "sentence", "label": "label"}}
    assert summary["run_dir"] == str(run_dir) and summary["start_step"] == 0 and summary["step"] == 12
    m = summary["model"]  # finetune.dropout sets the transformer's three dropout rates
    assert (m.embd_pdrop, m.attn_pdrop, m.resid_pdrop) == (0.25, 0.25, 0.25)
    assert summary["interrupted"] is None
    again = train(ft_config(corpus, run_dir, *args), verbose=False)
    assert again["run_dir"] == str(run_dir) and again["start_step"] == again["step"] == 12
    assert again["epochs"] == []  # a run that had nothing left to do evaluated no epoch


def test_the_parallel_line_each_process_line_and_the_mfu_terms(monkeypatch, capsys):
    """The set-up's `parallel:` line (strategy, batch accounting, tokens per step, the peak MFU is measured
    against: the model dtype's per-device peak times the devices), in a multi-process run each process's
    own line naming the rows it reads, and the FLOPs per step at the task's sequence length."""
    import types

    from gpt_jax.flops import flops_per_token

    monkeypatch.setattr(loop, "device_peak_flops", lambda dtype: (2e12 if dtype == "bfloat16" else 1e12, "a stated peak"))
    config = load_config(None, LM + ["model.dtype=bfloat16"])  # 16 positions
    strategy = types.SimpleNamespace(accounting={"global_batch": 8, "per_device_batch": 2, "grad_accum": 1},
                                     n_devices=4, describe=lambda: "pmap over 2 local devices on each of 2 processes (cpu)")
    lp = types.SimpleNamespace(strategy=strategy, task=types.SimpleNamespace(seq_len=12, tokens_per_step=8 * 12),
                               config=config, tc=config.train)
    line = ("parallel: pmap over 2 local devices on each of 2 processes (cpu); global batch 8, per-device batch 2, "
            "1 accumulation step(s), 96 tokens/step; MFU against 8.00 TFLOP/s (a stated peak x 4)")
    monkeypatch.setattr(loop.jax, "local_device_count", lambda: 2)
    monkeypatch.setattr(loop.jax, "device_count", lambda: 4)
    for index, count, printed in [(0, 1, ""), (1, 2, "process 1 of 2: 2 of 4 devices; reads rows 4..7 of each global "
                                                     "batch of 8\n")]:
        monkeypatch.setattr(loop.jax, "process_index", lambda: index)
        monkeypatch.setattr(loop.jax, "process_count", lambda: count)
        said = []
        capsys.readouterr()
        loop.Loop._describe_parallel(lp, said.append)
        assert said == [line] and capsys.readouterr().out == printed
        assert lp.peak == 8e12 and lp.flops_per_step == flops_per_token(config.model, 12) * 96
    assert flops_per_token(config.model, 12) != flops_per_token(config.model, 16)


def test_finetuning_mfu_counts_the_task_sequence_length_not_the_context(corpus, tmp_path, monkeypatch):
    """MFU = tokens/s x (6 N + 12 L D T) / peak with T the fine-tuning batches' length (PaLM's count,
    N without the position embedding), here shorter than the 64-token context."""
    from gpt_jax.finetune import FinetuneTask
    from gpt_jax.model import param_count

    monkeypatch.setattr(loop, "device_peak_flops", lambda dtype: (1e12, "a stated peak"))
    config = ft_config(corpus, tmp_path / "run", "model.n_positions=64", "finetune.epochs=1")
    task = FinetuneTask(config, verbose=False)
    T, m = task.seq_len, task.config.model  # the model with its vocabulary grown by the special tokens
    assert T < m.n_positions
    per_token = 6 * (param_count(m) - m.n_positions * m.n_embd) + 12 * m.n_layer * m.n_embd * T
    run_task(config)
    for r in records(tmp_path / "run"):
        np.testing.assert_allclose(r["mfu"] / r["tokens_per_s"], per_token / 1e12, rtol=1e-9)


def test_validation_runs_in_micro_batches_of_the_training_step_s_size_with_the_same_loss(corpus, tmp_path):
    """With optim.grad_accum=A the validation batches are taken A micro-batches at a time (a whole batch at
    once can need several times the memory of a training micro-batch); the validation loss is still the
    mean over every row of every batch: the same as taking each batch whole, and as the loss of the rows
    computed one by one."""
    from gpt_jax.model import GPT, init_params, lm_loss
    from gpt_jax.pretrain import PretrainTask

    tasks = {A: PretrainTask(lm_config(corpus, tmp_path / f"run{A}", f"optim.grad_accum={A}"), verbose=False)
             for A in (1, 4)}
    params = init_params(tasks[1].config.model, jax.random.key(3))
    data = jax.numpy.asarray(tasks[1].eval_data)  # [2, 8, 17]: both tasks read the same validation batches
    assert np.array_equal(tasks[4].eval_data, tasks[1].eval_data)
    whole, micro = (float(jax.jit(tasks[A].evaluate)(params, data)["loss_sum"]) for A in (1, 4))
    rows = [float(lm_loss(GPT(tasks[1].config.model).apply({"params": params}, r[None, :-1]), r[None, 1:]))
            for batch in data for r in batch]
    for A, rows_per_call in ((1, 8), (4, 2)):  # the model sees 8 / A rows at a time, 2 * A times
        scans = [e for e in jax.make_jaxpr(tasks[A].evaluate)(params, data).eqns if e.primitive.name == "scan"]
        assert [(e.params["length"], e.invars[-1].aval.shape[1]) for e in scans] == [(2 * A, rows_per_call)]
    assert micro == pytest.approx(whole, rel=1e-6)
    assert micro == pytest.approx(sum(rows) / 8, rel=1e-5)  # two batches of 8: the sum of their means
    assert tasks[4].eval_record(0, {"loss_sum": micro})[0]["val_loss"] == pytest.approx(sum(rows) / 16, rel=1e-5)
