"""The classification, entailment and similarity heads, the auxiliary-LM weighting (`lm_coef`) and the
classifier dropout (`clf_pdrop`) of a fine-tuning run, through its public entry points (`run_training`,
metrics.jsonl, `load_finetuned`, `predict_file`), against the GPT-1 paper's formulas evaluated on
transformers' OpenAIGPTLMHeadModel built from the run's saved weights."""

import json

import numpy as np
import pytest

from gpt_jax.trainer import run_training
from gpt_jax.config import load_config
from gpt_jax.finetune import load_finetuned
from gpt_jax.predict import predict_file

torch = pytest.importorskip("torch", reason="torch runs the reference OpenAIGPTLMHeadModel")
transformers = pytest.importorskip("transformers", reason="transformers' OpenAIGPTLMHeadModel is the reference")

WORDS = ["abc", "bad", "cafe", "head", "ace", "fed", "dab", "gag", "had", "bead", "cab", "egg"]
TASKS = {  # task -> (the first text's column, the second's or None, labels)
    "classification": ("s", None, ["neg", "neu", "pos"]),
    "entailment": ("p", "h", ["contradiction", "entailment", "neutral"]),
    "similarity": ("a", "b", ["0", "1"]),
}


def task_file(path, task, n):
    """n examples with random texts and labels, as a TSV with the task's columns."""
    first, second, labels = TASKS[task]
    rng = np.random.default_rng(len(task))
    rows = [[" ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(2 if second else 1)]
            + [labels[i % len(labels)]] for i in range(n)]
    header = [first] + ([second] if second else []) + ["y"]
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return [dict(zip(header, r)) for r in rows]


def fields(task):
    first, second, _ = TASKS[task]
    return f"text: {first}, " + (f"text_b: {second}, " if second else "") + "label: y"


def finetune_run(tmp, task, n, *overrides):
    """A fine-tuning run from a random tiny GPT-1 (post-LN) at a learning rate too small to move it."""
    (tmp / "corpus.txt").write_text(" ".join(WORDS) * 20 + "\n")
    records = task_file(tmp / f"{task}.tsv", task, n)
    out = tmp / task
    code = run_training(None, [
        "mode=finetune", "model.preset=gpt1-tiny", "model.n_layer=1", "model.n_positions=32", f"data.source={tmp / 'corpus.txt'}",
        f"data.cache_dir={tmp / 'cache'}", f"finetune.task={task}", "finetune.fields={" + fields(task) + "}",
        f"finetune.train_file={tmp / f'{task}.tsv'}", f"finetune.dev_file={tmp / f'{task}.tsv'}",
        f"finetune.batch_size={n}", "finetune.epochs=1", "finetune.lr=1e-9", "finetune.dropout=0", "train.log_every=1",
        f"train.out_dir={out}", *overrides])
    assert code == 0
    return out, records


def reference(run_dir, task, records):
    """(extract states [N, D] after combining the sequences of an example, per-token LM losses, the
    head's logits [N, K]) from transformers on the run's weights, with the Figure 1 input layout."""
    from gpt_jax.pretrained import save_pretrained

    model, params, tokenizer, meta = load_finetuned(run_dir)
    save_pretrained(model, params["gpt"], run_dir / "hf")
    hf = transformers.OpenAIGPTLMHeadModel.from_pretrained(run_dir / "hf").eval()
    ids = meta["special_ids"]
    first, second, _ = TASKS[task]
    states, token_losses = [], []
    for r in records:
        a = tokenizer.encode(r[first])
        if second is None:
            seqs = [[ids["start"], *a, ids["classify"]]]
        else:
            b = tokenizer.encode(r[second])
            seqs = [[ids["start"], *a, ids["delimiter"], *b, ids["classify"]]]
            if task == "similarity":  # both orderings, their final states added
                seqs.append([ids["start"], *b, ids["delimiter"], *a, ids["classify"]])
        h = 0
        for seq in seqs:
            with torch.no_grad():
                out = hf(torch.tensor([seq]), output_hidden_states=True)
            h = h + out.hidden_states[-1][0, -1].numpy()
            logp = torch.log_softmax(out.logits[0, :-1], -1).numpy()
            token_losses += list(-logp[np.arange(len(seq) - 1), seq[1:]])
        states.append(h)
    states = np.stack(states).astype(np.float64)
    head = {k: np.asarray(v, np.float64) for k, v in params["head"].items()}
    return states, np.array(token_losses), states @ head["kernel"] + head["bias"], head


def cross_entropy(logits, labels):
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -logp[np.arange(len(labels)), labels]


def metrics(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def check_predictions(run_dir, tmp, task, records, logits):
    """The run's dev loss and accuracy, and predict_file's probabilities, equal the direct head's."""
    labels = np.array([TASKS[task][2].index(r["y"]) for r in records])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dev = metrics(run_dir, "eval")[-1]
    np.testing.assert_allclose(dev["dev_loss"], cross_entropy(logits, labels).mean(), rtol=1e-4)
    assert dev["dev_accuracy"] == (probs.argmax(-1) == labels).mean()
    predict_file(run_dir, tmp / f"{task}.tsv", tmp / f"{task}.pred.tsv")
    rows = [line.split("\t") for line in (tmp / f"{task}.pred.tsv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(np.array([[float(x) for x in row[1:]] for row in rows]), probs, atol=3e-6)


@pytest.mark.parametrize("task", ["entailment", "similarity"])
def test_pair_heads_and_lm_coef_match_the_paper_formulas(tmp_path, task):
    """The first step's loss is the head's cross-entropy on the [extract] state (similarity: the sum over
    both orderings) plus lm_coef times the mean next-token loss; evaluation and prediction use the same head."""
    lm_coef = 0.3
    run_dir, records = finetune_run(tmp_path, task, 6, f"finetune.lm_coef={lm_coef}", "finetune.clf_pdrop=0")
    _, token_losses, logits, _ = reference(run_dir, task, records)
    labels = np.array([TASKS[task][2].index(r["y"]) for r in records])
    expected = cross_entropy(logits, labels).mean() + lm_coef * token_losses.mean()
    first = metrics(run_dir, "train")[0]
    assert first["step"] == 1
    np.testing.assert_allclose(first["loss"], expected, rtol=2e-5)
    check_predictions(run_dir, tmp_path, task, records, logits)


def test_classification_head_and_clf_pdrop_rate(tmp_path):
    """With clf_pdrop=0.2 and lm_coef=0, on a training file of one example repeated, each step's loss is
    the mean over 8 independent dropout masks of the head's cross-entropy on that example's [extract]
    state under inverted dropout at rate 0.2 (kept with probability 0.8, scaled by 1/0.8). The variance
    over 40 steps is compared with a simulation of that dropout: for 40 near-Gaussian draws the ratio
    falls outside [0.45, 2.2] with probability about 0.001. Without the dropout the variance is 0; with
    the keep probability taken for the rate it is about 16 times larger."""
    p, steps = 0.2, 40
    records = task_file(tmp_path / "classification.tsv", "classification", 8)
    one = tmp_path / "one.tsv"
    one.write_text("s\ty\n" + f"{records[0]['s']}\t{records[0]['y']}\n" * 8 * steps)
    run_dir, records = finetune_run(tmp_path, "classification", 8, f"finetune.clf_pdrop={p}", "finetune.lm_coef=0",
                                    f"finetune.train_file={one}", "finetune.labels=[neg, neu, pos]")
    states, _, logits, head = reference(run_dir, "classification", records)
    check_predictions(run_dir, tmp_path, "classification", records, logits)
    label = TASKS["classification"][2].index(records[0]["y"])
    keep = np.random.default_rng(0).random((20_000, 8, states.shape[1])) >= p
    dropped = np.where(keep, states[0] / (1 - p), 0.0) @ head["kernel"] + head["bias"]
    simulated = cross_entropy(dropped.reshape(-1, dropped.shape[-1]), np.full(20_000 * 8, label))
    simulated = simulated.reshape(20_000, 8).mean(-1)
    losses = np.array([r["loss"] for r in metrics(run_dir, "train")])
    assert len(losses) == steps
    ratio = losses.var(ddof=1) / simulated.var()
    assert 0.45 < ratio < 2.2, (ratio, losses.var(ddof=1), simulated.var())
    assert abs(losses.mean() - simulated.mean()) < 4 * simulated.std() / np.sqrt(steps)


def test_finetune_defaults_are_the_gpt1_papers():
    """Section 4.1 of the GPT-1 paper: classifier dropout 0.1, learning rate 6.25e-5, batch size 32,
    3 epochs, linear warmup over 0.2% of training, lambda (lm_coef) 0.5; dropout 0.1 and w = 0.01 as in
    pretraining."""
    cfg = load_config(None, ["mode=finetune"]).finetune
    assert (cfg.clf_pdrop, cfg.lr, cfg.batch_size, cfg.epochs, cfg.warmup_fraction, cfg.lm_coef) == (
        0.1, 6.25e-5, 32, 3, 0.002, 0.5)
    assert (cfg.dropout, cfg.weight_decay) == (0.1, 0.01)


def test_fine_tuning_takes_the_gpt1_codes_optimizer_whatever_the_optim_section_says():
    """AdamW as in the GPT-1 code (betas 0.9 / 0.999, eps 1e-8, clipping at global norm 1) with the finetune
    section's rate, decay and warmup on a linear schedule to 0; of the optim section only grad_accum applies.
    Each epoch is steps_per_epoch steps, with an evaluation at its end."""
    from gpt_jax.finetune import finetune_config

    config = load_config(None, ["mode=finetune", "finetune.weight_decay=0.02", "finetune.batch_size=4",
                                "finetune.epochs=2", "optim.lr=1", "optim.min_lr=0.5", "optim.schedule=constant",
                                "optim.beta1=0.5", "optim.beta2=0.5", "optim.eps=0.1", "optim.grad_clip=5",
                                "optim.weight_decay=0.3", "optim.grad_accum=2", "train.steps=3", "train.eval_every=1"])
    got = finetune_config(config, 7)
    o = got.optim
    assert (o.lr, o.min_lr, o.schedule, o.warmup_fraction, o.weight_decay) == (6.25e-5, 0.0, "linear", 0.002, 0.02)
    assert (o.beta1, o.beta2, o.eps, o.grad_clip, o.grad_accum) == (0.9, 0.999, 1e-8, 1.0, 2)
    assert (got.train.batch_size, got.train.steps, got.train.eval_every) == (4, 14, 7)
