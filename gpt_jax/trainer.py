"""Train state, the pure train / eval steps, and the training loop with logging and checkpoints.

`train_step(state, batch) -> (state, metrics)` is pure and jitted with the state donated. A batch
is [A, b, T + 1] tokens: A micro-batches for gradient accumulation, scanned inside the step, so one
dispatch does one optimizer step. Dropout keys are `fold_in(key(seed), step)` and the sampler state
is saved with every checkpoint, so a resumed run continues the exact loss curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from gpt_jax.checkpoint import Checkpointer
from gpt_jax.config import Config, ConfigError, save_config
from gpt_jax.data import Sampler, check_batches, eval_batches, prepare
from gpt_jax.distributed import any_process, barrier
from gpt_jax.flops import device_peak_flops, flops_per_token
from gpt_jax.model import GPT, init_params, lm_loss
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.parallel import Single, make_strategy, validate as validate_parallel
from gpt_jax.rundir import drop_torn_line, lock_run_dir, read_jsonl, resume_check


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's base key (from the config seed)


def has_dropout(config: Config) -> bool:
    m = config.model
    return max(m.embd_pdrop, m.attn_pdrop, m.resid_pdrop) > 0


def init_state(config: Config, optimizer) -> TrainState:
    key = jax.random.key(config.train.seed)
    params = init_params(config.model, jax.random.fold_in(key, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(key))


def make_loss_fn(config: Config):
    model = GPT(config.model)
    deterministic = not has_dropout(config)

    def loss_fn(params, tokens_BT1, key):
        logits = model.apply({"params": params}, tokens_BT1[:, :-1], deterministic=deterministic,
                             rngs=None if deterministic else {"dropout": key})
        return lm_loss(logits, tokens_BT1[:, 1:])

    return loss_fn


def make_train_step(config: Config, optimizer, schedule, axis_name: str | None = None):
    """The pure step; gradients are averaged over the A micro-batches of a [A, b, T + 1] batch, and
    over devices with `lax.pmean` when `axis_name` names a pmap axis."""
    loss_fn = make_loss_fn(config)

    def train_step(state: TrainState, batch_ABT1):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro(grad_sum, xs):
            i, tokens = xs
            loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        A = batch_ABT1.shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, losses = jax.lax.scan(micro, zeros, (jnp.arange(A), batch_ABT1))
        grads = jax.tree.map(lambda g: g / A, grads)
        if axis_name is not None:
            grads, losses = jax.lax.pmean((grads, losses), axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": losses.mean(), "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(config: Config):
    model = GPT(config.model)

    def eval_step(params, tokens_BT1):
        return lm_loss(model.apply({"params": params}, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])

    return eval_step


def _describe(config: Config) -> str:
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


def _resolve_vocab(config: Config, tokenizer) -> Config:
    m = config.model
    if tokenizer.kind in ("char", "sentencepiece") and m.vocab_size != tokenizer.vocab_size:
        # A vocabulary built from the corpus sets the model's size.
        return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=tokenizer.vocab_size))
    if m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the {tokenizer.kind} tokenizer's "
                          f"{tokenizer.vocab_size} ids; set model.vocab_size >= {tokenizer.vocab_size}")
    return config


class MetricsLog:
    """metrics.jsonl + TensorBoard events in the run directory (process 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            drop_torn_line(run_dir / "metrics.jsonl")
            self.file = open(run_dir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            self.tb.close()


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: train and val loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    series = {}
    for r in records:  # later records win: a resumed run rewrites the steps after its checkpoint
        key = "val_loss" if r["kind"] == "eval" else "loss"
        if key in r:
            series.setdefault(r["kind"], {})[r["step"]] = r[key]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in series.items():
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label="val" if kind == "eval" else "train",
                marker="o" if kind == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=100)
    plt.close(fig)
    return run_dir / "loss.png"


class _Signals:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and stops at the next step."""

    def __init__(self):
        self.received = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.received = signum

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train(config: Config, verbose: bool = True) -> dict:
    """Run (or resume) pretraining as `config` says. Returns a summary dict."""
    t_start = time.time()
    tc, oc = config.train, config.optim
    main = jax.process_index() == 0
    say = (lambda *a: print(*a, flush=True)) if (verbose and main) else (lambda *a: None)
    schedule = make_schedule(oc, tc.steps)
    optimizer = make_optimizer(oc, tc.steps)
    validate_parallel(config)  # batch / mesh errors before reading any data

    if main:  # process 0 prepares; the others then find it in a shared cache (or prepare their own copy)
        data = prepare(config.data, verbose=verbose)
    barrier("gpt_jax: data prepared")
    if not main:
        data = prepare(config.data, verbose=False)
    config = _resolve_vocab(config, data.tokenizer)
    check_batches(data, config.model.n_positions, tc.batch_size)  # data errors before the run directory is touched
    run_dir = Path(tc.out_dir)
    lock = lock_run_dir(run_dir)
    say(f"config: {_describe(config)}")
    say(f"data: {data.manifest['train_tokens']:,} train / {data.manifest['val_tokens']:,} val tokens "
        f"({data.tokenizer.kind}, vocab {data.tokenizer.vocab_size}) from {data.dir}")

    T = config.model.n_positions
    ckpt = Checkpointer(run_dir, keep=tc.keep_checkpoints)
    abstract = jax.eval_shape(lambda: init_state(config, optimizer))
    strategy = make_strategy(config, abstract)
    sampler_state, best_val, start = {"epoch": 0, "cursor": 0}, math.inf, 0
    restored = ckpt.restore_latest(strategy.restore_target(abstract),
                                   check=resume_check(run_dir, config, data.tokenizer))  # another run's: stop
    if restored is not None:
        state, meta, start = restored
        state = strategy.place(state)
        sampler_state, best_val = meta["sampler"], meta.get("best_val", math.inf)
        say(f"resuming from step {start} in {run_dir / 'checkpoints'}")
    else:
        state = strategy.init(lambda: init_state(config, optimizer))
    if main:
        save_config(config, run_dir / "config.yaml")
        (run_dir / "tokenizer.json").write_text(json.dumps(data.tokenizer.spec()))

    sampler = Sampler(data.tokens("train"), T, tc.batch_size, tc.seed, jax.process_index(), jax.process_count(),
                      **sampler_state)
    val = eval_batches(data.tokens("val"), T, tc.batch_size, tc.eval_batches)
    train_step = strategy.compile_step(make_train_step(config, optimizer, schedule,
                                                       "batch" if strategy.name == "pmap" else None))
    eval_step = strategy.compile_eval(make_eval_step(config))
    A = oc.grad_accum
    acct = strategy.accounting
    tokens_per_step = acct["tokens_per_step"]
    peak, peak_src = device_peak_flops(config.model.dtype)
    peak *= strategy.n_devices
    flops_per_step = flops_per_token(config.model, T) * tokens_per_step
    say(f"parallel: {strategy.describe()}; global batch {acct['global_batch']}, per-device batch "
        f"{acct['per_device_batch']}, {A} accumulation step(s), {tokens_per_step:,} tokens/step; "
        f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_src} x {strategy.n_devices})")

    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
              f"{jax.device_count()} devices; reads rows {sampler.rows.start}..{sampler.rows.stop - 1} of each "
              f"global batch of {tc.batch_size}", flush=True)
    # Sampling runs on one process: a model sharded across processes would need all of them.
    can_sample = main and (jax.process_count() == 1 or strategy.name != "mesh")
    log = MetricsLog(run_dir, main)
    signals = _Signals()
    summary = {"run_dir": str(run_dir), "start_step": start, "interrupted": None, "best_val": best_val}

    def meta():
        return {"sampler": sampler.state(), "config": config.to_dict(), "best_val": best_val}

    def evaluate(step):
        nonlocal best_val
        params = strategy.params(state)
        losses = [float(eval_step(params, strategy.put_eval(b))) for b in val]
        val_loss = float(np.mean(losses))
        record = {"kind": "eval", "step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        log.write(record)
        improved = val_loss < best_val
        best_val = min(best_val, val_loss)
        summary.update(val_loss=val_loss, best_val=best_val)
        return record, improved

    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=not (verbose and main), dynamic_ncols=True,
               file=sys.stdout, mininterval=1.0)
    note = bar.write if (verbose and main) else (lambda *a: None)  # tqdm.write prints even when disabled
    pending = None  # (step, metrics) dispatched but not read yet: the host never waits on the device
    done_step = start
    window_t, window_steps = time.time(), 0

    def flush():
        """Read the previous step's metrics; stop on a non-finite loss."""
        nonlocal pending, window_t, window_steps
        if pending is None:
            return
        step, metrics = pending
        pending = None
        m = {k: float(v) for k, v in jax.device_get(strategy.metrics(metrics)).items()}
        if not math.isfinite(m["loss"]):
            last = ckpt.steps()
            raise FloatingPointError(
                f"loss is {m['loss']} at step {step}; stopping. The last good checkpoint "
                f"({'step ' + str(last[-1]) if last else 'none'}) in {run_dir} is untouched: lower optim.lr, "
                "raise optim.warmup_steps or check the data, then rerun to resume")
        window_steps += 1
        summary["loss"] = m["loss"]
        if step % tc.log_every == 0 or step == tc.steps:
            dt = time.time() - window_t
            tok_s = window_steps * tokens_per_step / max(dt, 1e-9)
            record = {"kind": "train", "step": step, **m, "tokens_per_s": tok_s,
                      "mfu": tok_s / tokens_per_step * flops_per_step / peak}
            log.write(record)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            window_t, window_steps = time.time(), 0
        bar.update(1)

    try:
        for step in range(start + 1, tc.steps + 1):
            batch = sampler.next().reshape(A, tc.batch_size // A // jax.process_count(), T + 1)
            state, metrics = train_step(state, strategy.put_batch(batch))
            flush()
            pending = (step, metrics)
            stop = any_process(signals.received is not None)  # every process must stop at the same step
            if step % tc.eval_every == 0 or step == tc.steps or step % tc.save_every == 0 or stop:
                flush()
                improved = False
                if step % tc.eval_every == 0 or step == tc.steps:
                    record, improved = evaluate(step)
                    note(f"step {step}: train loss {summary['loss']:.4f}, val loss {record['val_loss']:.4f} "
                         f"(ppl {record['val_ppl']:.2f})")
                    if tc.sample_tokens > 0 and can_sample:
                        note(sample_text(config, strategy.params(state), data.tokenizer, tc.sample_prompt,
                                         tc.sample_tokens, seed=step, temperature=tc.sample_temperature))
                ckpt.save(step, strategy.for_checkpoint(state), meta(), best=improved)
            done_step = step
            if stop:
                # a signal to any one process of a multi-host run stops them all at the same step
                name = signal.Signals(signals.received).name if signals.received else "SIGTERM"
                ckpt.wait()
                who = "received" if signals.received else "another process received"
                note(f"{who} {name}: saved a checkpoint at step {step} in {run_dir}; rerun the same command to resume")
                summary["interrupted"] = name
                break
        flush()
    finally:
        bar.close()
        signals.restore()
        ckpt.wait()
        ckpt.close()
        log.close()
        if lock is not None:
            lock.release()
    if main and (run_dir / "metrics.jsonl").is_file():
        plot_losses(run_dir)
    summary.update(step=done_step, seconds=time.time() - t_start, config=config,
                   params=strategy.params(state),
                   tokenizer=data.tokenizer)
    return summary


def dry_run(config: Config) -> dict:
    """Compile one train step from abstract (sharded) inputs, allocate nothing, and report memory per
    device: parameters and optimizer state from their shardings, temporaries from the executable.
    The vocabulary is the config's (no data is read)."""
    optimizer = make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: init_state(config, optimizer))
    if config.parallel.strategy == "pmap":  # replicated parameters: the same layout as a data-only mesh
        config = dataclasses.replace(config, parallel=dataclasses.replace(
            config.parallel, strategy="mesh", data=jax.local_device_count(), fsdp=1, tensor=1))
    strategy = make_strategy(config, abstract)
    target = strategy.restore_target(abstract)
    T, A = config.model.n_positions, config.optim.grad_accum
    batch = jax.ShapeDtypeStruct((A, config.train.batch_size // A, T + 1), jnp.int32,
                                 sharding=getattr(strategy, "batch_sh", None))
    step = strategy.compile_step(make_train_step(config, optimizer, make_schedule(config.optim, config.train.steps)))
    t = time.time()
    compiled = step.lower(target, batch).compile()

    def per_device(tree):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    analysis = compiled.memory_analysis()
    report = {"strategy": strategy.describe(), "compile_s": time.time() - t, "params_bytes": per_device(target.params),
              "opt_state_bytes": per_device(target.opt_state),
              "temp_bytes": int(getattr(analysis, "temp_size_in_bytes", 0) or 0),
              "argument_bytes": int(getattr(analysis, "argument_size_in_bytes", 0) or 0)}
    gib = 2**30
    print(f"dry run: {report['strategy']}; global batch {config.train.batch_size} x {T}, {A} micro-batch(es); "
          f"compiled in {report['compile_s']:.1f} s")
    print(f"per device: parameters {report['params_bytes'] / gib:.3f} GiB, optimizer state "
          f"{report['opt_state_bytes'] / gib:.3f} GiB, activations and temporaries {report['temp_bytes'] / gib:.3f} GiB "
          f"(arguments per the executable: {report['argument_bytes'] / gib:.3f} GiB)")
    return report


def load_run(run_dir, which: str = "best"):
    """(Config, params, tokenizer) of a training run directory: the best checkpoint, or the last."""
    from gpt_jax.config import load_config
    from gpt_jax.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    for name in ("config.yaml", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a training run: {name} is missing")
    config = load_config(run_dir / "config.yaml", saved_run=True)
    tokenizer = load_tokenizer(json.loads((run_dir / "tokenizer.json").read_text()))
    ckpt = Checkpointer(run_dir, keep=config.train.keep_checkpoints, read_only=True)
    optimizer = make_optimizer(config.optim, config.train.steps)
    abstract = Single(config).restore_target(jax.eval_shape(lambda: init_state(config, optimizer)))
    try:
        restored = ckpt.restore_latest(abstract, ckpt.best if which == "best" else ckpt.last)
        if restored is None and which == "best":
            restored = ckpt.restore_latest(abstract, ckpt.last)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"{run_dir} has no checkpoint that restores")
    return config, restored[0].params, tokenizer


def sample_text(config: Config, params, tokenizer, prompt: str, n_tokens: int, seed: int = 0,
                temperature: float = 0.8, top_k: int | None = 200) -> str:
    """A sample continuation of `prompt` from the current parameters."""
    from gpt_jax.generate import clear_decode_cache, generate

    ids = tokenizer.encode(prompt) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [0])
    n_tokens = min(n_tokens, config.model.n_positions - len(ids))
    try:
        out, _ = generate(config.model, params, [ids], n_tokens, temperature=temperature,
                          top_k=min(top_k or 0, config.model.vocab_size), rng=seed)
    finally:
        clear_decode_cache()  # the next step replaces these params: free generate's copy of them now
    return prompt + tokenizer.decode(out[0])
