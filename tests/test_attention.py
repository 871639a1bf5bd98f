"""Every fused attention kernel against the einsum reference, outputs and gradients, on CPU.

The Pallas kernels (Triton for GPU, splash for TPU) run in interpret mode; the XLA path runs as is
(cuDNN's kernel has no CPU mode: its call is checked in tests/test_lowering.py, and the wrapper it
shares with the XLA path — rotation of left padding, no dense mask — is checked here). Shapes have
several heads, T not a multiple of any kernel block, and left-padded rows as generation makes them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import attention
from gpt_jax.config import ConfigError, GPTConfig
from gpt_jax.model import GPT, attention_mask_BTS, init_params, reference_attention

B, T, N, H = 2, 40, 3, 16
PAD = np.array([0, 7], np.int32)  # row 1 is left-padded by 7


def qkv(dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, T, N, H), jnp.float32).astype(dtype) for k in keys]


def reference(q, k, v, pad_B):
    valid_BT = jnp.arange(T)[None, :] >= pad_B[:, None]
    mask = attention_mask_BTS(jnp.broadcast_to(jnp.arange(T), (B, T)), valid_BT)
    return reference_attention(q, k, v, mask)


def real_rows(y):
    """The outputs of real (non-padding) queries: row 0 whole, row 1 after its padding."""
    return [y[0], y[1, PAD[1]:]]


@pytest.mark.parametrize("kernel", ["xla", "triton", "splash"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_kernel_matches_reference(kernel, dtype, tol):
    q, k, v = qkv(dtype)
    pad = jnp.asarray(PAD)
    weights = jax.random.normal(jax.random.key(9), (B, T, N, H))
    weights = weights * (jnp.arange(T)[None, :, None, None] >= pad[:, None, None, None])  # real queries only

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)

    with attention.interpret_kernels():
        out = jax.jit(lambda q, k, v: attention.fused_attention(kernel, q, k, v, pad))(q, k, v)
        grads = jax.jit(jax.grad(loss(lambda q, k, v: attention.fused_attention(kernel, q, k, v, pad)),
                                 argnums=(0, 1, 2)))(q, k, v)
    ref = reference(q, k, v, pad)
    ref_grads = jax.grad(loss(lambda q, k, v: reference(q, k, v, pad)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(real_rows(out), real_rows(ref)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)
    assert jnp.all(jnp.isfinite(out.astype(jnp.float32)))
    for name, g, r in zip("qkv", grads, ref_grads):
        # A padding key gets no gradient from real queries; the kernel's padding queries carry zero weight.
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * 4, rtol=tol,
                                   err_msg=f"d{name}")


def test_kernel_without_padding_matches_reference():
    q, k, v = qkv(jnp.float32, seed=1)
    with attention.interpret_kernels():
        out = attention.fused_attention("splash", q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, jnp.zeros(B, jnp.int32)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform,dtype,expected", [
    ("cpu", "float32", "reference"), ("cpu", "bfloat16", "reference"),
    ("gpu", "bfloat16", "cudnn"), ("gpu", "float16", "cudnn"), ("gpu", "float32", "triton"),
    ("tpu", "bfloat16", "splash"), ("tpu", "float32", "splash")])
def test_auto_resolves_by_target_platform(platform, dtype, expected):
    cfg = GPTConfig(attention_platform=platform, dtype=dtype)
    assert attention.resolve(cfg) == expected
    assert attention.resolve(cfg, dropout=True) == "reference"  # attention dropout keeps the reference path
    for forced in ("xla", "reference"):
        assert attention.resolve(dataclasses.replace(cfg, attention=forced)) == forced


def test_explicit_choices_and_refusals():
    assert attention.resolve(GPTConfig(attention="pallas", attention_platform="gpu")) == "triton"
    assert attention.resolve(GPTConfig(attention="pallas", attention_platform="tpu")) == "splash"
    with pytest.raises(ConfigError, match="bfloat16"):
        GPTConfig(attention="cudnn", dtype="float32")
    with pytest.raises(ConfigError, match="no CPU kernel"):
        GPTConfig(attention="pallas", attention_platform="cpu")
    line = attention.describe(GPTConfig(attention_platform="tpu", attn_pdrop=0.1))
    assert "reference" in line and "dropout" in line


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_model_on_tpu_kernel_equals_reference(norm):
    """The whole model with the splash kernel (interpret mode) equals the einsum model, left padding included."""
    cfg = GPTConfig(vocab_size=97, n_positions=48, n_embd=48, n_layer=2, n_head=3, norm=norm, pad_vocab_multiple=32)
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    mask = jnp.arange(T)[None, :] >= jnp.asarray(PAD)[:, None]
    ref = GPT(dataclasses.replace(cfg, attention="reference")).apply({"params": params}, x, attention_mask=mask)
    with attention.interpret_kernels():
        tpu = GPT(dataclasses.replace(cfg, attention_platform="tpu")).apply({"params": params}, x, attention_mask=mask)
    for a, b in zip(real_rows(tpu), real_rows(ref)):
        np.testing.assert_allclose(a[:, :97], b[:, :97], atol=2e-5, rtol=1e-5)
    assert jnp.all(tpu[..., 97:] == -jnp.inf) and jnp.all(ref[..., 97:] == -jnp.inf)  # padded vocabulary masked
