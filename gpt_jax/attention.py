"""Causal self-attention kernels behind one switch, chosen for the platform the program is built for.

`model.attention` picks the kernel; `auto` resolves by `model.attention_platform` (the target
platform, resolved before tracing; default: the backend that runs), never by what happens to be
attached while tracing, so a program exported for another platform gets that platform's kernel:

    platform   auto resolves to
    cpu        reference: the einsum path in model.py (fastest on CPU, BENCHMARKS.md)
    gpu        cudnn: cuDNN flash attention (bf16 / fp16), `jax.nn.dot_product_attention(
               is_causal=True, implementation="cudnn")`; for float32, which cuDNN's flash kernel
               does not take, the Pallas Triton flash kernel
    tpu        splash: the Pallas splash-attention kernel with a causal mask (masked blocks skipped)

Explicit values force one: `xla` (XLA's own attention, scores materialised), `cudnn`, `pallas`
(Triton on GPU, splash on TPU), `reference` (einsum). Attention dropout always takes the reference
path. No fused kernel gets a dense mask: left padding (generation's prompts) is rotated away, so
every row starts with its real tokens and the causal mask alone is right for them; rows are
rotated back after. Sequences that are not a multiple of a kernel's block are padded at the end,
which a causal mask never lets a real query see.

Under a device mesh a fused kernel runs per shard in a shard_map (`_on_mesh`), never partitioned by
XLA: heads that do not divide the `tensor` axis are padded with zero heads to a multiple of it, and a
batch that does not divide data x fsdp stays whole on each shard.

Pallas kernels run anywhere in interpret mode (`interpret_kernels()`), which is how the tests
check them on CPU against the reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp

from gpt_jax.config import GPTConfig

FUSED = ("xla", "cudnn", "triton", "splash")
_interpret = contextvars.ContextVar("gpt_jax_pallas_interpret", default=False)

# The logical names of an activation [B, T, N, H]; parallel.py maps them onto mesh axes.
ACTIVATION_AXES = ("batch", None, "heads", None)


@contextlib.contextmanager
def interpret_kernels(on: bool = True):
    """Run Pallas kernels in interpret mode (on any backend, e.g. to test them on CPU)."""
    token = _interpret.set(on)
    try:
        yield
    finally:
        _interpret.reset(token)


def target_platform(config: GPTConfig) -> str:
    """'cpu', 'gpu' or 'tpu': `config.attention_platform`, else the backend that runs."""
    if config.attention_platform:
        return config.attention_platform
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def resolve(config: GPTConfig, dropout: bool = False) -> str:
    """The kernel that runs: 'reference', 'xla', 'cudnn', 'triton' or 'splash'."""
    if dropout or config.attention == "reference":
        return "reference"
    platform = target_platform(config)
    if config.attention in ("xla", "cudnn"):
        return config.attention
    if config.attention == "pallas":
        if platform == "cpu":
            raise ValueError("model.attention=pallas needs a GPU or TPU target (set model.attention_platform, "
                             "or run its kernels in interpret mode with gpt_jax.attention.interpret_kernels())")
        return "triton" if platform == "gpu" else "splash"
    if platform == "gpu":
        return "cudnn" if config.dtype in ("bfloat16", "float16") else "triton"
    return "splash" if platform == "tpu" else "reference"


def describe(config: GPTConfig) -> str:
    """One line for the start of a run: which attention kernel runs and why."""
    names = {"reference": "einsum reference", "xla": "XLA dot_product_attention", "cudnn": "cuDNN flash",
             "triton": "Pallas Triton flash", "splash": "Pallas splash (causal)"}
    dropout = config.attn_pdrop > 0
    kernel = resolve(config, dropout)
    why = (" (attention dropout needs the reference path; model.attn_pdrop=0 enables fused kernels)"
           if dropout and resolve(config) != "reference" else "")
    return f"attention: {names[kernel]} for {target_platform(config)}{why}"


def _rotate_rows(x_BT, shift_B):
    """x[b, (t + shift[b]) mod T] along axis 1."""
    T = x_BT.shape[1]
    idx_BT = (jnp.arange(T)[None, :] + shift_B[:, None]) % T
    return jnp.take_along_axis(x_BT, idx_BT.reshape(idx_BT.shape + (1,) * (x_BT.ndim - 2)), axis=1)


def _pad_end(x, axis: int, multiple: int):
    """`x` with zeros after its end along `axis`, up to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    return x if extra == 0 else jnp.pad(x, [(0, extra) if d == axis else (0, 0) for d in range(x.ndim)])


def _dot_product(q_BTNH, k_BTNH, v_BTNH, implementation):
    return jax.nn.dot_product_attention(q_BTNH, k_BTNH, v_BTNH, is_causal=True, implementation=implementation)


def _triton(q_BTNH, k_BTNH, v_BTNH):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    T = q_BTNH.shape[1]
    block = min(128, max(16, 1 << (T - 1).bit_length()))
    q, k, v = (_pad_end(a, 1, block) for a in (q_BTNH, k_BTNH, v_BTNH))
    sizes = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(block, 32),
                                     block_kv_dkv=min(block, 32), block_q_dq=min(block, 32), block_kv_dq=min(block, 32))
    y = gpu_attention.mha(q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), causal=True, block_sizes=sizes,
                          interpret=_interpret.get())
    return y[:, :T]


def _splash_kernel(T: int, N: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(N)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q_BTNH, k_BTNH, v_BTNH):
    T, N, H = q_BTNH.shape[1:]
    block = 512 if T >= 512 and T % 512 == 0 else 128  # the kernel's blocks tile whole 128-lane vregs
    q, k, v = (_pad_end(a, 1, block).transpose(0, 2, 1, 3) for a in (q_BTNH * (1.0 / math.sqrt(H)), k_BTNH, v_BTNH))
    kernel = _splash_kernel(q.shape[2], N, block, _interpret.get())
    return jax.vmap(kernel)(q, k, v).transpose(0, 2, 1, 3)[:, :T]


KERNELS = {"xla": functools.partial(_dot_product, implementation="xla"),
           "cudnn": functools.partial(_dot_product, implementation="cudnn"),
           "triton": _triton, "splash": _splash}


def _on_mesh(kernel):
    """Under a mesh (the `mesh` strategy traces with one set), a kernel runs per shard in a shard_map:
    batch split like the batch, heads like the attention heads. No fused kernel is ever left to XLA's
    partitioner: it cannot split a Pallas (Mosaic) kernel, and cuDNN's partitioning rule (a Python
    callback at compile time) fails where the heads do not split. So where a dimension does not split:

    - a batch that does not divide its mesh axes (say generation's 3 prompts) is whole on every shard;
    - heads that do not divide `tensor` (GPT-2's 12 or GPT-2 large's 20 over 8, XL's 25 over 2) are
      padded with zero heads to a multiple of it; their outputs are sliced off, so they get no gradient.

    Padding rather than every head on every `tensor` shard: it costs N_padded / N of the attention
    FLOPs (16/12 for GPT-2 over 8) where replication costs `tensor` times (8x), and compiled for TPU
    v5e x8 and H100 x8 (2-layer train steps, batch 8, BENCHMARKS.md) it also needed less memory per
    chip (TPU, gpt2 over tensor 8: 0.39 GiB against 0.58), moved fewer collective bytes (184 MiB
    against 262) and compiled faster (39 s against 48)."""
    import flax.linen as nn

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not nn.get_logical_axis_rules():
        return kernel
    batch_axes, _, head_axes, _ = nn.logical_to_mesh_axes(ACTIVATION_AXES)

    def size(axes):
        return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())))

    def per_shard(q_BTNH, k_BTNH, v_BTNH):
        B, N = q_BTNH.shape[0], q_BTNH.shape[2]
        spec = jax.sharding.PartitionSpec(batch_axes if B % size(batch_axes) == 0 else None, None, head_axes, None)
        q, k, v = (_pad_end(a, 2, size(head_axes)) for a in (q_BTNH, k_BTNH, v_BTNH))
        y = jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
        return y[:, :, :N]

    return per_shard


def fused_attention(kernel: str, q_BTNH, k_BTNH, v_BTNH, pad_B=None):
    """Causal attention with a fused kernel; `pad_B` counts each row's left padding (or None).

    Padding queries get finite values that nothing should read."""
    if pad_B is not None:
        q_BTNH, k_BTNH, v_BTNH = (_rotate_rows(a, pad_B) for a in (q_BTNH, k_BTNH, v_BTNH))
    fn = KERNELS[kernel] if kernel == "xla" else _on_mesh(KERNELS[kernel])
    y_BTNH = fn(q_BTNH, k_BTNH, v_BTNH)
    if pad_B is not None:
        y_BTNH = _rotate_rows(y_BTNH, -pad_B)
    return y_BTNH
