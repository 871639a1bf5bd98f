"""Every fused attention kernel against the einsum reference, outputs and gradients, on CPU.

The Pallas kernels (Triton for GPU, splash for TPU) run in interpret mode; the XLA path runs as is
(cuDNN's kernel has no CPU mode: its call is compiled for H100 in tests/test_compile.py, and the wrapper it
shares with the XLA path — rotation of left padding, no dense mask — is checked here). Shapes have
several heads, T not a multiple of any kernel block, and left-padded rows as generation makes them.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from gpt_jax import attention
from gpt_jax.config import ConfigError, GPTConfig
from gpt_jax.model import GPT, attention_mask_BTS, init_params, reference_attention

B, T, N, H = 2, 40, 3, 16
PAD = np.array([0, 7], np.int32)  # row 1 is left-padded by 7


def qkv(dtype, seed=0, n_head=N):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (B, T, n_head, H), jnp.float32).astype(dtype) for k in keys]


def reference(q, k, v, pad_B):
    valid_BT = jnp.arange(T)[None, :] >= pad_B[:, None]
    mask = attention_mask_BTS(jnp.broadcast_to(jnp.arange(T), (B, T)), valid_BT)
    return reference_attention(q, k, v, mask)


def real_rows(y):
    """The outputs of real (non-padding) queries: row 0 whole, row 1 after its padding."""
    return [y[0], y[1, PAD[1]:]]


def outputs_and_grads(fn, q, k, v, weights):
    """fn(q, k, v) and the gradients of sum(fn(q, k, v) * weights) with respect to q, k and v."""
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)  # noqa: E731
    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@jax.jit
def reference_outputs_and_grads(q, k, v, pad_B, weights):
    return outputs_and_grads(lambda q, k, v: reference(q, k, v, pad_B), q, k, v, weights)


def check_against_reference(fn, q, k, v, tol):
    """`fn(q, k, v)` (jitted here, Pallas kernels in interpret mode) against the reference with PAD's left
    padding: the outputs of real queries, and the gradients of a random weighting of them. Returns the
    jaxpr that ran."""
    pad = jnp.asarray(PAD)
    weights = jax.random.normal(jax.random.key(9), q.shape)
    weights = weights * (jnp.arange(T)[None, :, None, None] >= pad[:, None, None, None])  # real queries only

    with attention.interpret_kernels():
        traced = jax.jit(lambda q, k, v, weights: outputs_and_grads(fn, q, k, v, weights)).trace(q, k, v, weights)
        out, grads = traced.lower().compile()(q, k, v, weights)
    ref, ref_grads = reference_outputs_and_grads(q, k, v, pad, weights)
    for a, b in zip(real_rows(out), real_rows(ref)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)
    assert jnp.all(jnp.isfinite(out.astype(jnp.float32)))
    for name, g, r in zip("qkv", grads, ref_grads):
        # A padding key gets no gradient from real queries; the kernel's padding queries carry zero weight.
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol * 4, rtol=tol,
                                   err_msg=f"d{name}")
    return traced.jaxpr.jaxpr


@pytest.mark.parametrize("kernel", ["xla", "triton", "splash"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_kernel_matches_reference(kernel, dtype, tol):
    pad = jnp.asarray(PAD)
    check_against_reference(lambda q, k, v: attention.fused_attention(kernel, q, k, v, pad), *qkv(dtype), tol)


# (data, fsdp, tensor), heads: heads that do not split over `tensor` (6 over 4 is GPT-2's 12 over 8 at half
# the size), with the batch (B = 2) split over data, then not splitting over data x fsdp.
UNEVEN_MESHES = [((2, 1, 4), 6), ((1, 4, 2), 3)]


def pallas_calls(jaxpr, in_shard_map=False, counts=None) -> dict:
    """How many Pallas kernels a jaxpr calls, by whether a shard_map places them: {True: n, False: m}."""
    counts = {True: 0, False: 0} if counts is None else counts
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            counts[in_shard_map] += 1
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    pallas_calls(sub, in_shard_map or eqn.primitive.name == "shard_map", counts)
    return counts


def check_uneven_meshes():
    """On 8 CPU devices (run by the test below in a process of its own): under each of UNEVEN_MESHES,
    traced as the `mesh` strategy traces a step, every kernel equals the reference (outputs and
    gradients) and no Pallas kernel is left for XLA's partitioner (TPU and GPU compilers refuse one)."""
    import flax.linen as nn
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from gpt_jax.parallel import MESH_AXES, RULES

    pad = jnp.asarray(PAD)
    for shape, n_head in UNEVEN_MESHES:
        mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        q, k, v = jax.device_put(qkv(jnp.float32, n_head=n_head), NamedSharding(mesh, P(None, None, None, None)))
        for kernel in ("xla", "triton", "splash"):
            def on_mesh(q, k, v):
                with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(RULES):
                    return attention.fused_attention(kernel, q, k, v, pad)

            jaxpr = check_against_reference(on_mesh, q, k, v, 2e-5)
            # forward and backward kernels, all per shard: TPU and GPU compilers cannot split one themselves
            calls = pallas_calls(jaxpr)
            assert calls[False] == 0 and (kernel == "xla" or calls[True] >= 2), (shape, n_head, kernel, calls)
            print("OK", shape, n_head, kernel, flush=True)


def test_kernels_run_per_shard_and_match_reference_where_heads_or_batch_do_not_split():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    code = "import sys; sys.path.insert(0, 'tests'); import test_attention; test_attention.check_uneven_meshes()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK ") == 3 * len(UNEVEN_MESHES)


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
