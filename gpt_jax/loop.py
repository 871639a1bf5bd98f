"""The training loop, written once for every task: checkpoints, resume, signals, the non-finite stop,
batch prefetch, metrics and logging, under every parallel strategy.

A task (pretraining in `trainer.py`, fine-tuning in `finetune.py`) is a small object that owns what
differs between them:

    config, tokenizer, optimizer, schedule   the resolved run config (train.steps, train.batch_size and
                                             train.eval_every say when the loop steps, evaluates, saves)
    param_specs                              the parameters' logical axes, for the mesh strategy
    seq_len, tokens_per_step                 for throughput and MFU
    describe() -> lines                      printed at start
    abstract_state() / initial_state(strategy)   shapes, and a fresh placed TrainState
    loss(params, micro_batch, key) -> (loss share, metric shares)
    batches(data_state) -> iterator of (this process's rows of a batch [A, b, ...], data state after it)
    eval_data, evaluate(params, eval_data)   host arrays [n, B, ...] placed once, and a jittable
                                             function of them returning device scalars (or None)
    eval_record(step, raw) -> (record, score)   the eval record and its score, higher is better ("best")
    observe(metrics) -> metrics to log       (and progress() / restore(progress) for resume)
    after_eval(params, step, record, improved) -> lines to print
    write_files(run_dir), summarize(summary)

The loss convention: `loss` returns this micro-batch's *share* of the global batch's loss (and of
every metric), so the step sums shares over the micro-batches (a `lax.scan`) and over devices
(`lax.psum`); the sum is the global value whatever the split.
"""

from __future__ import annotations

import json
import math
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from gpt_jax.attention import describe as describe_attention
from gpt_jax.checkpoint import Checkpointer
from gpt_jax.config import Config, save_config
from gpt_jax.distributed import any_process
from gpt_jax.flops import device_peak_flops, flops_per_token
from gpt_jax.parallel import make_strategy
from gpt_jax.rundir import lock_run_dir, resume_check
from gpt_jax.runlog import MetricsLog, plot_losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's base key (from the config seed)


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf is finite: one cheap reduction on the device."""
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all()


def make_step(loss_fn, optimizer, schedule, axis_name: str | None = None):
    """The pure step `(state, batch) -> (state, metrics)`. Every leaf of `batch` is [A, b, ...]: A
    micro-batches scanned inside the step, so one dispatch does one optimizer step. Loss and metric
    shares are summed over micro-batches, and over devices with `lax.psum` when `axis_name` names a
    pmap axis. Dropout keys are `fold_in(fold_in(key(seed), step), micro-batch)`."""

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro(grad_sum, xs):
            i, micro_batch = xs
            (loss, shares), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, micro_batch, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, grad_sum, grads), {"loss": loss, **shares}

        A = jax.tree.leaves(batch)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, shares = jax.lax.scan(micro, zeros, (jnp.arange(A), batch))
        shares = jax.tree.map(lambda x: x.sum(0), shares)
        if axis_name is not None:
            grads, shares = jax.lax.psum((grads, shares), axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**shares, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                   "finite": all_finite(params)}  # checked before any checkpoint of these parameters
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def scan_steps(step_fn):
    """K optimizer steps in one dispatch: `step_fn` scanned over batches stacked [K, A, b, ...]; the
    metrics come back stacked [K]."""
    return lambda state, batches: jax.lax.scan(step_fn, state, batches)


def describe_config(config: Config) -> str:
    """The resolved config in short: the values that differ from the defaults."""
    default = Config().to_dict()
    parts = []
    for section, values in config.to_dict().items():
        if not isinstance(values, dict):  # a top-level key such as `mode`
            parts += [f"{section}={values}"] if default[section] != values else []
            continue
        if section == "finetune" and config.mode != "finetune":
            continue
        parts += [f"{section}.{k}={v}" for k, v in values.items() if default[section].get(k) != v]
    return " ".join(parts)


class Signals:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and stops at the next step."""

    def __init__(self):
        self.received = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.received = signum

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead (0: in the caller's thread)."""

    _END = object()

    def __init__(self, items, depth: int):
        self.items, self.depth, self.closed = iter(items), depth, False
        if depth > 0:
            self.queue = queue.Queue(depth)
            self.thread = threading.Thread(target=self._fill, daemon=True, name="gpt_jax-prefetch")
            self.thread.start()

    def _fill(self):
        try:
            for item in self.items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the loop, which raises it
            self._put(e)
            return
        self._put(self._END)

    def _put(self, item) -> bool:
        while not self.closed:
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self.depth == 0:
            return next(self.items)
        item = self.queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.closed = True
        if self.depth > 0:
            self.thread.join()


def boundary(tc, step: int) -> bool:
    """Steps after which the loop must hold the state: evaluation, checkpoint, the end."""
    return step % tc.eval_every == 0 or step % tc.save_every == 0 or step == tc.steps


def placed_chunks(task, strategy, start: int, data_state: dict, per_call: int):
    """(first step, n steps, placed batch, data state after it) for every call from `start` on: up to
    `per_call` steps stacked [n, A, b, ...], never past a `boundary`."""
    tc = task.config.train
    batches = task.batches(data_state)
    step = start
    while step < tc.steps:
        n = 1
        while n < per_call and not boundary(tc, step + n):
            n += 1
        items = [next(batches) for _ in range(n)]
        batch = items[0][0] if n == 1 else jax.tree.map(lambda *xs: np.stack(xs), *[b for b, _ in items])
        yield step + 1, n, strategy.put_batch(batch, lead=1 if n == 1 else 2), items[-1][1]
        step += n


def open_run(task, strategy, abstract, say):
    """The run directory's set-up, in one place for every task: restore the newest checkpoint (or
    start fresh), check that it belongs to this command, write config.yaml, tokenizer.json and the
    task's files. Returns (lock, Checkpointer, placed state, checkpoint meta or {}, step)."""
    config = task.config
    run_dir = Path(config.train.out_dir)
    lock = lock_run_dir(run_dir)  # one run per directory
    try:
        ckpt = Checkpointer(run_dir, keep=config.train.keep_checkpoints, keep_every=config.train.keep_every)
        # another run's checkpoint stops the command; only an unreadable one is set aside
        restored = ckpt.restore_latest(strategy.restore_target(abstract),
                                       check=resume_check(run_dir, config, task.tokenizer))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if restored is None:
        state, meta, step = task.initial_state(strategy), {}, 0
        if ckpt.set_aside and jax.process_index() == 0:  # each one moved aside had its own line
            print(f"no checkpoint in {run_dir / 'checkpoints'} restores; starting again from step 0", file=sys.stderr)
    else:
        state, meta, step = restored
        state = strategy.place(state)
        say(f"resuming from step {step} in {run_dir / 'checkpoints'}")
    if jax.process_index() == 0:
        save_config(config, run_dir / "config.yaml")
        (run_dir / "tokenizer.json").write_text(json.dumps(task.tokenizer.spec()))
        task.write_files(run_dir)
    return lock, ckpt, state, meta, step


def nonfinite_error(step: int, metrics: dict, ckpt: Checkpointer, run_dir: Path) -> FloatingPointError:
    """The stop on a non-finite loss or parameters. A checkpoint is good when its parameters give a
    finite loss: a non-finite loss at `step` condemns the parameters of step - 1, non-finite parameters
    those of `step` (never saved: saves read the step's metrics first). Checkpoints from the first
    bad step on are removed, so the rerun resumes from a good one."""
    bad = step - 1 if not math.isfinite(metrics["loss"]) else step
    what = f"loss is {metrics['loss']}" if bad < step else "the updated parameters are not finite"
    ckpt.wait()
    removed = [s for s in ckpt.steps() if s >= bad]
    for s in removed:
        ckpt.last.delete(s)
    good = [s for s in ckpt.steps() if s < bad]
    where = (f"The last good checkpoint is step {good[-1]} in {run_dir / 'checkpoints'}" if good
             else f"No checkpoint comes before it, so a rerun starts from step 0 in {run_dir}")
    if removed:
        where += f" (removed step {', '.join(map(str, removed))}: non-finite from there)"
    return FloatingPointError(f"{what} at step {step}; stopping. {where}. Lower optim.lr, raise optim.warmup_steps "
                              "or check the data, then rerun to resume")


class Loop:
    """One run of a task: set up, step, read metrics a call behind, evaluate, save, stop."""

    def __init__(self, task, verbose: bool = True):
        self.t_start = time.time()
        self.task, self.config, self.tc = task, task.config, task.config.train
        self.main, self.processes = jax.process_index() == 0, jax.process_count()
        self.verbose = verbose and self.main
        say = (lambda *a: print(*a, flush=True)) if self.verbose else (lambda *a: None)
        say(f"config: {describe_config(self.config)}")
        for line in task.describe():
            say(line)
        say(describe_attention(self.config.model))
        abstract = task.abstract_state()
        self.strategy = make_strategy(self.config, abstract, task.param_specs)
        self.run_dir = Path(self.tc.out_dir)
        self.lock, self.ckpt, self.state, meta, self.start = open_run(task, self.strategy, abstract, say)
        self.data_state = meta.get("sampler", {"epoch": 0, "cursor": 0})
        task.restore(meta.get("progress", {}))
        self.best = meta.get("best", -math.inf)
        self.summary = {"run_dir": str(self.run_dir), "start_step": self.start, "interrupted": None}
        self._describe_parallel(say)

    def _describe_parallel(self, say):
        strategy, task = self.strategy, self.task
        acct = strategy.accounting
        peak, peak_src = device_peak_flops(self.config.model.dtype)
        self.peak = peak * strategy.n_devices
        self.flops_per_step = flops_per_token(self.config.model, task.seq_len) * task.tokens_per_step
        say(f"parallel: {strategy.describe()}; global batch {acct['global_batch']}, per-device batch "
            f"{acct['per_device_batch']}, {acct['grad_accum']} accumulation step(s), {task.tokens_per_step:,} "
            f"tokens/step; MFU against {self.peak / 1e12:.2f} TFLOP/s ({peak_src} x {strategy.n_devices})")
        if jax.process_count() > 1:
            rows = self.tc.batch_size // jax.process_count()
            first = jax.process_index() * rows
            print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
                  f"{jax.device_count()} devices; reads rows {first}..{first + rows - 1} of each global batch of "
                  f"{self.tc.batch_size}", flush=True)

    def _compile(self):
        task, strategy = self.task, self.strategy
        step = make_step(task.loss, task.optimizer, task.schedule, "batch" if strategy.name == "pmap" else None)
        self.step_fns = {1: strategy.compile_step(step)}
        if self.tc.steps_per_call > 1:
            self.step_fns[2] = strategy.compile_step(scan_steps(step), lead=2)
        self.eval_fn = strategy.compile_eval(task.evaluate) if task.eval_data is not None else None
        self.eval_data = strategy.put_eval(task.eval_data) if task.eval_data is not None else None

    def run(self) -> dict:
        self._compile()
        tc = self.tc
        self.log = MetricsLog(self.run_dir, self.main, self.config)
        self.bar = tqdm(total=tc.steps, initial=self.start, desc=self.task.kind, disable=not self.verbose,
                        dynamic_ncols=True, file=sys.stdout, mininterval=1.0)
        self.note = self.bar.write if self.verbose else (lambda *a: None)  # tqdm.write prints even when disabled
        self.pending, self.flush_t, self.window_s, self.window_steps = None, time.time(), 0.0, 0
        signals = Signals()
        chunks = Prefetcher(placed_chunks(self.task, self.strategy, self.start, self.data_state, tc.steps_per_call),
                            self.config.data.prefetch)
        self.done_step, finished = self.start, False
        try:
            for first, n, batch, data_state in chunks:
                self.state, metrics = self.step_fns[min(n, 2)](self.state, batch)
                self._flush()  # the previous call's metrics, read while this one runs
                self.pending, last = (first, n, metrics), first + n - 1
                stop = self._stop_requested(signals, first, last)
                if boundary(tc, last) or stop:
                    self._flush()
                    self._checkpoint(last, data_state)
                    self.flush_t = time.time()  # evaluation and saving are not training throughput
                self.done_step = last
                if stop:
                    self._stopped(signals, last)
                    break
            self._flush()
            finished = True
        finally:
            chunks.close()
            self.bar.close()
            signals.restore()
            self.ckpt.wait()
            self.ckpt.close()
            self.log.close(failed=not finished)  # W&B marks a run that raised as failed
            if self.lock is not None:
                self.lock.release()
        return self._finish()

    def _stop_requested(self, signals, first: int, last: int) -> bool:
        """A signal stops every process at the same step: multi-host runs agree (a collective) every
        train.log_every steps and on the last one, not every step."""
        if self.processes == 1:
            return signals.received is not None
        if last == self.tc.steps or last // self.tc.log_every > (first - 1) // self.tc.log_every:
            return any_process(signals.received is not None)
        return False

    def _stopped(self, signals, step: int):
        name = signal.Signals(signals.received).name if signals.received else "SIGTERM"
        self.ckpt.wait()
        who = "received" if signals.received else "another process received"
        self.note(f"{who} {name}: saved a checkpoint at step {step} in {self.run_dir}; rerun the same command to resume")
        self.summary["interrupted"] = name

    def _flush(self):
        """Read the pending call's metrics (one value per step); stop on a non-finite loss or parameters."""
        if self.pending is None:
            return
        first, n, metrics = self.pending
        self.pending = None
        values = jax.device_get(self.strategy.metrics(metrics))
        now = time.time()  # the call's time, shared by its n steps (tokens/s stays right when n > 1)
        per_step, self.flush_t = (now - self.flush_t) / n, now
        for i in range(n):
            step = first + i
            m = {k: float(np.reshape(v, (n,))[i]) for k, v in values.items()}
            if not (math.isfinite(m["loss"]) and m.pop("finite")):
                raise nonfinite_error(step, m, self.ckpt, self.run_dir)
            m = self.task.observe(m)
            self.summary["loss"] = m["loss"]
            self.window_steps, self.window_s = self.window_steps + 1, self.window_s + per_step
            if step % self.tc.log_every == 0 or step == self.tc.steps:
                self._log(step, m)
        self.bar.update(n)

    def _log(self, step: int, m: dict):
        tok_s = self.window_steps * self.task.tokens_per_step / max(self.window_s, 1e-9)
        self.log.write({"kind": "train", "step": step, **m, "tokens_per_s": tok_s,
                        "mfu": tok_s / self.task.tokens_per_step * self.flops_per_step / self.peak})
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        self.window_s, self.window_steps = 0.0, 0

    def _checkpoint(self, step: int, data_state: dict):
        improved = False
        if step % self.tc.eval_every == 0 or step == self.tc.steps:
            improved = self._evaluate(step)
        meta = {"sampler": data_state, "progress": self.task.progress(), "config": self.config.to_dict(),
                "best": self.best}
        self.ckpt.save(step, self.strategy.for_checkpoint(self.state), meta, best=improved)

    def _evaluate(self, step: int) -> bool:
        """Evaluate on device in one call, read once; True when the score is the best so far."""
        params = self.strategy.params(self.state)
        raw = {} if self.eval_fn is None else {
            k: float(v) for k, v in jax.device_get(self.eval_fn(params, self.eval_data)).items()}
        record, score = self.task.eval_record(step, raw)
        self.log.write(record)
        improved = score > self.best
        self.best = max(self.best, score)
        self.summary.setdefault("evals", []).append(record)
        for line in self.task.after_eval(params, step, record, improved):
            self.note(line)
        return improved

    def _finish(self) -> dict:
        if self.main and (self.run_dir / "metrics.jsonl").is_file():
            plot_losses(self.run_dir)
        self.summary.update(step=self.done_step, seconds=time.time() - self.t_start, best=self.best,
                            config=self.config, params=self.strategy.params(self.state), tokenizer=self.task.tokenizer)
        self.task.summarize(self.summary)
        return self.summary


def run(task, verbose: bool = True) -> dict:
    """Train `task` from its config (resuming its run directory); returns a summary dict."""
    return Loop(task, verbose).run()
