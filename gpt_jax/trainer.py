"""Pretraining: the language-modelling task the loop in `loop.py` runs, and what uses its runs.

The task: windows of `n_positions + 1` tokens from the deterministic `Sampler` (its state is saved
with every checkpoint, so a resumed run continues the exact loss curve), next-token loss, validation
loss on fixed batches, "best" = lowest val loss, a text sample at each evaluation. A batch is
[A, b, T + 1] tokens: A micro-batches for gradient accumulation, scanned inside the step.
`train(config)` runs it, or the fine-tuning task for `mode: finetune`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gpt_jax.checkpoint import Checkpointer
from gpt_jax.config import Config, ConfigError
from gpt_jax.data import Sampler, check_batches, eval_batches, prepare
from gpt_jax.distributed import barrier
from gpt_jax.loop import TrainState, make_step, run
from gpt_jax.model import GPT, init_params, lm_loss, logical_axes
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.parallel import batch_sharding, make_strategy, validate as validate_parallel


def has_dropout(config: Config) -> bool:
    m = config.model
    return max(m.embd_pdrop, m.attn_pdrop, m.resid_pdrop) > 0


def init_state(config: Config, optimizer) -> TrainState:
    key = jax.random.key(config.train.seed)
    params = init_params(config.model, jax.random.fold_in(key, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(key))


def make_loss_fn(config: Config):
    """Mean next-token loss of a [b, T + 1] batch (dropout from `key` when the model has any)."""
    model = GPT(config.model)
    deterministic = not has_dropout(config)

    def loss_fn(params, tokens_BT1, key):
        logits = model.apply({"params": params}, tokens_BT1[:, :-1], deterministic=deterministic,
                             rngs=None if deterministic else {"dropout": key})
        return lm_loss(logits, tokens_BT1[:, 1:])

    return loss_fn


def make_share_loss(config: Config):
    """The loop's loss convention: a micro-batch's share of the global batch's mean loss."""
    loss_fn, batch_size = make_loss_fn(config), config.train.batch_size

    def share(params, tokens_bT1, key):
        return loss_fn(params, tokens_bT1, key) * (tokens_bT1.shape[0] / batch_size), {}

    return share


def make_train_step(config: Config, optimizer, schedule, axis_name: str | None = None):
    """The pure pretraining step on [A, b, T + 1] batches (see `loop.make_step`)."""
    return make_step(make_share_loss(config), optimizer, schedule, axis_name)


def make_eval_step(config: Config):
    model = GPT(config.model)

    def eval_step(params, tokens_BT1):
        return lm_loss(model.apply({"params": params}, tokens_BT1[:, :-1]), tokens_BT1[:, 1:])

    return eval_step


def _resolve_vocab(config: Config, tokenizer) -> Config:
    m = config.model
    if tokenizer.kind in ("char", "sentencepiece") and m.vocab_size != tokenizer.vocab_size:
        # A vocabulary built from the corpus sets the model's size.
        return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=tokenizer.vocab_size))
    if m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the {tokenizer.kind} tokenizer's "
                          f"{tokenizer.vocab_size} ids; set model.vocab_size >= {tokenizer.vocab_size}")
    return config


def prepare_data(config: Config, verbose: bool = True):
    """Process 0 prepares the token files; the others then find them in a shared cache (or prepare
    their own copy)."""
    main = jax.process_index() == 0
    if main:
        data = prepare(config.data, verbose=verbose)
    barrier("gpt_jax: data prepared")
    return data if main else prepare(config.data, verbose=False)


class PretrainTask:
    """Next-token prediction on a token stream (see the module docstring)."""

    kind = "train"

    def __init__(self, config: Config, verbose: bool = True):
        validate_parallel(config)  # batch / mesh errors before reading any data
        self.data = prepare_data(config, verbose)
        self.config = config = _resolve_vocab(config, self.data.tokenizer)
        self.tokenizer = self.data.tokenizer
        tc, T = config.train, config.model.n_positions
        check_batches(self.data, T, tc.batch_size)  # data errors before the run directory is touched
        self.optimizer, self.schedule = make_optimizer(config.optim, tc.steps), make_schedule(config.optim, tc.steps)
        self.param_specs = logical_axes(config.model)
        self.seq_len, self.tokens_per_step = T, tc.batch_size * T
        self.eval_data = np.stack(eval_batches(self.data.tokens("val"), T, tc.batch_size, tc.eval_batches))
        self.loss = make_share_loss(config)
        self._eval_step = make_eval_step(config)
        # Sampling runs on one process: a model sharded across processes would need all of them.
        self.can_sample = jax.process_index() == 0 and (jax.process_count() == 1 or config.parallel.strategy != "mesh")
        self.last_loss = math.nan

    def describe(self) -> list[str]:
        m, tok = self.data.manifest, self.tokenizer
        return [f"data: {m['train_tokens']:,} train / {m['val_tokens']:,} val tokens ({tok.kind}, vocab "
                f"{tok.vocab_size}) from {self.data.dir}"]

    def abstract_state(self):
        return jax.eval_shape(lambda: init_state(self.config, self.optimizer))

    def initial_state(self, strategy):
        return strategy.init(lambda: init_state(self.config, self.optimizer))

    def batches(self, data_state: dict):
        tc, A, T = self.config.train, self.config.optim.grad_accum, self.seq_len
        sampler = Sampler(self.data.tokens("train"), T, tc.batch_size, tc.seed, jax.process_index(),
                          jax.process_count(), **data_state)
        while True:
            batch = sampler.next()
            yield batch.reshape(A, batch.shape[0] // A, T + 1), sampler.state()

    def evaluate(self, params, batches_NBT1):
        return {"loss_sum": jax.lax.map(lambda b: self._eval_step(params, b), batches_NBT1).sum()}

    def eval_record(self, step: int, raw: dict):
        val = raw["loss_sum"] / len(self.eval_data)
        return {"kind": "eval", "step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50))}, -val

    def observe(self, metrics: dict) -> dict:
        self.last_loss = metrics["loss"]
        return metrics

    def progress(self) -> dict:
        return {}

    def restore(self, progress: dict) -> None:
        pass

    def after_eval(self, params, step: int, record: dict, improved: bool) -> list[str]:
        tc = self.config.train
        lines = [f"step {step}: train loss {self.last_loss:.4f}, val loss {record['val_loss']:.4f} "
                 f"(ppl {record['val_ppl']:.2f})"]
        if tc.sample_tokens > 0 and self.can_sample:
            lines.append(sample_text(self.config, params, self.tokenizer, tc.sample_prompt, tc.sample_tokens,
                                     seed=step, temperature=tc.sample_temperature))
        return lines

    def write_files(self, run_dir: Path) -> None:
        pass

    def summarize(self, summary: dict) -> None:
        evals = summary.pop("evals", [])
        if evals:
            summary["val_loss"] = evals[-1]["val_loss"]
        summary["best_val"] = -summary["best"]


def train(config: Config, verbose: bool = True) -> dict:
    """Run (or resume) the run `config` describes: pretraining, or fine-tuning (`mode: finetune`).
    Returns a summary dict."""
    if config.mode == "finetune":
        from gpt_jax.finetune import FinetuneTask

        return run(FinetuneTask(config, verbose), verbose)
    return run(PretrainTask(config, verbose), verbose)


def dry_run(config: Config) -> dict:
    """Compile one train step from abstract (sharded) inputs, allocate nothing, and report memory per
    device: parameters and optimizer state from their shardings, temporaries from the executable.
    The vocabulary is the config's (no data is read)."""
    if config.mode == "finetune":
        raise ConfigError("--dry-run compiles the pretraining step from the config alone; a mode: finetune run "
                          "needs its base model and task files, so run it without --dry-run")
    optimizer = make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: init_state(config, optimizer))
    if config.parallel.strategy == "pmap":  # replicated parameters: the same layout as a data-only mesh
        config = dataclasses.replace(config, parallel=dataclasses.replace(
            config.parallel, strategy="mesh", data=jax.local_device_count(), fsdp=1, tensor=1))
    strategy = make_strategy(config, abstract)
    target = strategy.restore_target(abstract)
    T, A = config.model.n_positions, config.optim.grad_accum
    batch = jax.ShapeDtypeStruct((A, config.train.batch_size // A, T + 1), jnp.int32,
                                 sharding=batch_sharding(strategy.mesh) if strategy.mesh is not None else None)
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


def restore_params(run_dir, which: str = "best", step: int | None = None):
    """The parameters of a run's best (or last, or given `step`'s) checkpoint on one device, whatever
    strategy saved them: the shapes come from the checkpoint's own metadata, so no optimizer is rebuilt."""
    ckpt = Checkpointer(run_dir, read_only=True)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(manager, at):
        tree = ocp.StandardCheckpointHandler().metadata(manager.directory / str(at) / "state")
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), dict(tree))

    try:
        if step is not None:
            if step not in ckpt.steps():
                raise ConfigError(f"{run_dir} has no checkpoint at step {step}; its checkpoints are at steps "
                                  f"{ckpt.steps()} (train.keep_every keeps more)")
            return ckpt.restore_step(abstract(ckpt.last, step), step)[0]["params"]
        for manager in (ckpt.best, ckpt.last) if which == "best" else (ckpt.last,):
            if not manager.all_steps():
                continue
            restored = ckpt.restore_latest(abstract(manager, max(manager.all_steps())), manager)
            if restored is not None:
                return restored[0]["params"]
    finally:
        ckpt.close()
    raise ConfigError(f"{run_dir} has no checkpoint that restores")


def load_run(run_dir, which: str = "best", step: int | None = None):
    """(Config, params, tokenizer) of a training run directory: the best checkpoint, the last, or the
    one at `step`. For a fine-tuning run, the language model (with its 3 special-token rows) without
    the head."""
    from gpt_jax.config import load_config
    from gpt_jax.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    for name in ("config.yaml", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a training run: {name} is missing")
    config = load_config(run_dir / "config.yaml", saved_run=True)
    tokenizer = load_tokenizer(json.loads((run_dir / "tokenizer.json").read_text()))
    params = restore_params(run_dir, which, step)
    return config, params["gpt"] if config.mode == "finetune" else params, tokenizer


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
