"""GPT-1-style supervised fine-tuning: special tokens, the task input transformations of the GPT-1
paper's Figure 1 (in `gpt_jax.records`), a linear head on the `[extract]` state, the auxiliary
language-modelling loss, and the fine-tuning task the training loop (`gpt_jax.loop`) runs.

    classification   [start] text [extract]
    entailment       [start] premise [delim] hypothesis [extract]
    similarity       [start] a [delim] b [extract]  and  [start] b [delim] a [extract]; the two final
                     states are added before the head
    multiple choice  [start] context [delim] answer_k [extract] for each k; one score per choice,
                     soft-maxed over the choices

Every example becomes C sequences (C = 1, 1, 2 or the number of choices): tokens [N, C, T], right
padded, with lengths [N, C]; the `[extract]` token is the last real token of each sequence.
Loss = task cross-entropy + lm_coef * next-token loss on the same sequences.

Parameters are {"gpt": GPT parameters with 3 more embedding rows, "head": {"kernel", "bias"}}.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from gpt_jax.config import Config, ConfigError, FinetuneConfig, GPTConfig, OptimConfig
from gpt_jax.hub import local_path
from gpt_jax.loop import TrainState
from gpt_jax.model import GPT, init_params, logical_axes
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.parallel import validate as validate_parallel
from gpt_jax.records import (Examples, SpecialIds, batches, encode_examples, label_set, make_batch, pad_to,
                             read_records)
from gpt_jax.runs import load_for_sampling, prepare_data, resolve_vocab, restore_params
from gpt_jax.tokenizer import load_tokenizer

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")


def add_special_tokens(config: GPTConfig, gpt_params, rng, std: float | None = None):
    """Grow the token embedding (and so the tied output layer) by the 3 special rows, initialised
    N(0, initializer_range) as the GPT-1 code initialised its embedding; pretrained rows unchanged.
    Returns (config, params, SpecialIds)."""
    ids = SpecialIds.after(config.vocab_size)
    std = config.initializer_range if std is None else std
    wte = gpt_params["wte"]["embedding"][: config.vocab_size]  # without the padded rows, if any
    rows = std * jax.random.normal(rng, (len(SPECIAL_TOKENS), wte.shape[1]), wte.dtype)
    new_config = dataclasses.replace(config, vocab_size=config.vocab_size + len(SPECIAL_TOKENS))
    pad = jnp.zeros((new_config.padded_vocab_size - new_config.vocab_size, wte.shape[1]), wte.dtype)
    params = {**gpt_params, "wte": {**gpt_params["wte"], "embedding": jnp.concatenate([wte, rows, pad])}}
    return new_config, params, ids


# ---------------------------------------------------------------------------------------------------
# Model, loss


def n_outputs(cfg: FinetuneConfig, labels) -> int:
    return 1 if cfg.task == "multiple_choice" else len(labels)


def init_head(config: GPTConfig, n_out: int, rng):
    return {"kernel": config.initializer_range * jax.random.normal(rng, (config.n_embd, n_out), jnp.float32),
            "bias": jnp.zeros((n_out,), jnp.float32)}


def forward(config: GPTConfig, task: str, params, tokens_BCT, lengths_BC, *, deterministic=True, rng=None,
            clf_pdrop: float = 0.0):
    """(task logits [B, n_labels] or choice scores [B, C], LM logits [B, C, T, V])."""
    B, C, T = tokens_BCT.shape
    keys = jax.random.split(rng, 2) if rng is not None else (None, None)
    out = GPT(config).apply({"params": params["gpt"]}, tokens_BCT.reshape(B * C, T), deterministic=deterministic,
                            rngs=None if deterministic else {"dropout": keys[0]}, return_hidden=True)
    hidden_BCTD = out.hidden.reshape(B, C, T, -1).astype(jnp.float32)
    h_BCD = jnp.take_along_axis(hidden_BCTD, (lengths_BC - 1)[:, :, None, None], axis=2)[:, :, 0]
    if task == "similarity":
        h_BCD = h_BCD.sum(axis=1, keepdims=True)  # both orderings added element-wise
    if not deterministic and clf_pdrop > 0:
        keep = jax.random.bernoulli(keys[1], 1.0 - clf_pdrop, h_BCD.shape)
        h_BCD = jnp.where(keep, h_BCD / (1.0 - clf_pdrop), 0.0)
    logits = h_BCD @ params["head"]["kernel"] + params["head"]["bias"][None, None, :]
    task_logits = logits[..., 0] if task == "multiple_choice" else logits[:, 0]
    return task_logits, out.logits.reshape(B, C, T, -1)


def losses(config: GPTConfig, task: str, params, batch, *, deterministic=True, rng=None, clf_pdrop=0.0):
    """(task loss, LM loss, task logits). The losses are sums weighted per example by the batch's
    `weight` (task loss) and `lm_weight` (each of its predicted tokens), which `make_batch` sets so
    that sums over a whole batch are means over its real examples and their tokens; a part of the
    batch (a micro-batch, one device's rows) gives its share of them."""
    tokens, lengths, labels = batch["tokens"], batch["lengths"], batch["labels"]
    task_logits, lm_logits = forward(config, task, params, tokens, lengths, deterministic=deterministic, rng=rng,
                                     clf_pdrop=clf_pdrop)
    ce = optax.softmax_cross_entropy_with_integer_labels(task_logits, jnp.maximum(labels, 0))
    task_loss = (ce * batch["weight"]).sum()
    T = tokens.shape[-1]
    # position t predicts token t + 1 of the same sequence while t + 1 is a real token
    valid_BCT = (jnp.arange(1, T)[None, None, :] < lengths[..., None]) * batch["lm_weight"][:, None, None]
    token_ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits[:, :, :-1], tokens[:, :, 1:])
    return task_loss, (token_ce * valid_BCT).sum(), task_logits



def make_predict(config: GPTConfig, task: str):
    @jax.jit
    def predict(params, tokens, lengths):
        logits, _ = forward(config, task, params, tokens, lengths)
        return jax.nn.softmax(logits, axis=-1)

    return predict


def predict_probs(config, task, params, examples: Examples, batch_size: int, predict=None) -> np.ndarray:
    predict = predict or make_predict(config, task)
    out = [np.asarray(predict(params, b["tokens"], b["lengths"])) for b in batches(examples, batch_size)]
    return np.concatenate(out)[:len(examples)]


# ---------------------------------------------------------------------------------------------------
# Runs


def load_base(cfg: FinetuneConfig, config: Config, rng):
    """(GPTConfig, GPT params, tokenizer) to fine-tune: from init_from, or a random model whose
    tokenizer is prepared from `data` as for pretraining."""
    if cfg.init_from is None:
        data = prepare_data(config)  # process 0 first in a multi-host run
        model = resolve_vocab(config, data.tokenizer).model
        return model, init_params(model, rng), data.tokenizer
    path = local_path(cfg.init_from)
    if not path.is_dir():
        raise ConfigError(f"finetune.init_from={cfg.init_from} is not a directory; give a training run directory, "
                          "a Hugging Face GPT-2 / OpenAI-GPT directory, or a model name (gpt2, openai-gpt, ...)")
    if (path / "finetune.json").is_file():
        raise ConfigError(f"{path} is a fine-tuning run; init_from takes a pretrained model")
    model, params, tokenizer = load_for_sampling(str(path))
    if cfg.reinit:
        params = init_params(model, rng)
    elif cfg.transfer_layers is not None:
        if cfg.transfer_layers > model.n_layer:
            raise ConfigError(f"finetune.transfer_layers={cfg.transfer_layers} is more than the {model.n_layer} blocks "
                              f"of {cfg.init_from}; give 0..{model.n_layer}")
        params = transfer(params, init_params(model, rng), cfg.transfer_layers)
    return model, params, tokenizer


def transfer(pretrained, fresh, n: int):
    """The embeddings and blocks [0, n) of `pretrained`, blocks n.. of `fresh` (the blocks are stacked
    on a leading layer axis); the final LayerNorm of a pre-LN model from `fresh` unless all transfer."""
    n_layer = jax.tree.leaves(fresh["h"])[0].shape[0]
    params = {**pretrained, "h": jax.tree.map(lambda p, f: jnp.concatenate([p[:n], f[n:]]), pretrained["h"], fresh["h"])}
    if "ln_f" in fresh and n < n_layer:
        params["ln_f"] = fresh["ln_f"]
    return params


def _with_dropout(model: GPTConfig, p):
    return model if p is None else dataclasses.replace(model, embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)


def finetune_config(config: Config, steps_per_epoch: int) -> Config:
    """In `mode: finetune` the finetune section sets the batch, the steps (an evaluation at the end of
    every epoch) and the optimizer: AdamW as in the GPT-1 code (betas 0.9 / 0.999, clipping at global
    norm 1, decay on matrices only) on GPT-1's schedule. The optim section's grad_accum still applies."""
    cfg = config.finetune
    train = dataclasses.replace(config.train, batch_size=cfg.batch_size, steps=steps_per_epoch * cfg.epochs,
                                eval_every=steps_per_epoch)
    optim = OptimConfig(lr=cfg.lr, min_lr=0.0, schedule="linear", warmup_fraction=cfg.warmup_fraction,
                        weight_decay=cfg.weight_decay, beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=1.0,
                        grad_accum=config.optim.grad_accum)
    return dataclasses.replace(config, train=train, optim=optim)


def _read_task_files(cfg: FinetuneConfig):
    """(training records, dev records or None, labels) — bad files fail before any model is built."""
    if cfg.train_file is None:
        raise ConfigError("mode: finetune needs finetune.train_file (a TSV or JSONL file of labelled examples)")
    train = read_records(cfg.train_file, cfg.format)
    if cfg.max_examples:
        train = train[:cfg.max_examples]
    dev = read_records(cfg.dev_file, cfg.format) if cfg.dev_file else None
    return train, dev, label_set(train, cfg, cfg.train_file) if cfg.task != "multiple_choice" else None


def _refuse_earlier_format(run_dir: Path) -> None:
    info = run_dir / "finetune.json"
    if info.is_file() and "format" not in json.loads(info.read_text()):
        raise ConfigError(f"{run_dir} holds a fine-tuning run from an earlier gpt_jax that saved no optimizer state "
                          "and cannot be resumed; set train.out_dir to a new directory (gpt_jax.predict and "
                          "gpt_jax.evaluate still read it)")


class FinetuneTask:
    """GPT-1 fine-tuning for the training loop: Figure 1 batches (each process its rows), task loss +
    lm_coef x LM loss, the head and the 3 special-token rows as extra parameters, dev accuracy at the
    end of every epoch, "best" = highest dev accuracy (training accuracy without a dev file)."""

    kind = "finetune"

    def __init__(self, config: Config, verbose: bool = True):
        cfg = config.finetune
        train_records, dev_records, self.labels = _read_task_files(cfg)
        self.steps_per_epoch = math.ceil(len(train_records) / cfg.batch_size)
        config = finetune_config(config, self.steps_per_epoch)
        validate_parallel(config)
        _refuse_earlier_format(Path(config.train.out_dir))
        key = jax.random.key(config.train.seed)
        base, gpt_params, self.tokenizer = load_base(cfg, config, jax.random.fold_in(key, 0))
        model, gpt_params, self.special = add_special_tokens(base, gpt_params, jax.random.fold_in(key, 1))
        self.model = model = _with_dropout(model, cfg.dropout)
        self.config = config = dataclasses.replace(config, model=model)
        self.max_length = min(cfg.max_length or model.n_positions, model.n_positions)
        self._encode(train_records, dev_records)
        self.params = {"gpt": gpt_params, "head": init_head(model, n_outputs(cfg, self.labels), jax.random.fold_in(key, 2))}
        self.param_specs = {"gpt": logical_axes(model), "head": {"kernel": P(), "bias": P()}}
        self.optimizer = make_optimizer(config.optim, config.train.steps)
        self.schedule = make_schedule(config.optim, config.train.steps)
        self.deterministic = cfg.clf_pdrop == 0 and max(model.embd_pdrop, model.attn_pdrop, model.resid_pdrop) == 0
        self.correct = self.seen = 0.0

    def _encode(self, train_records, dev_records):
        cfg, labels, special = self.config.finetune, self.labels, self.special
        train = encode_examples(train_records, cfg, self.tokenizer, special, self.max_length, cfg.train_file, labels)
        dev = (encode_examples(dev_records, cfg, self.tokenizer, special, self.max_length, cfg.dev_file, labels)
               if dev_records else None)
        T = max(train.tokens.shape[2], dev.tokens.shape[2] if dev else 0)
        self.seq_len = T = min(-(-T // 8) * 8, self.max_length)  # one compiled shape for train and dev
        self.train, self.dev = pad_to(train, T), pad_to(dev, T) if dev else None
        self.tokens_per_step = cfg.batch_size * train.tokens.shape[1] * T
        self.eval_data = None if dev is None else jax.tree.map(
            lambda *xs: np.stack(xs), *batches(self.dev, self.config.train.batch_size))

    def describe(self) -> list[str]:
        cfg, tc, train, dev = self.config.finetune, self.config.train, self.train, self.dev
        lines = [f"fine-tuning ({cfg.task}, labels {self.labels if self.labels else 'choice index'}) from "
                 f"{cfg.init_from or 'random initialisation'}{' (re-initialised)' if cfg.reinit else ''}"
                 f"{'' if cfg.transfer_layers is None else f' (embeddings and {cfg.transfer_layers} block(s) transferred)'}: "
                 f"{len(train)} training examples{f', {len(dev)} dev' if dev else ''}; {train.tokens.shape[1]} "
                 f"sequence(s) of {self.seq_len} tokens per example; batch {tc.batch_size}, {cfg.epochs} epochs = "
                 f"{tc.steps} steps; lm_coef {cfg.lm_coef}"]
        for name, ex in (("training", train), ("dev", dev)):
            if ex is not None and ex.truncated:
                lines.append(f"truncated {ex.truncated} of {len(ex)} {name} examples to {self.max_length} tokens "
                             "(finetune.max_length)")
        return lines

    def _state(self) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=self.params, opt_state=self.optimizer.init(self.params),
                          rng=jax.random.key_data(jax.random.key(self.config.train.seed)))

    def abstract_state(self):
        return jax.eval_shape(self._state)

    def initial_state(self, strategy):
        return strategy.place(self._state())

    def loss(self, params, batch, key):
        cfg = self.config.finetune
        task_loss, lm, logits = losses(self.model, cfg.task, params, batch, deterministic=self.deterministic,
                                       rng=key, clf_pdrop=cfg.clf_pdrop)
        real = batch["weight"] > 0
        correct = ((logits.argmax(-1) == batch["labels"]) & real).sum().astype(jnp.float32)
        return task_loss + cfg.lm_coef * lm, {"task_loss": task_loss, "lm_loss": lm, "correct": correct,
                                              "examples": real.sum().astype(jnp.float32)}

    def batches(self, data_state: dict):
        """Epochs in the order drawn from (seed, epoch); the state (epoch, cursor) resumes mid-epoch."""
        tc, A, N = self.config.train, self.config.optim.grad_accum, len(self.train)
        B, P, p = tc.batch_size, jax.process_count(), jax.process_index()
        epoch, cursor = data_state["epoch"], data_state["cursor"]
        order = np.random.default_rng([tc.seed, epoch]).permutation(N)
        while True:
            if cursor >= N:
                epoch, cursor = epoch + 1, 0
                order = np.random.default_rng([tc.seed, epoch]).permutation(N)
            idx = np.full(B, -1)
            chunk = order[cursor:cursor + B]
            idx[:len(chunk)] = chunk
            cursor += B
            batch = make_batch(self.train, idx, slice(p * B // P, (p + 1) * B // P))
            yield jax.tree.map(lambda x: x.reshape((A, x.shape[0] // A) + x.shape[1:]), batch), \
                {"epoch": epoch, "cursor": cursor}

    def batch_shapes(self):
        """One global batch as the step takes it (the shapes of the first batch of a one-process run)."""
        batch, _ = next(self.batches({"epoch": 0, "cursor": 0}))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)

    def evaluate(self, params, dev):
        """Dev-set correct answers and summed negative log-likelihood of the gold answers."""
        def one(batch):
            logits, _ = forward(self.model, self.config.finetune.task, params, batch["tokens"], batch["lengths"])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            real = batch["weight"] > 0
            gold = jnp.take_along_axis(logp, jnp.maximum(batch["labels"], 0)[:, None], axis=-1)[:, 0]
            return ((logits.argmax(-1) == batch["labels"]) & real).sum(), jnp.where(real, -gold, 0.0).sum()

        correct, nll = jax.lax.map(one, dev)
        return {"correct": correct.sum(), "nll": nll.sum()}

    def eval_record(self, step: int, raw: dict):
        record = {"kind": "eval", "step": step, "epoch": step // self.steps_per_epoch,
                  "train_accuracy": self.correct / max(self.seen, 1.0)}
        self.correct = self.seen = 0.0
        if raw:
            record.update(dev_accuracy=raw["correct"] / len(self.dev), dev_loss=raw["nll"] / len(self.dev))
        return record, record.get("dev_accuracy", record["train_accuracy"])

    def observe(self, metrics: dict) -> dict:
        self.correct += metrics.pop("correct")
        self.seen += metrics.pop("examples")
        return metrics

    def progress(self) -> dict:
        return {"correct": self.correct, "seen": self.seen}

    def restore(self, progress: dict) -> None:
        self.correct, self.seen = progress.get("correct", 0.0), progress.get("seen", 0.0)

    def after_eval(self, params, step: int, record: dict, improved: bool) -> list[str]:
        return [f"epoch {record['epoch']}: train accuracy {record['train_accuracy']:.4f}"
                + (f", dev accuracy {record['dev_accuracy']:.4f}" if "dev_accuracy" in record else "")
                + (" (best so far)" if improved else "")]

    def write_files(self, run_dir: Path) -> None:
        cfg = self.config.finetune
        info = {"format": 2, "task": cfg.task, "labels": self.labels, "special_ids": dataclasses.asdict(self.special),
                "max_length": self.max_length, "model": dataclasses.asdict(self.model), "fields": cfg.fields}
        (run_dir / "finetune.json").write_text(json.dumps(info, indent=1))

    def summarize(self, summary: dict) -> None:
        summary.update(epochs=summary.pop("evals", []), best_dev_accuracy=summary["best"] if self.dev else None,
                       train_examples=len(self.train), labels=self.labels, special=self.special, model=self.model,
                       truncated=self.train.truncated + (self.dev.truncated if self.dev else 0))


def load_finetuned(run_dir):
    """(GPTConfig, params, tokenizer, meta) of the best checkpoint of a fine-tuning run (of this or an
    earlier gpt_jax: the parameters are read by the checkpoint's own metadata)."""
    run_dir = Path(run_dir)
    if not (run_dir / "finetune.json").is_file():
        raise ConfigError(f"{run_dir} is not a fine-tuning run (finetune.json is missing); "
                          "train one with train.py and mode: finetune")
    meta = json.loads((run_dir / "finetune.json").read_text())
    tokenizer = load_tokenizer(json.loads((run_dir / "tokenizer.json").read_text()))
    return GPTConfig(**meta["model"]), restore_params(run_dir), tokenizer, meta
