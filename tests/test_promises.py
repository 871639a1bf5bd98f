"""README promises about training checked against direct computation, through the public entry
points (`train`, `load_run`, the run directory): gradient accumulation averages, clipping by global
norm, resume across an epoch boundary, and `best/` holding the lowest validation loss."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compiled_alike
from gpt_jax.config import load_config
from gpt_jax.model import GPT, lm_loss
from gpt_jax.runs import load_run
from gpt_jax.trainer import train

PERIOD = 32  # the corpus repeats every 32 characters: with n_positions=31 every window of an epoch is the same
MODEL = ["model.preset=gpt2-tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
         f"model.n_positions={PERIOD - 1}", "model.scan_layers=false"]


def run(tmp, name, corpus, *overrides):
    config = load_config(None, [*MODEL, f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}",
                                f"train.out_dir={tmp / name}", "train.eval_batches=1", "train.log_every=1",
                                "optim.weight_decay=0", "optim.schedule=constant", *overrides])
    return train(config, verbose=False)


@pytest.fixture(scope="module")
def periodic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("periodic")
    unit = "".join(np.random.default_rng(0).choice(list("abcdefgh"), PERIOD))
    (tmp / "periodic.txt").write_text(unit * 120)
    return tmp


@pytest.fixture(scope="module")
def initial(periodic):
    """The initial parameters: one step at learning rate 0 (warmup starts at 0) leaves them as drawn."""
    run(periodic, "init", periodic / "periodic.txt", "train.steps=1", "optim.warmup_steps=1",
        "train.batch_size=8", "optim.grad_clip=0")
    config, params, tokenizer = load_run(periodic / "init", "last")
    # The windows of one epoch are all the same rotation of the unit, at an offset drawn by the sampler:
    # the gradient of every rotation, computed directly.
    unit = np.array(tokenizer.encode((periodic / "periodic.txt").read_text()[:2 * PERIOD]), np.int32)
    rotations = np.stack([unit[r: r + PERIOD] for r in range(PERIOD)])
    model = GPT(config.model)

    def loss(p, seq):
        return lm_loss(model.apply({"params": p}, seq[None, :-1]), seq[None, 1:])

    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, rotations)
    return params, grads


def adam_first_step(grads, lr, eps):
    """AdamW's first update with bias correction and no weight decay: -lr * g / (|g| + eps)."""
    return jax.tree.map(lambda g: -lr * g / (jnp.abs(g) + eps), grads)


def assert_update(params0, params1, expected_R):
    """params1 - params0 equals the expected update of one of the rotations (the sampler's offset)."""
    actual = jax.tree.map(jnp.subtract, params1, params0)
    errors = [max(float(jnp.max(jnp.abs(a - e[r]))) for a, e in zip(jax.tree.leaves(actual),
                                                                   jax.tree.leaves(expected_R)))
              for r in range(PERIOD)]
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(actual))
    assert scale > 0 and min(errors) < 2e-3 * scale, (min(errors), scale)
    return int(np.argmin(errors))


def test_gradient_accumulation_averages_micro_batch_gradients(periodic, initial):
    """4 micro-batches, no clipping, eps large enough that Adam's first step is close to linear in the
    gradient: the step equals the one from the mean gradient (a sum would be 4x as large)."""
    params0, grads = initial
    lr, eps = 1e-2, 1.0
    run(periodic, "accum", periodic / "periodic.txt", "train.steps=1", "optim.warmup_steps=0", "train.batch_size=8",
        "optim.grad_accum=4", "optim.grad_clip=0", f"optim.lr={lr}", f"optim.eps={eps}")
    _, params1, _ = load_run(periodic / "accum", "last")
    assert_update(params0, params1, adam_first_step(grads, lr, eps))


def test_grad_clip_scales_the_gradient_to_the_global_norm(periodic, initial):
    params0, grads = initial
    lr, eps, clip = 1e-2, 1e-3, 0.01
    norms = jax.vmap(lambda g: jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g))))(grads)
    assert float(norms.min()) > 10 * clip  # clipping is active for every rotation
    clipped = jax.tree.map(lambda g: g * (clip / norms).reshape((-1,) + (1,) * (g.ndim - 1)), grads)
    run(periodic, "clip", periodic / "periodic.txt", "train.steps=1", "optim.warmup_steps=0", "train.batch_size=8",
        "optim.grad_accum=2", f"optim.grad_clip={clip}", f"optim.lr={lr}", f"optim.eps={eps}")
    _, params1, _ = load_run(periodic / "clip", "last")
    r = assert_update(params0, params1, adam_first_step(clipped, lr, eps))
    # the logged grad_norm is that of the mean gradient before clipping
    rows = map(json.loads, (periodic / "clip" / "metrics.jsonl").read_text().splitlines())
    (logged,) = [row["grad_norm"] for row in rows if row["kind"] == "train"]
    np.testing.assert_allclose(logged, float(norms[r]), rtol=1e-4)


def records(run_dir, kind):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r["val_loss" if kind == "eval" else "loss"]
    return out


@pytest.fixture(scope="module")
def random_text(tmp_path_factory):
    """9 windows of 32 characters in the training split: two batches of 4 per epoch."""
    tmp = tmp_path_factory.mktemp("epochs")
    (tmp / "random.txt").write_text("".join(np.random.default_rng(1).choice(list("abcdefghij \n"), 470)))
    return tmp


EPOCHS = ["train.batch_size=4", "optim.warmup_steps=0", "optim.lr=0.2", "train.eval_every=1",
          "train.save_every=3", "data.val_fraction=0.35"]


@pytest.fixture(scope="module")
def epoch_runs(random_text):
    """An uninterrupted 6-step run, and one stopped at step 3 (epoch 1, after one of its two batches) then
    extended to 6 steps; with the steps that `best/` held at step 3 and the validation losses until then."""
    corpus = random_text / "random.txt"
    with compiled_alike():  # the runs are compared with one another
        run(random_text, "whole", corpus, "train.steps=6", *EPOCHS)
        parts = random_text / "parts"
        run(random_text, "parts", corpus, "train.steps=3", *EPOCHS)
        best_at_3 = sorted(int(p.name) for p in (parts / "best").iterdir() if p.name.isdigit())
        val_at_3 = records(parts, "eval")
        summary = run(random_text, "parts", corpus, "train.steps=6", *EPOCHS)
    return random_text / "whole", parts, summary, best_at_3, val_at_3


def test_resume_across_an_epoch_boundary_restores_the_epoch(epoch_runs):
    """The losses of steps 4-6 after resuming at step 3 equal the uninterrupted run's (a sampler restored
    to epoch 0 reads other windows)."""
    whole_dir, parts_dir, summary, _, _ = epoch_runs
    assert summary["start_step"] == 3
    whole, parts = records(whole_dir, "train"), records(parts_dir, "train")
    assert sorted(whole) == sorted(parts) == list(range(1, 7))
    assert parts == whole


def test_best_holds_the_lowest_validation_loss(epoch_runs):
    """`best/` holds the step with the lowest logged validation loss (here not the last)."""
    *_, best_at_3, val = epoch_runs
    best_step = min(val, key=val.get)
    assert best_step != max(val), f"the validation loss should rise at lr 0.2: {val}"  # else nothing is tested
    assert best_at_3 == [best_step]


def test_finetuning_starts_from_the_init_from_weights(epoch_runs, tmp_path):
    """Two fine-tuning steps at learning rate 1e-6 leave the transformer where `init_from` put it (the run's
    best checkpoint), within what two AdamW steps can move (a few times lr each)."""
    from gpt_jax.trainer import run_training
    from gpt_jax.finetune import load_finetuned

    pretrained = epoch_runs[0]
    config, pre, _ = load_run(pretrained, "best")
    rows = [f"{text}\t{label}" for text, label in [("abc", 0), ("bad", 1), ("cafe", 0), ("head", 1)] * 2]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    code = run_training(None, ["mode=finetune", f"finetune.init_from={pretrained}",
                               f"finetune.train_file={tmp_path / 'train.tsv'}", "finetune.batch_size=4",
                               "finetune.epochs=1", "finetune.lr=1e-6", f"train.out_dir={tmp_path / 'ft'}"])
    assert code == 0
    _, ft, _, _ = load_finetuned(tmp_path / "ft")
    V = config.model.vocab_size  # the real rows: not the special tokens, nor the padding
    ft = {**ft["gpt"], "wte": {"embedding": ft["gpt"]["wte"]["embedding"][:V]}}
    pre = {**pre, "wte": {"embedding": pre["wte"]["embedding"][:V]}}
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(ft), jax.tree.leaves(pre)))
    assert moved < 1e-4, moved  # a fresh N(0, 0.02) initialisation would be ~0.1 away somewhere


@pytest.mark.parametrize("kind", ["embd", "attn", "resid", None])
def test_the_training_loss_applies_dropout_when_any_one_rate_is_set(kind):
    """Each of the three dropout rates alone turns dropout on in the training loss (two keys, two losses);
    with all three at 0 the loss is the plain forward pass's, whatever the key, and so is the evaluation loss."""
    from gpt_jax.model import init_params
    from gpt_jax.pretrain import make_eval_step, make_loss_fn

    rates = [f"model.{k}_pdrop={0.5 if k == kind else 0}" for k in ("embd", "attn", "resid")]
    config = load_config(None, [*MODEL, *rates])
    params = init_params(config.model, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 9)), jnp.int32)
    loss = jax.jit(make_loss_fn(config))
    a, b = loss(params, tokens, jax.random.key(1)), loss(params, tokens, jax.random.key(2))
    if kind is None:
        plain = lm_loss(GPT(config.model).apply({"params": params}, tokens[:, :-1]), tokens[:, 1:])
        np.testing.assert_allclose([a, b], [plain, plain], rtol=1e-6)
        np.testing.assert_allclose(make_eval_step(config)(params, tokens), plain, rtol=1e-6)  # what evaluation reports
    else:
        assert abs(float(a) - float(b)) > 1e-4, (kind, a, b)

