"""GPT-1-style supervised fine-tuning: special tokens, the task input transformations of the GPT-1
paper's Figure 1, a linear head on the `[extract]` state, and the auxiliary language-modelling loss.

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

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from gpt_jax.config import Config, ConfigError, FinetuneConfig, GPTConfig, save_config
from gpt_jax.data import DataError, read_text
from gpt_jax.hub import local_path
from gpt_jax.model import GPT, init_params
from gpt_jax.optim import decay_mask
from gpt_jax.rundir import check_new_run_dir, lock_new_run_dir

SPECIAL_TOKENS = ("_start_", "_delimiter_", "_classify_")
DEFAULT_FIELDS = {"text": "sentence", "label": "label"}
ROLES = {"classification": ("text",), "entailment": ("text", "text_b"), "similarity": ("text", "text_b"),
         "multiple_choice": ("text", "choices")}


@dataclass(frozen=True)
class SpecialIds:
    start: int
    delimiter: int
    classify: int

    @classmethod
    def after(cls, vocab_size: int) -> "SpecialIds":
        """The three ids appended after a model's `vocab_size` embedding rows."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


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
# Task data


@dataclass
class Examples:
    tokens: np.ndarray  # [N, C, T] int32, right padded with 0
    lengths: np.ndarray  # [N, C] int32; lengths - 1 is the [extract] position
    labels: np.ndarray  # [N] int32 class / choice index; -1 when the file has no labels
    truncated: int  # examples shortened to fit max_length

    def __len__(self):
        return len(self.tokens)


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    if path.suffix in (".tsv", ".txt"):
        return "tsv"
    raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                    "set finetune.format to tsv or jsonl")


def read_records(path, fmt: str = "auto") -> list[tuple[int, dict]]:
    """(line number, record) pairs from a TSV with a header row or a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist; set finetune.train_file / dev_file (or --input)")
    read_text(path)  # not UTF-8 text, or binary: one line naming the file
    fmt = _file_format(path, fmt)
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {no}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path} line {no}: expected a JSON object, got {type(record).__name__}")
                records.append((no, record))
        else:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(rows, None)
            if header is not None:
                for no, row in enumerate(rows, 2):
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise DataError(f"{path} line {no}: {len(row)} tab-separated fields, but the header "
                                        f"has {len(header)} ({', '.join(header)})")
                    records.append((no, dict(zip(header, row))))
    if not records:
        raise DataError(f"{path} has no examples" + (" (a TSV needs a header row, then one example per line)"
                                                      if fmt == "tsv" else ""))
    return records


def _field(record: dict, column, path, no, role):
    if column not in record:
        raise DataError(f"{path} line {no}: no field {column!r} (the {role!r} role; fields present: "
                        f"{', '.join(map(str, record))}); set finetune.fields.{role}")
    return record[column]


def _truncate(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Shorten the longer part one token at a time until both fit `budget`."""
    if b is None:
        return a[:budget], None
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def label_set(records, cfg: FinetuneConfig, path) -> list[str]:
    """The declared labels, or the sorted distinct labels of the (training) records."""
    if cfg.labels is not None:
        return [str(v) for v in cfg.labels]
    column = {**DEFAULT_FIELDS, **cfg.fields}["label"]
    return sorted({str(_field(r, column, path, no, "label")) for no, r in records})


def encode_examples(records, cfg: FinetuneConfig, tokenizer, special: SpecialIds, max_length: int, path,
                    labels: list[str] | None, need_labels: bool = True) -> Examples:
    """Task transformation of every record into token sequences (see the module docstring)."""
    fields = {**DEFAULT_FIELDS, **cfg.fields}
    roles = ROLES[cfg.task]
    for role in roles:
        if role not in fields:
            raise ConfigError(f"finetune.task={cfg.task} needs finetune.fields.{role} (the column that holds it)")
    s, d, c = [special.start], [special.delimiter], [special.classify]
    seqs, labs, truncated, n_choices = [], [], 0, None
    for no, record in records:
        text = tokenizer.encode(str(_field(record, fields["text"], path, no, "text")))
        if cfg.task == "classification":
            a, _ = _truncate(text, None, max_length - 2)
            example, cut = [s + a + c], len(a) < len(text)
        elif cfg.task in ("entailment", "similarity"):
            b0 = tokenizer.encode(str(_field(record, fields["text_b"], path, no, "text_b")))
            a, b = _truncate(text, b0, max_length - 3)
            example = [s + a + d + b + c] + ([s + b + d + a + c] if cfg.task == "similarity" else [])
            cut = len(a) + len(b) < len(text) + len(b0)
        else:
            columns = fields["choices"]
            if isinstance(columns, list):
                choices = [_field(record, col, path, no, "choices") for col in columns]
            else:
                choices = _field(record, columns, path, no, "choices")
                if not isinstance(choices, list):
                    raise DataError(f"{path} line {no}: field {columns!r} should be a list of choices")
            if n_choices is None:
                n_choices = len(choices)
            if len(choices) != n_choices or n_choices < 2:
                raise DataError(f"{path} line {no}: {len(choices)} choices, but earlier examples have {n_choices}; "
                                "every example needs the same number (at least 2)")
            example, cut = [], False
            for choice in choices:
                ch = tokenizer.encode(str(choice))
                a, b = _truncate(text, ch, max_length - 3)
                example.append(s + a + d + b + c)
                cut |= len(a) + len(b) < len(text) + len(ch)
        truncated += cut
        seqs.append(example)
        column = fields.get("label")
        if column is None or column not in record:
            if need_labels:
                _field(record, column or "label", path, no, "label")
            labs.append(-1)
            continue
        value = str(record[column])
        if cfg.task == "multiple_choice":
            if not value.lstrip("-").isdigit() or not 0 <= int(value) < n_choices:
                raise DataError(f"{path} line {no}: label {value!r} is not a choice index in 0..{n_choices - 1}")
            labs.append(int(value))
        else:
            if value not in labels:
                raise DataError(f"{path} line {no}: label {value!r} is not one of the declared labels {labels} "
                                "(finetune.labels)")
            labs.append(labels.index(value))
    C = len(seqs[0])
    T = max(len(x) for ex in seqs for x in ex)
    tokens = np.zeros((len(seqs), C, T), np.int32)
    lengths = np.zeros((len(seqs), C), np.int32)
    for i, ex in enumerate(seqs):
        for j, x in enumerate(ex):
            tokens[i, j, :len(x)] = x
            lengths[i, j] = len(x)
    return Examples(tokens, lengths, np.array(labs, np.int32), truncated)


def pad_to(examples: Examples, T: int) -> Examples:
    tokens = np.zeros(examples.tokens.shape[:2] + (T,), np.int32)
    tokens[..., :examples.tokens.shape[2]] = examples.tokens
    return dataclasses.replace(examples, tokens=tokens)


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
    """(task loss, LM loss, task logits); examples with weight 0 (batch padding) count for nothing."""
    tokens, lengths, labels, weight = batch["tokens"], batch["lengths"], batch["labels"], batch["weight"]
    task_logits, lm_logits = forward(config, task, params, tokens, lengths, deterministic=deterministic, rng=rng,
                                     clf_pdrop=clf_pdrop)
    ce = optax.softmax_cross_entropy_with_integer_labels(task_logits, jnp.maximum(labels, 0))
    task_loss = (ce * weight).sum() / jnp.maximum(weight.sum(), 1.0)
    T = tokens.shape[-1]
    # position t predicts token t + 1 of the same sequence while t + 1 is a real token
    valid_BCT = (jnp.arange(1, T)[None, None, :] < lengths[..., None]) * weight[:, None, None]
    token_ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits[:, :, :-1], tokens[:, :, 1:])
    lm = (token_ce * valid_BCT).sum() / jnp.maximum(valid_BCT.sum(), 1.0)
    return task_loss, lm, task_logits


def batches(examples: Examples, batch_size: int, order=None):
    """Fixed-size batches; the last one is padded with weight-0 copies of example 0."""
    order = np.arange(len(examples)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        weight = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            weight[len(idx):] = 0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        yield {"tokens": examples.tokens[idx], "lengths": examples.lengths[idx], "labels": examples.labels[idx],
               "weight": weight}


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
        from gpt_jax.data import prepare
        from gpt_jax.trainer import _resolve_vocab

        data = prepare(config.data)
        model = _resolve_vocab(config, data.tokenizer).model
        return model, init_params(model, rng), data.tokenizer
    path = local_path(cfg.init_from)
    if not path.is_dir():
        raise ConfigError(f"finetune.init_from={cfg.init_from} is not a directory; give a training run directory, "
                          "a Hugging Face GPT-2 / OpenAI-GPT directory, or a model name (gpt2, openai-gpt, ...)")
    if (path / "finetune.json").is_file():
        raise ConfigError(f"{path} is a fine-tuning run; init_from takes a pretrained model")
    from gpt_jax.sample import load_for_sampling

    model, params, tokenizer = load_for_sampling(str(path))
    if cfg.reinit:
        params = init_params(model, rng)
    return model, params, tokenizer


def _with_dropout(model: GPTConfig, p):
    return model if p is None else dataclasses.replace(model, embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)


def finetune(config: Config, verbose: bool = True) -> dict:
    """Fine-tune as `config.finetune` says; returns a summary with the dev accuracy per epoch."""
    t0 = time.time()
    cfg, tc = config.finetune, config.train
    say = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    if cfg.train_file is None:
        raise ConfigError("mode: finetune needs finetune.train_file (a TSV or JSONL file of labelled examples)")
    train_records = read_records(cfg.train_file, cfg.format)  # bad files fail before any model is built
    if cfg.max_examples:
        train_records = train_records[:cfg.max_examples]
    dev_records = read_records(cfg.dev_file, cfg.format) if cfg.dev_file else None
    labels = label_set(train_records, cfg, cfg.train_file) if cfg.task != "multiple_choice" else None
    run_dir = Path(tc.out_dir)
    check_new_run_dir(run_dir)  # before the base model is loaded; again under the run's lock

    key = jax.random.key(tc.seed)
    base, gpt_params, tokenizer = load_base(cfg, config, jax.random.fold_in(key, 0))
    model, gpt_params, special = add_special_tokens(base, gpt_params, jax.random.fold_in(key, 1))
    model = _with_dropout(model, cfg.dropout)
    max_length = min(cfg.max_length or model.n_positions, model.n_positions)
    train_ex = encode_examples(train_records, cfg, tokenizer, special, max_length, cfg.train_file, labels)
    dev_ex = (encode_examples(dev_records, cfg, tokenizer, special, max_length, cfg.dev_file, labels)
              if dev_records else None)
    T = max(train_ex.tokens.shape[2], dev_ex.tokens.shape[2] if dev_ex else 0)
    T = min(-(-T // 8) * 8, max_length)  # one compiled shape for train and dev
    train_ex = pad_to(train_ex, T)
    dev_ex = pad_to(dev_ex, T) if dev_ex else None
    params = {"gpt": gpt_params, "head": init_head(model, n_outputs(cfg, labels), jax.random.fold_in(key, 2))}

    B = cfg.batch_size
    steps_per_epoch = math.ceil(len(train_ex) / B)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_fraction * total))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                     optax.linear_schedule(cfg.lr, 0.0, max(total - warmup, 1))], [warmup])
    # AdamW as in the GPT-1 code: betas (0.9, 0.999), clipping at global norm 1, decay on matrices only
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                                        mask=decay_mask))
    opt_state = optimizer.init(params)

    def train_step(params, opt_state, batch, step):
        def loss_fn(p):
            task_loss, lm, logits = losses(model, cfg.task, p, batch, deterministic=False,
                                           rng=jax.random.fold_in(jax.random.fold_in(key, 3), step),
                                           clf_pdrop=cfg.clf_pdrop)
            return task_loss + cfg.lm_coef * lm, (task_loss, lm, logits)

        (loss, (task_loss, lm, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        correct = ((logits.argmax(-1) == batch["labels"]) * batch["weight"]).sum()
        return optax.apply_updates(params, updates), opt_state, {
            "loss": loss, "task_loss": task_loss, "lm_loss": lm, "correct": correct, "lr": schedule(step)}

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    predict = make_predict(model, cfg.task)

    say(f"fine-tuning ({cfg.task}, labels {labels if labels else 'choice index'}) from "
        f"{cfg.init_from or 'random initialisation'}{' (re-initialised)' if cfg.reinit else ''}: "
        f"{len(train_ex)} training examples{f', {len(dev_ex)} dev' if dev_ex else ''}; "
        f"{train_ex.tokens.shape[1]} sequence(s) of {T} tokens per example; batch {B}, {cfg.epochs} epochs = "
        f"{total} steps; lm_coef {cfg.lm_coef}")
    for name, ex in (("training", train_ex), ("dev", dev_ex)):
        if ex is not None and ex.truncated:
            say(f"truncated {ex.truncated} of {len(ex)} {name} examples to {max_length} tokens "
                "(finetune.max_length)")

    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.trainer import MetricsLog

    lock = lock_new_run_dir(run_dir)
    save_config(dataclasses.replace(config, model=model), run_dir / "config.yaml")
    (run_dir / "tokenizer.json").write_text(json.dumps(tokenizer.spec()))
    meta = {"task": cfg.task, "labels": labels, "special_ids": dataclasses.asdict(special), "max_length": max_length,
            "model": dataclasses.asdict(model), "fields": cfg.fields}
    (run_dir / "finetune.json").write_text(json.dumps(meta, indent=1))
    ckpt = Checkpointer(run_dir, keep=1)
    log = MetricsLog(run_dir, True)
    summary = {"run_dir": str(run_dir), "epochs": [], "train_examples": len(train_ex),
               "truncated": train_ex.truncated + (dev_ex.truncated if dev_ex else 0), "best_dev_accuracy": None}
    step, best = 0, -1.0
    bar = tqdm(total=total, desc="finetune", disable=not verbose, file=sys.stdout, dynamic_ncols=True, mininterval=1.0)
    try:
        for epoch in range(cfg.epochs):
            order = np.random.default_rng([tc.seed, epoch]).permutation(len(train_ex))
            correct = seen = 0
            for batch in batches(train_ex, B, order):
                params, opt_state, m = train_step(params, opt_state, batch, step)
                step += 1
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                correct, seen = correct + m.pop("correct"), seen + batch["weight"].sum()
                if not math.isfinite(m["loss"]):
                    raise FloatingPointError(f"loss is {m['loss']} at step {step}; lower finetune.lr")
                if step % tc.log_every == 0:
                    log.write({"kind": "train", "step": step, **m})
                bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
                bar.update(1)
            record = {"kind": "eval", "step": step, "epoch": epoch + 1, "train_accuracy": float(correct / seen)}
            if dev_ex is not None:
                probs = predict_probs(model, cfg.task, params, dev_ex, B, predict)
                record["dev_accuracy"] = float((probs.argmax(-1) == dev_ex.labels).mean())
                record["dev_loss"] = float(-np.log(np.maximum(probs[np.arange(len(dev_ex)), dev_ex.labels], 1e-12)).mean())
            log.write(record)
            score = record.get("dev_accuracy", record["train_accuracy"])
            improved = score > best
            best = max(best, score)
            ckpt.save(step, {"params": params}, {**meta, "epoch": epoch + 1, **record}, best=improved)
            summary["epochs"].append(record)
            if verbose:
                bar.write(f"epoch {epoch + 1}: train accuracy {record['train_accuracy']:.4f}"
                          + (f", dev accuracy {record['dev_accuracy']:.4f}" if "dev_accuracy" in record else "")
                          + (" (best so far)" if improved else ""))
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        log.close()
        if lock is not None:
            lock.release()
    summary.update(best_dev_accuracy=best if dev_ex is not None else None, seconds=time.time() - t0, params=params,
                   config=model, labels=labels, tokenizer=tokenizer, special=special)
    return summary


def load_finetuned(run_dir):
    """(GPTConfig, params, tokenizer, meta) of the best checkpoint of a fine-tuning run."""
    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "finetune.json").is_file():
        raise ConfigError(f"{run_dir} is not a fine-tuning run (finetune.json is missing); "
                          "train one with train.py and mode: finetune")
    meta = json.loads((run_dir / "finetune.json").read_text())
    model = GPTConfig(**meta["model"])
    tokenizer = load_tokenizer(json.loads((run_dir / "tokenizer.json").read_text()))
    n_out = 1 if meta["task"] == "multiple_choice" else len(meta["labels"])
    abstract = jax.eval_shape(lambda: {"params": {"gpt": init_params(model, jax.random.key(0)),
                                                  "head": init_head(model, n_out, jax.random.key(0))}})
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    ckpt = Checkpointer(run_dir, keep=1, read_only=True)
    try:
        restored = ckpt.restore_latest(abstract, ckpt.best) or ckpt.restore_latest(abstract, ckpt.last)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"{run_dir} has no checkpoint that restores")
    return model, restored[0]["params"], tokenizer, meta
