"""Where a training step's time goes: forward, gradients and the full step, per attention path.

python benchmarks/ablate_train_step.py

nanoGPT's CPU baby shape (4 layers, width 128, 4 heads, batch 12 x 64, vocab 65), unrolled layers;
each piece is jitted and timed alone (mean over 40 calls after one warm-up call).
"""

import dataclasses
import time

import jax
import numpy as np

from gpt_jax.config import load_config
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.pretrain import init_state, make_loss_fn, make_train_step

BABY = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.vocab_size=65", "model.n_positions=64",
        "train.batch_size=12", "model.scan_layers=false"]


def mean_ms(f, *args, n=40):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def main():
    batch = np.random.default_rng(0).integers(0, 65, (1, 12, 65)).astype(np.int32)
    key = jax.random.key(0)
    for attention in ("xla", "reference"):
        base = load_config(None, BABY)
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, attention=attention))
        optimizer = make_optimizer(config.optim, 100)
        state = init_state(config, optimizer)
        loss_fn = make_loss_fn(config)
        forward = jax.jit(lambda p, b: loss_fn(p, b, key))
        grads = jax.jit(lambda p, b: jax.grad(loss_fn)(p, b, key))
        step = jax.jit(make_train_step(config, optimizer, make_schedule(config.optim, 100)))
        print(f"attention={attention:<9} forward {mean_ms(forward, state.params, batch[0]):6.1f} ms   "
              f"gradients {mean_ms(grads, state.params, batch[0]):6.1f} ms   step {mean_ms(step, state, batch):6.1f} ms")


if __name__ == "__main__":
    main()
