"""Jitted sampling with a KV cache: one prefill of the (left-padded) prompts, then a decode loop.

The whole of `generate` is one compiled function: the prompts are prefilled into a preallocated
cache in one forward pass, then a `lax.while_loop` adds one token per iteration and stops early
when every sequence has produced a stop token. Prompt length, batch size and `max_new_tokens` are
rounded up to buckets (powers of two), and the sampling settings (temperature, top-k, top-p, seed)
are traced values, so new prompts and settings in the same bucket reuse the compiled function.
"""

from __future__ import annotations

import functools
import weakref
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from gpt_jax.config import GPTConfig
from gpt_jax.attention import target_platform
from gpt_jax.model import Block, _layer_norm, attention_mask_BTS, mask_padded_vocab


class GenerateError(ValueError):
    """Bad prompts or sampling settings; raised before anything is compiled."""


_on_token = [None]  # the streaming callback of the call in progress (set by `generate`)


def _emit(i, tok_B):
    if _on_token[0] is not None:
        _on_token[0](int(i), np.asarray(tok_B))


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def filter_logits(logits_BV, temperature, top_k, top_p):
    """Temperature, then top-k (0 = off), then top-p (1 = off); filtered entries become -inf."""
    logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)

    def apply_filters(logits_BV):
        V = logits_BV.shape[-1]
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
        rank_V = jnp.arange(V)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        sorted_BV = jnp.where(rank_V[None, :] < k, sorted_BV, -jnp.inf)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly better tokens
        keep_B = jnp.sum((before_BV < top_p) & (rank_V[None, :] < k), axis=-1)  # at least one is kept
        cutoff_B = jnp.take_along_axis(sorted_BV, (keep_B - 1)[:, None], axis=-1)
        return jnp.where(logits_BV < cutoff_B, -jnp.inf, logits_BV)

    # The sort runs only when a filter is on; either way it is one compiled program.
    return jax.lax.cond((top_k > 0) | (top_p < 1.0), apply_filters, lambda x: x, logits_BV)


def _forward(config: GPTConfig, params, layers, tokens_BT, pos_BT, key_valid_BS, caches, index):
    """The model's forward pass over per-layer parameters and caches, as decoding wants it; returns
    the logits of the last position only, [B, 1, V], and the updated caches.

    `layers` holds each block's parameters as separate arrays and `caches` each block's own KV
    buffers, so a decode step reads its weights where they lie and updates each cache in place
    (slicing a layer out of the stacked [L, ...] arrays inside the loop copies it on every step).
    Each layer is the model's own `Block`; tests check this path against the full forward pass.
    """
    dtype = jnp.dtype(config.dtype)
    B, T = tokens_BT.shape
    embedding_VD = params["wte"]["embedding"]
    x_BTD = (embedding_VD[tokens_BT] + params["wpe"]["embedding"][pos_BT]).astype(dtype)
    mask_BTS = attention_mask_BTS(jnp.broadcast_to(index + jnp.arange(T), (B, T)), key_valid_BS)
    new_caches = []
    with nn.intercept_methods(functools.partial(_transposed_dense, platform=target_platform(config))):
        for layer, cache in zip(layers, caches):
            x_BTD, cache = Block(config).apply({"params": layer}, x_BTD, mask_BTS, cache, index)
            new_caches.append(cache)
    x_BTD = x_BTD[:, -1:]  # only the last position's logits are needed (prefill skips T - 1 of them)
    if config.norm == "pre":
        x_BTD = _layer_norm(config, None).apply({"params": params["ln_f"]}, x_BTD)
    logits_BV = _matmul_out_in(x_BTD[:, 0], embedding_VD.astype(dtype), target_platform(config))
    return mask_padded_vocab(config, logits_BV[:, None]), new_caches


def _matmul_out_in(x_MK, w_NK, platform: str):
    """x @ w.T for a weight stored [out, in]; for a few rows, computed as (w @ x.T).T.

    For the few rows of a decode step, XLA's CPU matmuls read an [out, in] weight on the left about
    1.5 to 2x as fast as any layout on the right (BENCHMARKS.md, Generation). The barrier keeps XLA
    from folding the transpose back into a right-hand-side product. For many rows (a prefill) the
    transpose of the output costs more than it saves, and the plain product is as fast as any; on
    accelerators the matmul library takes either operand transposed, so the plain product is used."""
    if x_MK.shape[0] > 32 or platform != "cpu":
        return jnp.einsum("mk,nk->mn", x_MK, w_NK, preferred_element_type=jnp.float32)
    y_NM = jax.lax.optimization_barrier(jnp.einsum("nk,mk->nm", w_NK, x_MK, preferred_element_type=jnp.float32))
    return y_NM.T


def _transposed_dense(next_fun, args, kwargs, context, platform="cpu"):
    """A block's Dense layers from kernels stored [out, in] (see `split_layers`)."""
    module = context.module
    if not (isinstance(module, nn.Dense) and context.method_name == "__call__"
            and module.has_variable("params", "kernel_T")):
        return next_fun(*args, **kwargs)
    x = args[0].astype(module.dtype)
    kernel_NK = module.get_variable("params", "kernel_T").astype(module.dtype)
    y = _matmul_out_in(x.reshape(-1, x.shape[-1]), kernel_NK, platform).astype(module.dtype)
    y = y.reshape(*x.shape[:-1], kernel_NK.shape[0])
    bias = module.get_variable("params", "bias").astype(module.dtype)
    return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def split_layers(params):
    """The stacked block parameters as a list of per-layer trees (what `_generate` takes), with every
    Dense kernel stored transposed, [out, in], for `_matmul_out_in`."""
    n = jax.tree.leaves(params["h"])[0].shape[0]

    def transpose_kernels(tree):
        if isinstance(tree, dict) and "kernel" in tree:
            return {"kernel_T": tree["kernel"].T, **{k: v for k, v in tree.items() if k != "kernel"}}
        return {k: transpose_kernels(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return [transpose_kernels(jax.tree.map(lambda a, i=i: a[i], params["h"])) for i in range(n)]


_split_cache: dict = {}  # the decode layout of the most recent params: {"refs": weakrefs to its leaves, "layers": ...}


def clear_decode_cache() -> None:
    """Drop the per-layer decode copy of the weights that `generate` keeps for the last params used."""
    _split_cache.clear()


def decode_layers(params):
    """`split_layers(params)`, kept for the next call with the same arrays.

    Splitting costs about 80 ms for GPT-2 124M on a 2-core CPU, a third of a 128-token prefill, so
    `generate` reuses the split while the same parameter arrays are alive. The copy is dropped as
    soon as those arrays are freed, by the next call with other params, or by `clear_decode_cache`.
    It holds as much memory as the block weights."""
    leaves = jax.tree.leaves(params)
    cached = _split_cache.get("refs")
    if cached is not None and len(cached) == len(leaves) and all(
            r() is leaf and not getattr(leaf, "is_deleted", lambda: False)() for r, leaf in zip(cached, leaves)):
        return _split_cache["layers"]
    _split_cache.clear()
    layers = split_layers(params)
    try:
        refs = [weakref.ref(leaf, lambda _: _split_cache.clear()) for leaf in leaves]
    except TypeError:  # leaves that cannot be weakly referenced are not cached
        return layers
    _split_cache.update(refs=refs, layers=layers)
    return layers


@functools.partial(jax.jit, static_argnames=("config", "max_new_bucket", "greedy", "stream"))
def _generate(params, layers, tokens_BP, lengths_B, max_new, rng, temperature, top_k, top_p, stop_K, *,
              config: GPTConfig, max_new_bucket: int, greedy: bool, stream: bool = False):
    B, P = tokens_BP.shape
    S = P + max_new_bucket
    dtype = jnp.dtype(config.dtype)
    pad_B = P - lengths_B
    slot_P = jnp.arange(P)
    valid_BP = slot_P[None, :] >= pad_B[:, None]
    key_valid_BS = jnp.concatenate([valid_BP, jnp.ones((B, max_new_bucket), bool)], axis=1)
    N, H = config.n_head, config.head_dim
    caches = [{"k": jnp.zeros((B, N, H, S), dtype), "v": jnp.zeros((B, N, S, H), dtype)} for _ in layers]
    logits_BPV, caches = _forward(config, params, layers, tokens_BP, jnp.maximum(slot_P[None, :] - pad_B[:, None], 0),
                                  key_valid_BS, caches, 0)

    def cond(carry):
        i, _, _, done_B, _, _ = carry
        return (i < max_new) & ~jnp.all(done_B)

    def body(carry):
        i, logits_BV, caches, done_B, out_BN, n_B = carry
        if greedy:
            tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        else:
            filtered = filter_logits(logits_BV, temperature, top_k, top_p)
            tok_B = jax.random.categorical(jax.random.fold_in(rng, i), filtered, axis=-1).astype(jnp.int32)
        tok_B = jnp.where(done_B, 0, tok_B)
        if stream:  # hand each step's tokens to the host as they are made
            io_callback(_emit, None, i, tok_B, ordered=True)
        out_BN = out_BN.at[:, i].set(tok_B)
        n_B = jnp.where(done_B, n_B, i + 1)
        done_B = done_B | jnp.any(tok_B[:, None] == stop_K[None, :], axis=-1)
        logits_B1V, caches = _forward(config, params, layers, tok_B[:, None], (lengths_B + i)[:, None], key_valid_BS,
                                      caches, P + i)
        return i + 1, logits_B1V[:, 0], caches, done_B, out_BN, n_B

    carry = (jnp.int32(0), logits_BPV[:, -1], caches, jnp.zeros(B, bool),
             jnp.zeros((B, max_new_bucket), jnp.int32), jnp.zeros(B, jnp.int32))
    _, _, _, _, out_BN, n_B = jax.lax.while_loop(cond, body, carry)
    return out_BN, n_B


def validate(config: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
             top_k, top_p) -> None:
    if not prompts:
        raise GenerateError("no prompts given: pass a list of token-id lists")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text id)")
        if len(p) + max_new_tokens > config.n_positions:
            raise GenerateError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                                f"{len(p) + max_new_tokens} positions, over the model's context of "
                                f"{config.n_positions}: shorten the prompt or ask for fewer tokens")
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise GenerateError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    if temperature < 0:
        raise GenerateError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise GenerateError(f"top_k must be >= 0 (0 or None means off), got {top_k}")


def generate(config: GPTConfig, params, prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             stop_tokens: Sequence[int] = (), rng=None, lengths=None, on_token=None):
    """Sample `max_new_tokens` after each prompt.

    prompts: a list of token-id lists (any lengths), or a left-padded int array [B, P] with `lengths`.
    Returns (tokens, lengths): a list with each prompt's new tokens (up to and including a stop
    token) and their counts. `greedy=True` (or temperature=0) takes the argmax. `on_token(i, tokens)`,
    if given, is called on the host with step i's token for every batch row while decoding runs
    (rows that have stopped get 0). The first call with new params keeps a decode copy of their
    block weights while they are alive (`decode_layers`; `clear_decode_cache()` frees it).
    """
    if lengths is not None:
        arr = np.asarray(prompts)
        prompts = [list(row[arr.shape[1] - int(n):]) for row, n in zip(arr, lengths)]
    prompts = [list(map(int, p)) for p in prompts]
    validate(config, prompts, max_new_tokens, temperature, top_k, top_p)
    greedy = greedy or temperature == 0
    n = len(prompts)
    B, P = _bucket(n), _bucket(max(map(len, prompts)), 8)
    tokens = np.zeros((B, P), np.int32)
    lens = np.ones(B, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = p
        lens[i] = len(p)
    stop = np.asarray(list(stop_tokens) or [-1], np.int32)
    stop = np.pad(stop, (0, _bucket(len(stop)) - len(stop)), constant_values=-1)
    rng = jax.random.key(0) if rng is None else (jax.random.key(rng) if isinstance(rng, int) else rng)
    _on_token[0] = on_token
    try:
        out, counts = _generate(params, decode_layers(params), tokens, lens, np.int32(max_new_tokens), rng, np.float32(temperature),
                                np.int32(top_k or 0), np.float32(1.0 if top_p is None else top_p), stop,
                                config=config, max_new_bucket=_bucket(max_new_tokens), greedy=greedy,
                                stream=on_token is not None)
        out, counts = np.asarray(out), np.asarray(counts)
    finally:
        _on_token[0] = None
    return [out[i, : counts[i]].tolist() for i in range(n)], counts[:n].tolist()
