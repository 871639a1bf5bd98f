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


@pytest.mark.parametrize("kind, mid", [("linear", 5.5e-4), ("constant", 1e-3)])
def test_linear_and_constant(kind, mid):
    s = make_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule=kind, decay_steps=110), 1000)
    np.testing.assert_allclose(float(s(60)), mid, rtol=1e-5)


def test_gpt1_fine_tuning_schedule_warms_up_over_a_fraction_then_decays_to_zero():
    # 0.2% of 1,500 steps = 3 warmup steps, then a straight line to 0 at step 1,500 (GPT-1's code)
    s = make_schedule(OptimConfig(lr=6.25e-5, min_lr=0.0, schedule="linear", warmup_fraction=0.002), 1500)
    for step, want in [(0, 0.0), (1, 6.25e-5 / 3), (3, 6.25e-5), (750, 6.25e-5 * 750 / 1497), (1500, 0.0)]:
        np.testing.assert_allclose(float(s(step)), want, rtol=1e-5, atol=1e-12, err_msg=str(step))
    tiny = make_schedule(OptimConfig(lr=1.0, min_lr=0.0, schedule="linear", warmup_fraction=0.002), 20)
    assert float(tiny(1)) == 1.0  # at least one warmup step


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


def test_global_norm_clipping():
    params = {"w": jnp.zeros(4)}
    opt = make_optimizer(OptimConfig(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0,
                                     beta1=0.0, beta2=0.0, eps=0.0), 10)
    grads = {"w": jnp.array([300.0, 400.0, 0.0, 0.0])}
    clipped = optax.clip_by_global_norm(1.0).update(grads, None)[0]
    np.testing.assert_allclose(optax.global_norm(clipped), 1.0, rtol=1e-6)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(updates["w"][:2], [-1.0, -1.0], rtol=1e-5)  # Adam of the clipped gradient: sign
