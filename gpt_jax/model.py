"""GPT-1 and GPT-2 as pure-functional Flax linen modules.

GPT-1: Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training".
GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
Both are a stack of decoder blocks (masked self-attention + MLP) over token + learned position
embeddings, with the output layer tied to the token embedding. GPT-1 normalises after each residual
add (post-LN); GPT-2 moved LayerNorm to the input of each sub-block and added a final LayerNorm
(pre-LN), which is what lets it train deeper stacks without warm-up tricks.

Parameter names follow OpenAI / Hugging Face (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f) so weight import is a rename plus layer stacking. The layers live under
`nn.scan`, so `h` holds every block's parameters stacked on a leading layer axis and compile time
does not grow with depth.

Shape letters: B batch, T time (query positions), S key positions (cache slots), D width (n_embd),
N heads, H head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax

from gpt_jax import attention
from gpt_jax.config import GPTConfig

ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class GPTOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 (V: the padded vocabulary; padded columns are -inf)
    hidden: jax.Array  # [B, T, D] final hidden states (after ln_f for GPT-2)
    cache: Optional[dict]  # {"k": [L, B, N, H, S], "v": [L, B, N, S, H]} when a cache was passed in


def init_cache(config: GPTConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """A zeroed KV cache for `max_length` slots; pass it to GPT.apply with `cache_index`.

    Keys are stored transposed, [L, B, N, H, S], and values as [L, B, N, S, H]: the layouts the two
    attention matmuls read directly, so a decode step moves no cached tensor (a [B, S, N, H] cache
    costs two full transposes per layer per token).
    """
    L, B, N, H, S = config.n_layer, batch_size, config.n_head, config.head_dim, max_length
    dtype = dtype or jnp.dtype(config.dtype)
    return {"k": jnp.zeros((L, B, N, H, S), dtype), "v": jnp.zeros((L, B, N, S, H), dtype)}


def attention_mask_BTS(q_slot_BT, key_valid_BS):
    """Causal mask over key slots, also hiding invalid (padding) keys.

    A query may always see its own slot, so a padding query never has an empty softmax row.
    """
    k_slot_S = jnp.arange(key_valid_BS.shape[1])
    causal = k_slot_S[None, None, :] <= q_slot_BT[:, :, None]
    own = k_slot_S[None, None, :] == q_slot_BT[:, :, None]
    return causal & (key_valid_BS[:, None, :] | own)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a, b):
    """`jnp.einsum(spec, a, b)` with a float32 result; the backward matmuls run in the operands' dtype.

    A plain einsum with preferred_element_type=float32 feeds its float32 cotangent straight into both
    backward matmuls, so with bf16 operands those run with a float32 operand (for the logits and the
    attention scores: about a fifth of a GPT-2 step's FLOPs). Here the cotangent is cast to the
    operands' dtype first; the matmul units still accumulate in float32."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, res, g):
    a, b = res
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    return vjp(g.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def reference_attention(q_BTNH, k_BSNH, v_BSNH, mask_BTS, dropout=None):
    """Plain einsum attention: the oracle for the fast path and the path used for attention dropout."""
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
    scores_BNTS = einsum_f32("btnh,bsnh->bnts", q_BTNH, k_BSNH) * scale
    scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)  # softmax in fp32 whatever the compute dtype
    if dropout is not None:
        probs_BNTS = dropout(probs_BNTS)
    return jnp.einsum("bnts,bsnh->btnh", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)


# Parameters carry logical axis names (embed, qkv, heads, mlp, vocab; `layers` for the scan axis);
# gpt_jax/parallel.py maps them onto mesh axes in one table.
def _dense(features, config: GPTConfig, name, axes, std=None):
    return nn.Dense(
        features,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std or config.initializer_range), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        name=name,
    )


def layer_norm(config: GPTConfig, name):
    # flax computes LayerNorm statistics in at least fp32, even for bf16 inputs.
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def _decode_step_attention(cfg, q_BTNH, k_BTNH, v_BTNH, mask_BTS, cache, cache_index):
    """Attention of one new position (T = 1) over the cache, then the cache update.

    The step attends over the cache as it was, with the new key and value swapped in at their slot,
    and writes them into the cache after. Written the plain way (update, then attend over the
    updated cache) XLA copies every layer's cache on every decode step, two or four times: about a
    fifth of a batch-1 GPT-2 step on CPU (BENCHMARKS.md, Generation). Reading first is not enough by
    itself, since XLA does not know the reads end before the in-place write begins; so each write's
    slot index is made to depend on a value its reads produce (`_after`), and the update is in place.
    """
    dtype = q_BTNH.dtype
    k_old_BNHS, v_old_BNSH = cache["k"], cache["v"]
    S = k_old_BNHS.shape[-1]
    scale = 1.0 / math.sqrt(cfg.head_dim)
    at_S = jnp.arange(S) == cache_index  # the new position's slot
    scores_BNTS = jnp.einsum("btnh,bnhs->bnts", q_BTNH, k_old_BNHS.astype(dtype), preferred_element_type=jnp.float32)
    new_BNT = jnp.einsum("btnh,btnh->bnt", q_BTNH, k_BTNH, preferred_element_type=jnp.float32)
    k_slot = _after(cache_index, scores_BNTS)
    scores_BNTS = jnp.where(at_S[None, None, None, :], new_BNT[..., None], scores_BNTS) * scale
    scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
    p_new_BNT = jnp.sum(jnp.where(at_S[None, None, None, :], probs_BNTS, 0.0), axis=-1)
    probs_old_BNTS = jnp.where(at_S[None, None, None, :], 0.0, probs_BNTS)
    y_BTNH = jnp.einsum("bnts,bnsh->btnh", probs_old_BNTS.astype(dtype), v_old_BNSH.astype(dtype))
    v_slot = _after(cache_index, y_BTNH)
    y_BTNH = y_BTNH + (p_new_BNT.transpose(0, 2, 1)[..., None] * v_BTNH).astype(dtype)
    k_BNHS = jax.lax.dynamic_update_slice(
        k_old_BNHS, k_BTNH.transpose(0, 2, 3, 1).astype(k_old_BNHS.dtype), (0, 0, 0, k_slot))
    v_BNSH = jax.lax.dynamic_update_slice(
        v_old_BNSH, v_BTNH.transpose(0, 2, 1, 3).astype(v_old_BNSH.dtype), (0, 0, v_slot, 0))
    return y_BTNH, {"k": k_BNHS, "v": v_BNSH}


def _write_cache(cache, k_BTNH, v_BTNH, cache_index):
    k_BNHS = jax.lax.dynamic_update_slice(
        cache["k"], k_BTNH.transpose(0, 2, 3, 1).astype(cache["k"].dtype), (0, 0, 0, cache_index))
    v_BNSH = jax.lax.dynamic_update_slice(
        cache["v"], v_BTNH.transpose(0, 2, 1, 3).astype(cache["v"].dtype), (0, 0, cache_index, 0))
    return {"k": k_BNHS, "v": v_BNSH}


def _dense_mask(mask, T):
    """The [B, T, T] causal mask from the uncached pass's mask argument (a dense mask passes through)."""
    if mask is not None and mask.ndim == 3:
        return mask
    q_slot_T = jnp.arange(T)
    valid_BT = jnp.ones((1, T), bool) if mask is None else q_slot_T[None, :] >= mask[:, None]
    return attention_mask_BTS(jnp.broadcast_to(q_slot_T, (valid_BT.shape[0], T)), valid_BT)


def _after(index, x):
    """`index`, made to depend on `x` (one element of x is compared with +inf, which is never
    smaller, and XLA does not fold that away): an op that takes it waits until x is computed."""
    return index + (x.reshape(-1)[0] > jnp.inf).astype(jnp.asarray(index).dtype)


class CausalSelfAttention(nn.Module):
    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, mask, cache, cache_index):
        """mask: [B, T, S] booleans (the dense mask; decoding and the einsum path), or for the
        uncached forward pass [B] left-padding counts or None (no padding), see `GPT`."""
        cfg = self.config
        B, T, D = x_BTD.shape
        N, H = cfg.n_head, cfg.head_dim
        qkv_BT3D = _dense(3 * D, cfg, "c_attn", ("embed", "qkv"))(x_BTD)
        q_BTNH, k_BTNH, v_BTNH = (a.reshape(B, T, N, H) for a in jnp.split(qkv_BT3D, 3, axis=-1))
        use_dropout = cfg.attn_pdrop > 0 and not self.deterministic
        kernel = attention.resolve(cfg, use_dropout)
        if cache is not None and T == 1 and not use_dropout:  # one decode step
            y_BTNH, cache = _decode_step_attention(cfg, q_BTNH, k_BTNH, v_BTNH, mask, cache, cache_index)
        elif cache is not None and kernel != "reference" and isinstance(cache_index, int) and cache_index == 0:
            # A prefill from slot 0: the chunk attends to itself with the fused kernel, then fills the cache.
            pad_B = T - jnp.sum(mask[:, -1, :T], axis=-1)  # the last query sees every real slot of the chunk
            y_BTNH = attention.fused_attention(kernel, q_BTNH, k_BTNH, v_BTNH, pad_B)
            cache = _write_cache(cache, k_BTNH, v_BTNH, cache_index)
        elif cache is not None:  # write this chunk into its slots, then attend over all slots
            cache = _write_cache(cache, k_BTNH, v_BTNH, cache_index)
            k_BNHS, v_BNSH = cache["k"], cache["v"]
            scale = 1.0 / math.sqrt(H)
            scores_BNTS = einsum_f32("btnh,bnhs->bnts", q_BTNH, k_BNHS.astype(q_BTNH.dtype)) * scale
            scores_BNTS = jnp.where(mask[:, None], scores_BNTS, jnp.finfo(jnp.float32).min)
            probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1)
            if use_dropout:
                probs_BNTS = nn.Dropout(cfg.attn_pdrop, deterministic=False)(probs_BNTS)
            y_BTNH = jnp.einsum("bnts,bnsh->btnh", probs_BNTS.astype(q_BTNH.dtype), v_BNSH.astype(q_BTNH.dtype))
        elif kernel == "reference":
            # On CPU the einsum path is the faster one (BENCHMARKS.md); it also serves attention dropout.
            dropout = nn.Dropout(cfg.attn_pdrop, deterministic=self.deterministic) if use_dropout else None
            y_BTNH = reference_attention(q_BTNH, k_BTNH, v_BTNH, _dense_mask(mask, T), dropout)
        else:  # a fused kernel: no dense mask, left padding (if any) as a count per row
            if mask is not None and mask.ndim == 3:  # a left-padded causal mask (generation's window)
                mask = T - jnp.sum(mask[:, -1, :T], axis=-1)  # the last query sees every real key
            y_BTNH = attention.fused_attention(kernel, q_BTNH, k_BTNH, v_BTNH, mask)

        # Residual projections start small, 0.02 / sqrt(2 * n_layer) (GPT-2 paper, section 2.3):
        # each block adds two of them to the residual stream, so its variance stays O(1) with depth.
        std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        y_BTD = _dense(D, cfg, "c_proj", ("heads", "embed"), std)(y_BTNH.reshape(B, T, D))
        return nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)(y_BTD), cache


class MLP(nn.Module):
    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD):
        cfg = self.config
        h_BTF = ACTIVATIONS[cfg.activation](_dense(cfg.mlp_dim, cfg, "c_fc", ("embed", "mlp"))(x_BTD))
        std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        y_BTD = _dense(cfg.n_embd, cfg, "c_proj", ("mlp", "embed"), std)(h_BTF)
        return nn.Dropout(cfg.resid_pdrop, deterministic=self.deterministic)(y_BTD)


class Block(nn.Module):
    """One decoder block; the signature (carry, *xs) -> (carry, ys) is what nn.scan expects."""

    config: GPTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD, mask, cache, cache_index):
        cfg = self.config
        self.sow("intermediates", "block_input", x_BTD)
        attn = CausalSelfAttention(cfg, self.deterministic, name="attn")
        mlp = MLP(cfg, self.deterministic, name="mlp")
        ln_1, ln_2 = layer_norm(cfg, "ln_1"), layer_norm(cfg, "ln_2")
        if cfg.norm == "pre":  # GPT-2
            a_BTD, cache = attn(ln_1(x_BTD), mask, cache, cache_index)
            x_BTD = x_BTD + a_BTD
            x_BTD = x_BTD + mlp(ln_2(x_BTD))
        else:  # GPT-1: LayerNorm after each residual add
            a_BTD, cache = attn(x_BTD, mask, cache, cache_index)
            x_BTD = ln_1(x_BTD + a_BTD)
            x_BTD = ln_2(x_BTD + mlp(x_BTD))
        return x_BTD, cache


class GPT(nn.Module):
    """GPT-1 / GPT-2 language model.

    `apply(params, tokens_BT)` returns float32 logits [B, T, V]. With `cache=` (from `init_cache`)
    or `return_hidden=True` it returns a `GPTOutput(logits, hidden, cache)` instead.

    attention_mask: [B, S] booleans over key positions (S = T, or the cache length with a cache);
        False marks padding. position_ids: [B, T]; default cache_index + arange(T). Left-padded
        batches pass both, with positions counted from each row's first real token.
    """

    config: GPTConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        *,
        position_ids=None,
        attention_mask=None,
        cache: Optional[dict] = None,
        cache_index: Any = 0,
        deterministic: bool = True,
        return_hidden: bool = False,
    ):
        cfg = self.config
        B, T = tokens_BT.shape
        S = T if cache is None else cache["k"].shape[-1]
        dtype = jnp.dtype(cfg.dtype)
        q_slot_BT = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
        if position_ids is None:
            position_ids = q_slot_BT
        kernel = attention.resolve(cfg, cfg.attn_pdrop > 0 and not deterministic)
        if cache is None and kernel != "reference":
            # Fused kernels take no dense mask: attention_mask must be left padding, given as counts.
            mask = None if attention_mask is None else S - jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
        else:
            key_valid_BS = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
            mask = attention_mask_BTS(q_slot_BT, key_valid_BS)

        # The embedding has padded_vocab_size rows; the padded rows are never looked up, and their
        # logits are masked below, so they take no part in the loss, sampling or scoring.
        wte = nn.Embed(cfg.padded_vocab_size, cfg.n_embd, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                                                  ("vocab", "embed")), name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                       embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                       name="wpe")  # std 0.01 as in OpenAI's code
        x_BTD = wte(tokens_BT) + wpe(position_ids)
        x_BTD = nn.Dropout(cfg.embd_pdrop, deterministic=deterministic)(x_BTD)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0, nn.broadcast),
            length=cfg.n_layer,
            unroll=1 if cfg.scan_layers else cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BTD, cache = blocks(cfg, deterministic, name="h")(x_BTD, mask, cache, cache_index)

        if cfg.norm == "pre":
            x_BTD = layer_norm(cfg, "ln_f")(x_BTD)
        # Output layer tied to the token embedding (GPT-1 section 3.1). Logits come out in fp32 for the
        # loss; with bf16 compute the matmul and its two backward matmuls are bf16 (einsum_f32).
        embedding_VD = nn.unbox(wte.embedding).astype(dtype)
        logits_BTV = einsum_f32("btd,vd->btv", x_BTD, embedding_VD)
        logits_BTV = mask_padded_vocab(cfg, logits_BTV)
        if cache is None and not return_hidden:
            return logits_BTV
        return GPTOutput(logits_BTV, x_BTD, cache)


def mask_padded_vocab(config: GPTConfig, logits_BTV):
    """-inf for the logits of padded vocabulary rows (ids >= vocab_size), so they never win."""
    if config.padded_vocab_size == config.vocab_size:
        return logits_BTV
    real_V = jnp.arange(logits_BTV.shape[-1]) < config.vocab_size
    return jnp.where(real_V, logits_BTV, -jnp.inf)


def lm_loss(logits_BTV, targets_BT, weights_BT=None):
    """Mean next-token cross-entropy in fp32; `weights_BT` (0/1) masks positions out."""
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    if weights_BT is None:
        return losses_BT.mean()
    weights_BT = weights_BT.astype(jnp.float32)
    return (losses_BT * weights_BT).sum() / jnp.maximum(weights_BT.sum(), 1.0)


def init_params(config: GPTConfig, rng, batch_shape=(1, 1)):
    """Initialise parameters (a plain nested dict of arrays)."""
    return nn.unbox(GPT(config).init(rng, jnp.zeros(batch_shape, jnp.int32))["params"])


def logical_axes(config: GPTConfig):
    """The logical axis names of every parameter (a tree of PartitionSpecs), from shapes alone."""
    boxed = jax.eval_shape(lambda: GPT(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    return nn.get_partition_spec(boxed)


def param_count(config: GPTConfig) -> int:
    """Number of parameters, from shapes alone (jax.eval_shape allocates nothing)."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
