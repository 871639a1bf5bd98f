import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt_jax import GPTConfig, init_params
from gpt_jax.config import OptimConfig
from gpt_jax.optim import decay_mask, make_optimizer, make_schedule


def test_warmup_then_cosine_to_floor():
    s = make_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine"), total_steps=110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), 1e-4, rtol=1e-5)  # stays at the floor


@pytest.mark.parametrize("kind, quarter, mid", [("linear", 7.75e-4, 5.5e-4), ("constant", 1e-3, 1e-3)])
def test_linear_and_constant(kind, quarter, mid):
    """A quarter of the way down the linear decay is 3/4 of it (the cosine is at 85%; both are half way
    at the midpoint)."""
    s = make_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule=kind, decay_steps=110), 1000)
    np.testing.assert_allclose(float(s(35)), quarter, rtol=1e-5)
    np.testing.assert_allclose(float(s(60)), mid, rtol=1e-5)


def test_gpt1_fine_tuning_schedule_warms_up_over_a_fraction_then_decays_to_zero():
    # 0.2% of 1,500 steps = 3 warmup steps, then a straight line to 0 at step 1,500 (GPT-1's code)
    s = make_schedule(OptimConfig(lr=6.25e-5, min_lr=0.0, schedule="linear", warmup_fraction=0.002), 1500)
    for step, want in [(0, 0.0), (1, 6.25e-5 / 3), (3, 6.25e-5), (750, 6.25e-5 * 750 / 1497), (1500, 0.0)]:
        np.testing.assert_allclose(float(s(step)), want, rtol=1e-5, atol=1e-12, err_msg=str(step))
    tiny = make_schedule(OptimConfig(lr=1.0, min_lr=0.0, schedule="linear", warmup_fraction=0.002), 20)
    assert float(tiny(1)) == 1.0  # at least one warmup step


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_over_one_step_reaches_the_floor_at_decay_steps(kind):
    for warmup in (9, 10):  # decay_steps one step after the warmup, or at its end
        s = make_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup, schedule=kind, decay_steps=10), 100)
        np.testing.assert_allclose([float(s(warmup)), float(s(11))], [1e-3, 1e-4], rtol=1e-5)
    s = make_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, schedule=kind, decay_steps=10), 100)
    assert float(s(0)) == 0.0  # a one-step warmup still starts at 0


def test_decay_mask_matrices_only():
    params = init_params(GPTConfig.preset("gpt2-tiny"), jax.random.key(0))
    mask = decay_mask(params)
    assert mask["wte"]["embedding"] and mask["wpe"]["embedding"]
    assert mask["h"]["attn"]["c_attn"]["kernel"] and mask["h"]["mlp"]["c_proj"]["kernel"]
    assert not mask["h"]["attn"]["c_attn"]["bias"] and not mask["h"]["ln_1"]["scale"] and not mask["ln_f"]["bias"]


def test_weight_decay_reaches_matrices_not_biases():
    params = {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "ln": {"scale": jnp.ones(3)}}
    opt = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5), 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(new["ln"]["scale"], 1.0)


def adam_reference(grads, lr, b1, b2, eps):
    """Updates of Adam's first steps, written out: bias-corrected moments, eps outside the square root."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g ** 2
        out.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return out


def test_adam_uses_the_configured_betas_and_eps():
    cfg = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=0.0,
                      beta1=0.5, beta2=0.6, eps=0.3)
    opt = make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(3)}
    grads = [np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -2.0])]
    state = opt.init(params)
    for g, expected in zip(grads, adam_reference(grads, 0.1, 0.5, 0.6, 0.3)):
        updates, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_clipping_scales_to_the_global_norm_and_zero_turns_it_off(clip):
    """Gradient (300, 400): clipped at 1.0 it becomes (0.6, 0.8) before Adam (eps = 1, so the first step
    is g / (|g| + 1), not its sign); grad_clip 0 leaves it as it is."""
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=clip, eps=1.0)
    opt = make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(2)}
    g = np.array([300.0, 400.0])
    seen = g * (clip / np.linalg.norm(g)) if clip else g
    updates, _ = opt.update({"w": jnp.asarray(g, jnp.float32)}, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], adam_reference([seen], 1.0, cfg.beta1, cfg.beta2, 1.0)[0], rtol=1e-5)
