"""The optax optimizer: global-norm clipping, then AdamW with decay on matrices only, on a schedule.

Gradient accumulation happens in the train step (a `lax.scan` over micro-batches, so one dispatch
does one optimizer step); this module only sees the averaged gradient.
"""

from __future__ import annotations

import jax
import optax

from gpt_jax.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """`warmup_steps`, or `warmup_fraction` of the decay steps (at least 1) when that is set."""
    decay_steps = cfg.decay_steps or total_steps
    if cfg.warmup_fraction is not None:
        return min(max(1, round(cfg.warmup_fraction * decay_steps)), decay_steps)
    return min(cfg.warmup_steps, decay_steps)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `min_lr` at `decay_steps`, or constant.

    GPT-1's fine-tuning schedule is `schedule: linear`, `min_lr: 0` with `warmup_fraction: 0.002`:
    linear warmup over 0.2% of the steps, then linear decay to 0.
    """
    decay_steps = cfg.decay_steps or total_steps
    warmup = warmup_steps(cfg, total_steps)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.min_lr, max(decay_steps - warmup, 1))
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(decay_steps - warmup, 1), alpha=cfg.min_lr / cfg.lr)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on biases or LayerNorm parameters.

    Layer-stacked parameters carry a leading layer axis, so a bias there is 2-D: go by the name.
    """
    def decays(path, _):
        return path[-1].key in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
