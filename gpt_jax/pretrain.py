"""Pretraining: the language-modelling task the loop in `loop.py` runs.

The task: windows of `n_positions + 1` tokens from the deterministic `Sampler` (its state is saved
with every checkpoint, so a resumed run continues the exact loss curve), next-token loss, validation
loss on fixed batches, "best" = lowest val loss, a text sample at each evaluation. A batch is
[A, b, T + 1] tokens: A micro-batches for gradient accumulation, scanned inside the step.
`gpt_jax.trainer.train(config)` hands it to the loop (or the fine-tuning task, for `mode: finetune`).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import Config
from gpt_jax.data import Sampler, check_batches, eval_batches
from gpt_jax.loop import TrainState, make_step
from gpt_jax.model import GPT, init_params, lm_loss, logical_axes
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.parallel import validate as validate_parallel
from gpt_jax.runs import prepare_data, resolve_vocab, sample_text


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


class PretrainTask:
    """Next-token prediction on a token stream (see the module docstring)."""

    kind = "train"

    def __init__(self, config: Config, verbose: bool = True, read_data: bool = True):
        """`read_data=False`: the task from the config alone (its vocabulary, no corpus read), for compiling
        its programs for a target (`gpt_jax.aot`); its evaluation data are then shapes, not tokens."""
        self.data = self.tokenizer = None
        if read_data:
            validate_parallel(config)  # batch / mesh errors before reading any data
            self.data = prepare_data(config, verbose)
            config = resolve_vocab(config, self.data.tokenizer)
            self.tokenizer = self.data.tokenizer
            check_batches(self.data, config.model.n_positions, config.train.batch_size)  # before the run dir
        self.config = config
        tc, T = config.train, config.model.n_positions
        self.optimizer, self.schedule = make_optimizer(config.optim, tc.steps), make_schedule(config.optim, tc.steps)
        self.param_specs = logical_axes(config.model)
        self.seq_len, self.tokens_per_step = T, tc.batch_size * T
        self.eval_data = (np.stack(eval_batches(self.data.tokens("val"), T, tc.batch_size, tc.eval_batches)) if read_data
                          else jax.ShapeDtypeStruct((tc.eval_batches, tc.batch_size, T + 1), jnp.int32))
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

    def batch_shapes(self):
        """One global batch as the step takes it: [A, B / A, T + 1] token ids."""
        A, tc = self.config.optim.grad_accum, self.config.train
        return jax.ShapeDtypeStruct((A, tc.batch_size // A, self.seq_len + 1), jnp.int32)

    def evaluate(self, params, batches_NBT1):
        """The summed mean losses of N validation batches, each taken in A micro-batches of B / A rows (the
        training step's size: a whole batch at once can need several times the memory training does).
        Micro-batch a holds rows a, A + a, 2A + a ...: each device keeps its own rows, none move."""
        N, B, T1 = batches_NBT1.shape
        A = self.config.optim.grad_accum
        micro = batches_NBT1.reshape(N, B // A, A, T1).transpose(0, 2, 1, 3).reshape(N * A, B // A, T1)
        return {"loss_sum": jax.lax.map(lambda b: self._eval_step(params, b), micro).sum() / A}

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
