"""Jitted sampling with a KV cache: one prefill of the (left-padded) prompts, then a decode loop.

The whole of `generate` is one compiled function: the prompts are prefilled into a preallocated
cache in one forward pass, then a `lax.while_loop` adds one token per iteration and stops early
when every sequence has produced a stop token. Past the model's context (n_positions), a second
loop conditions each token on the last n_positions tokens, as nanoGPT's sample.py crops: with
learned positions every cached key moves when the window slides, so each of those tokens is a
forward pass over the whole window. Prompt length, batch size and `max_new_tokens` are rounded up
to buckets (powers of two), and the sampling settings (temperature, top-k, top-p, seed) are traced
values, so new prompts and settings in the same bucket reuse the compiled function.
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

from gpt_jax.config import SAMPLING_RANGES, GPTConfig
from gpt_jax.errors import in_range, range_text
from gpt_jax.attention import target_platform
from gpt_jax.model import Block, layer_norm, attention_mask_BTS, mask_padded_vocab


class GenerateError(ValueError):
    """Bad prompts or sampling settings; raised before anything is compiled."""


_on_token = [None]  # the streaming callback of the call in progress (set by `generate`)


def _emit(i, tok_B):
    if _on_token[0] is not None:
        _on_token[0](int(i), np.asarray(tok_B))


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def top_k_bucket(top_k, vocab_size: int) -> int:
    """The static width of `lax.top_k` for a top-k setting: 0 when top-k is off, else a power of two
    (at least 64, at most the vocabulary), so nearby k share one compiled program."""
    return min(_bucket(top_k, 64), vocab_size) if top_k else 0


def _nucleus_cutoff(sorted_BK, top_p):
    """The smallest logit that top-p keeps among descending logits (-inf where already filtered):
    the best tokens until the mass of those before them reaches top_p; at least one is kept."""
    probs_BK = jax.nn.softmax(sorted_BK, axis=-1)
    before_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK  # mass of strictly better tokens
    keep_B = jnp.sum((before_BK < top_p) & (sorted_BK > -jnp.inf), axis=-1)
    return jnp.take_along_axis(sorted_BK, (jnp.maximum(keep_B, 1) - 1)[:, None], axis=-1)


def filter_logits(logits_BV, temperature, top_k, top_p, k_bucket: int):
    """Temperature, then top-k, then top-p (1 = off) on the renormalised top-k; filtered entries
    become -inf. `k_bucket` (static, from `top_k_bucket`) is 0 when top-k is off; else top_k <= k_bucket
    and only the k_bucket best logits are found (`lax.top_k`) and sorted, not the whole vocabulary."""
    logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
    if k_bucket:
        best_BK, _ = jax.lax.top_k(logits_BV, k_bucket)  # descending
        best_BK = jnp.where(jnp.arange(k_bucket)[None, :] < top_k, best_BK, -jnp.inf)
        cutoff_B1 = _nucleus_cutoff(best_BK, top_p)
    else:  # top-p alone sorts the vocabulary, and only when it is on (one program either way)
        cutoff_B1 = jax.lax.cond(top_p < 1.0, lambda x: _nucleus_cutoff(-jnp.sort(-x, axis=-1), top_p),
                                 lambda x: jnp.full((x.shape[0], 1), -jnp.inf, x.dtype), logits_BV)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


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
        x_BTD = layer_norm(config, None).apply({"params": params["ln_f"]}, x_BTD)
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


@functools.partial(jax.jit, static_argnames=("config", "max_new_bucket", "greedy", "k_bucket", "stream"))
def _generate(params, layers, tokens_BP, lengths_B, max_new, rng, temperature, top_k, top_p, stop_K, *,
              config: GPTConfig, max_new_bucket: int, greedy: bool, k_bucket: int = 0, stream: bool = False):
    B, P = tokens_BP.shape
    C = config.n_positions
    S = P + min(max_new_bucket, C)  # cache slots: the prompts', then new tokens until the window is full
    dtype = jnp.dtype(config.dtype)
    pad_B = P - lengths_B
    slot_P = jnp.arange(P)
    valid_BP = slot_P[None, :] >= pad_B[:, None]
    key_valid_BS = jnp.concatenate([valid_BP, jnp.ones((B, S - P), bool)], axis=1)
    N, H = config.n_head, config.head_dim
    caches = [{"k": jnp.zeros((B, N, H, S), dtype), "v": jnp.zeros((B, N, S, H), dtype)} for _ in layers]
    logits_BPV, caches = _forward(config, params, layers, tokens_BP, jnp.maximum(slot_P[None, :] - pad_B[:, None], 0),
                                  key_valid_BS, caches, 0)
    # Every sequence so far: C empty slots, the left-padded prompts, then the new tokens (token i at C + P + i).
    seq_BW = jnp.concatenate([jnp.zeros((B, C), jnp.int32), tokens_BP, jnp.zeros((B, max_new_bucket), jnp.int32)], 1)

    def take(i, logits_BV, done_B, seq_BW, n_B):
        """Sample token i from its logits and record it."""
        if greedy:
            tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        else:
            filtered = filter_logits(logits_BV, temperature, top_k, top_p, k_bucket)
            tok_B = jax.random.categorical(jax.random.fold_in(rng, i), filtered, axis=-1).astype(jnp.int32)
        tok_B = jnp.where(done_B, 0, tok_B)
        if stream:  # hand each step's tokens to the host as they are made
            io_callback(_emit, None, i, tok_B, ordered=True)
        seq_BW = jax.lax.dynamic_update_slice_in_dim(seq_BW, tok_B[:, None], C + P + i, axis=1)
        n_B = jnp.where(done_B, n_B, i + 1)
        done_B = done_B | jnp.any(tok_B[:, None] == stop_K[None, :], axis=-1)
        return tok_B, done_B, seq_BW, n_B

    def running(i, done_B):
        return (i < max_new) & ~jnp.all(done_B)

    # Inside the window: one decode step per token over the KV cache, while every context fits in C.
    def decode(carry):
        i, logits_BV, caches, done_B, seq_BW, n_B = carry
        tok_B, done_B, seq_BW, n_B = take(i, logits_BV, done_B, seq_BW, n_B)
        logits_B1V, caches = _forward(config, params, layers, tok_B[:, None], (lengths_B + i)[:, None], key_valid_BS,
                                      caches, P + i)
        return i + 1, logits_B1V[:, 0], caches, done_B, seq_BW, n_B

    longest = jnp.max(lengths_B)
    carry = (jnp.int32(0), logits_BPV[:, -1], caches, jnp.zeros(B, bool), seq_BW, jnp.zeros(B, jnp.int32))
    i, _, _, done_B, seq_BW, n_B = jax.lax.while_loop(lambda c: running(c[0], c[3]) & (longest + c[0] < C),
                                                      decode, carry)

    # Past the window: learned positions shift with the window, so each token is a forward pass over
    # the last C tokens of its sequence (right-aligned; shorter rows left-padded), as nanoGPT crops.
    def window(carry):
        i, done_B, seq_BW, n_B = carry
        window_BC = jax.lax.dynamic_slice_in_dim(seq_BW, P + i, C, axis=1)
        pad_B = C - jnp.minimum(lengths_B + i, C)
        valid_BC = jnp.arange(C)[None, :] >= pad_B[:, None]
        pos_BC = jnp.maximum(jnp.arange(C)[None, :] - pad_B[:, None], 0)
        logits_B1V, _ = _forward(config, params, layers, window_BC, pos_BC, valid_BC, [None] * len(layers), 0)
        return i + 1, *take(i, logits_B1V[:, 0], done_B, seq_BW, n_B)[1:]

    _, _, seq_BW, n_B = jax.lax.while_loop(lambda c: running(c[0], c[1]), window, (i, done_B, seq_BW, n_B))
    return seq_BW[:, C + P:], n_B


def trace(config: GPTConfig, params, batch: int, prompt_len: int, max_new_tokens: int, sharding=None,
          top_k: int | None = 200):
    """`generate`'s one compiled function traced for `batch` prompts of `prompt_len` tokens, from shapes:
    `params` may be `jax.ShapeDtypeStruct`s, and every input is placed by `sharding` (one device, perhaps
    of another platform). Shapes are bucketed as `generate` buckets them. Lower and compile the result to
    build the program without running it (`gpt_jax.aot`)."""
    def shaped(x):
        return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x) if not hasattr(x, "dtype") else x.dtype,
                                    sharding=sharding)

    params = jax.tree.map(shaped, nn.unbox(params))
    layers = jax.tree.map(shaped, jax.eval_shape(split_layers, params))
    B, P = _bucket(batch), _bucket(prompt_len, 8)
    scalars = (np.int32(max_new_tokens), jax.eval_shape(lambda: jax.random.key(0)), np.float32(1.0),
               np.int32(top_k or 0), np.float32(1.0), np.zeros(1, np.int32))
    args = (params, layers, jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=sharding),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=sharding), *map(shaped, scalars))
    return _generate.trace(*args, config=config, max_new_bucket=_bucket(max_new_tokens), greedy=False,
                           k_bucket=top_k_bucket(top_k, config.vocab_size))


_MEANING = {"temperature": " (0 means greedy)", "top_k": " (0 or None means off)"}


def validate(config: GPTConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
             top_k, top_p) -> None:
    if not prompts:
        raise GenerateError("no prompts given: pass a list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerateError(f"prompt {i} is empty: give at least one token (e.g. the end-of-text id)")
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise GenerateError(f"prompt {i} holds token id {bad[0]} outside the vocabulary [0, {config.vocab_size})")
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    for name, value in settings.items():
        if value is not None and not in_range(value, SAMPLING_RANGES[name]):
            raise GenerateError(f"{name} must be {range_text(SAMPLING_RANGES[name])}{_MEANING.get(name, '')}, "
                                f"got {value}")


def generate(config: GPTConfig, params, prompts, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             stop_tokens: Sequence[int] = (), rng=None, lengths=None, on_token=None):
    """Sample `max_new_tokens` after each prompt.

    prompts: a list of token-id lists (any lengths), or a left-padded int array [B, P] with `lengths`.
    Any `max_new_tokens` up to 1,000,000 works (config.SAMPLING_RANGES bounds it and the settings): once a
    sequence is longer than the context (`config.n_positions`), each new token is conditioned on its last
    n_positions tokens (a prompt longer than that is cut to its end the same way); those tokens cost a
    forward pass over the whole window each.
    Returns (tokens, lengths): a list with each prompt's new tokens (up to and including a stop
    token) and their counts. `greedy=True` (or temperature=0) takes the argmax. `on_token(i, tokens)`,
    if given, is called on the host with step i's token for every batch row while decoding runs
    (rows that have stopped get 0). The first call with new params keeps a decode copy of their
    block weights while they are alive (`decode_layers`; `clear_decode_cache()` frees it).
    `params` may be plain arrays or the logically partitioned boxes that `GPT(config).init` returns.
    """
    params = nn.unbox(params)
    if lengths is not None:
        arr = np.asarray(prompts)
        prompts = [list(row[arr.shape[1] - int(n):]) for row, n in zip(arr, lengths)]
    prompts = [list(map(int, p)) for p in prompts]
    validate(config, prompts, max_new_tokens, temperature, top_k, top_p)
    greedy = greedy or temperature == 0
    prompts = [p[-config.n_positions:] for p in prompts]  # the model only ever sees the last n_positions
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
                                k_bucket=0 if greedy else top_k_bucket(top_k, config.vocab_size),
                                stream=on_token is not None)
        out, counts = np.asarray(out), np.asarray(counts)
    finally:
        _on_token[0] = None
    return [out[i, : counts[i]].tolist() for i in range(n)], counts[:n].tolist()
