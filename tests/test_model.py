import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import data_path
from gpt_jax import GPT, GPTConfig, init_cache, init_params, lm_loss, load_pretrained, save_pretrained

TINY = GPTConfig.preset("gpt2-tiny", n_layer=3, n_positions=32, vocab_size=97)
TINY_POST = dataclasses.replace(TINY, norm="post")


def tokens(shape, seed=0, vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def randomize(params, seed=1, scale=0.3):
    """Random weights everywhere (LayerNorm included) so no test passes on an identity-like init."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [x + scale * jax.random.normal(k, x.shape) * (1.0 if x.ndim > 1 and x.shape[-1] > 1 else 0.3)
           for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, out)


@pytest.fixture(scope="module", params=["pre", "post"])
def setup(request):
    cfg = TINY if request.param == "pre" else TINY_POST
    return cfg, randomize(init_params(cfg, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
    return jax.jit(lambda p, x, kw: GPT(cfg).apply({"params": p}, x, **kw))


def logits_of(cfg, params, x, **kw):
    return _jitted_apply(cfg)(params, x, kw)


def test_output_shape_and_dtype(setup):
    cfg, params = setup
    out = logits_of(cfg, params, tokens((2, 11)))
    assert out.shape == (2, 11, cfg.vocab_size) and out.dtype == jnp.float32


def test_causality_gradient_to_later_positions_is_exactly_zero(setup):
    # The input at position j is wte[x_j] + wpe[j]; wpe row j is used only at position j, so
    # d logits[t] / d wpe[j] is the gradient with respect to the embedding of position j.
    cfg, params = setup
    x = tokens((1, 12))
    for t in (0, 5, 11):
        def out_t(wpe):
            p = {**params, "wpe": {"embedding": wpe}}
            return logits_of(cfg, p, x)[0, t].sum()

        g = jax.jit(jax.grad(out_t))(params["wpe"]["embedding"])
        assert jnp.all(g[t + 1:12] == 0.0), f"position {t} depends on later positions"
        assert jnp.abs(g[: t + 1]).sum() > 0, "gradient to earlier positions should not vanish"


def test_jit_equals_eager(setup):
    cfg, params = setup
    x = tokens((2, 9))
    eager = GPT(cfg).apply({"params": params}, x)
    jitted = logits_of(cfg, params, x)
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_fast_attention_equals_reference(setup):
    cfg, params = setup
    x = tokens((2, 16))
    mask = jnp.arange(16)[None, :] >= jnp.array([[0], [5]])  # second row left-padded by 5
    ref = logits_of(dataclasses.replace(cfg, attention="reference"), params, x, attention_mask=mask)
    fast = logits_of(dataclasses.replace(cfg, attention="xla"), params, x, attention_mask=mask)
    np.testing.assert_allclose(ref[0], fast[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ref[1, 5:], fast[1, 5:], atol=2e-5, rtol=1e-5)  # padding queries are unspecified
    assert jnp.all(jnp.isfinite(fast))


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_scanned_equals_unrolled_and_remat_is_exact(setup):
    cfg, params = setup
    x = tokens((2, 10))

    def loss(c, p):
        return lm_loss(logits_of(c, p, x)[:, :-1], x[:, 1:])

    base_l, base_g = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="dots"),
                    dict(scan_layers=False, remat="full")):
        c = dataclasses.replace(cfg, **variant)
        l, g = jax.jit(jax.value_and_grad(lambda p: loss(c, p)))(params)
        np.testing.assert_allclose(l, base_l, rtol=1e-6, err_msg=str(variant))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(base_g)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=str(variant))


def test_unrolled_has_same_parameter_tree():
    a = jax.eval_shape(lambda: init_params(TINY, jax.random.key(0)))
    b = jax.eval_shape(lambda: init_params(dataclasses.replace(TINY, scan_layers=False), jax.random.key(0)))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert a["h"]["attn"]["c_attn"]["kernel"].shape == (TINY.n_layer, TINY.n_embd, 3 * TINY.n_embd)


def test_kv_cache_prefill_then_steps_equals_full_forward(setup):
    cfg, params = setup
    x = tokens((2, 14))
    full = logits_of(cfg, params, x)
    model = GPT(cfg)
    cache = init_cache(cfg, 2, 20)
    out = logits_of(cfg, params, x[:, :6], cache=cache, cache_index=0)
    pieces = [out.logits]
    cache = out.cache
    step = jax.jit(lambda p, t, c, i: model.apply({"params": p}, t, cache=c, cache_index=i))
    for i in range(6, 14):
        out = step(params, x[:, i:i + 1], cache, i)
        pieces.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone(setup):
    cfg, params = setup
    a, b = tokens((1, 10), seed=3)[0], tokens((1, 6), seed=4)[0]
    pad = 4
    batch = jnp.stack([a, jnp.concatenate([jnp.zeros(pad, a.dtype), b])])
    mask = jnp.stack([jnp.ones(10, bool), jnp.arange(10) >= pad])
    pos = jnp.stack([jnp.arange(10), jnp.maximum(jnp.arange(10) - pad, 0)])
    out = logits_of(cfg, params, batch, attention_mask=mask, position_ids=pos)
    np.testing.assert_allclose(out[0], logits_of(cfg, params, a[None])[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out[1, pad:], logits_of(cfg, params, b[None])[0], atol=2e-5, rtol=1e-5)
    assert jnp.all(jnp.isfinite(out))  # padding rows stay finite


def test_bf16_compute_close_to_fp32(setup):
    cfg, params = setup
    x = tokens((2, 16))
    f32 = logits_of(cfg, params, x)
    bf16 = logits_of(dataclasses.replace(cfg, dtype="bfloat16"), params, x)
    assert bf16.dtype == jnp.float32  # logits (and so the loss) stay fp32
    rel = jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32)
    assert rel < 3e-2, rel
    l32 = lm_loss(f32[:, :-1], x[:, 1:])
    l16 = lm_loss(bf16[:, :-1], x[:, 1:])
    assert abs(l16 - l32) / l32 < 1e-2


def test_dropout_is_active_in_training_and_reproducible():
    cfg = dataclasses.replace(TINY, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    params = init_params(cfg, jax.random.key(0))
    x = tokens((2, 8))
    train_apply = jax.jit(lambda p, x, key: GPT(cfg).apply({"params": p}, x, deterministic=False,
                                                            rngs={"dropout": key}))
    run = lambda seed: train_apply(params, x, jax.random.key(seed))
    eval_out = logits_of(cfg, params, x)
    assert not jnp.allclose(run(0), eval_out)
    assert not jnp.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))


def test_init_follows_gpt2_scheme():
    cfg = GPTConfig.preset("gpt2", n_layer=4, n_embd=256, n_head=4, vocab_size=4096)
    p = init_params(cfg, jax.random.key(0))
    assert abs(float(jnp.std(p["wte"]["embedding"])) - 0.02) < 1e-3
    resid = float(jnp.std(p["h"]["mlp"]["c_proj"]["kernel"]))
    assert abs(resid - 0.02 / np.sqrt(2 * cfg.n_layer)) < 1e-3
    assert float(jnp.abs(p["h"]["attn"]["c_attn"]["bias"]).max()) == 0.0
    assert jnp.all(p["ln_f"]["scale"] == 1.0)


def test_intermediates_expose_block_inputs(setup):
    cfg, params = setup
    x = tokens((1, 5))
    _, state = GPT(cfg).apply({"params": params}, x, mutable=["intermediates"])
    block_inputs = state["intermediates"]["h"]["block_input"][0]
    assert block_inputs.shape == (cfg.n_layer, 1, 5, cfg.n_embd)
    emb = params["wte"]["embedding"][x] + params["wpe"]["embedding"][None, :5]
    np.testing.assert_allclose(block_inputs[0], emb, atol=1e-6)


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_padded_vocabulary_changes_nothing_but_shapes(setup):
    """Padding the embedding to a multiple of 64 rows: the real logits, loss and gradients of the real
    rows equal the unpadded model's; padded logits are -inf and padded rows get no gradient."""
    cfg, params = setup
    padded_cfg = dataclasses.replace(cfg, pad_vocab_multiple=64)
    assert padded_cfg.padded_vocab_size == 128
    wte = params["wte"]["embedding"]
    padded = {**params, "wte": {"embedding": jnp.concatenate([wte, jnp.ones((128 - 97, wte.shape[1]))])}}
    x = tokens((2, 12))

    def loss(c, p):
        return lm_loss(GPT(c).apply({"params": p}, x[:, :-1]), x[:, 1:])

    l0, g0 = jax.value_and_grad(lambda p: loss(cfg, p))(params)
    l1, g1 = jax.value_and_grad(lambda p: loss(padded_cfg, p))(padded)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(g1["wte"]["embedding"][:97], g0["wte"]["embedding"], atol=1e-6, rtol=1e-5)
    assert jnp.all(g1["wte"]["embedding"][97:] == 0)
    logits = logits_of(padded_cfg, padded, x)
    np.testing.assert_allclose(logits[..., :97], logits_of(cfg, params, x), atol=1e-5, rtol=1e-5)
    assert logits.shape[-1] == 128 and jnp.all(logits[..., 97:] == -jnp.inf)


def test_bf16_softmax_backward_dots_take_bf16_operands(setup):
    """With bf16 compute, the logits and attention-score matmuls and their gradients have bf16 operands
    (the loss stays float32); only the float32 loss reads float32 logits."""
    cfg, params = setup
    cfg = dataclasses.replace(cfg, dtype="bfloat16", attention="reference")
    x = tokens((2, 12))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: lm_loss(GPT(cfg).apply({"params": p}, x[:, :-1]), x[:, 1:])))(params)

    found = [tuple(v.aval.dtype for v in eqn.invars) for eqn in all_eqns(jaxpr.jaxpr)
             if eqn.primitive.name == "dot_general"]
    assert len(found) >= 12  # forward and backward of every matmul
    assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in found), sorted(set(found))


def all_eqns(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (scan, pjit, custom_jvp, while) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from all_eqns(getattr(sub, "jaxpr", sub))


@pytest.mark.parametrize("attention", ["reference", "auto"])
def test_bf16_softmax_runs_in_fp32(setup, attention):
    """With bf16 compute, every exponential (the attention softmax: forward, chunked prefill and one
    decode step) takes float32 scores; a bf16 softmax keeps 8 bits of the probabilities."""
    cfg, params = setup
    cfg = dataclasses.replace(cfg, dtype="bfloat16", attention=attention)
    model = GPT(cfg)
    x = tokens((2, 8))
    cache = init_cache(cfg, 2, 12)
    passes = {
        "forward": lambda p: model.apply({"params": p}, x),
        "prefill": lambda p: model.apply({"params": p}, x, cache=cache, cache_index=0),
        "chunk": lambda p: model.apply({"params": p}, x[:, :3], cache=cache, cache_index=2),
        "decode": lambda p: model.apply({"params": p}, x[:, :1], cache=cache, cache_index=4),
    }
    for name, f in passes.items():
        exps = [eqn.invars[0].aval.dtype for eqn in all_eqns(jax.make_jaxpr(f)(params).jaxpr)
                if eqn.primitive.name == "exp"]
        assert exps and all(d == jnp.float32 for d in exps), (name, exps)


def test_attention_dropout_rate_is_attn_pdrop():
    """One token, one head: attention has a single key of probability 1, which dropout zeroes (the output
    of the block is then that of a zero c_proj kernel) or scales by 1 / (1 - p). Over 4000 rows the
    dropped fraction is p within 5 standard errors (false-failure rate 6e-7)."""
    p = 0.3
    cfg = GPTConfig.preset("gpt2-tiny", n_layer=1, n_head=1, n_embd=16, vocab_size=11, n_positions=4,
                           attn_pdrop=p, attention="reference")
    params = randomize(init_params(cfg, jax.random.key(0)))
    x = tokens((4000, 1), vocab=11)
    train = GPT(cfg).apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})

    def with_c_proj(scale):
        c_proj = params["h"]["attn"]["c_proj"]
        attn = {**params["h"]["attn"], "c_proj": {**c_proj, "kernel": c_proj["kernel"] * scale}}
        return GPT(cfg).apply({"params": {**params, "h": {**params["h"], "attn": attn}}}, x)

    dropped = np.all(np.isclose(train, with_c_proj(0.0), atol=1e-5), axis=(1, 2))
    kept = np.all(np.isclose(train, with_c_proj(1 / (1 - p)), atol=1e-5), axis=(1, 2))
    assert not np.any(dropped & kept) and np.all(dropped | kept)
    assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / len(x)), dropped.mean()


@pytest.mark.parametrize("pad", [1, 128])
def test_tiny_gpt2_reproduces_reference_outputs(tmp_path, pad):
    """Published outputs of tiny-gpt2 (no torch needed: this is the numerics check that runs without it).
    Also with the vocabulary padded to 50,304 rows: the same figures, and save_pretrained strips the rows."""
    root = data_path("tiny-gpt2")
    ref = json.loads((root / "reference_outputs.json").read_text())
    config, params = load_pretrained(root, pad_vocab_multiple=pad)
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 2, 50257)
    assert params["wte"]["embedding"].shape[0] == (50304 if pad == 128 else 50257)
    if pad > 1:
        save_pretrained(config, params, tmp_path / "out")
        assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 50257
        again_config, again = load_pretrained(tmp_path / "out")
        np.testing.assert_array_equal(again["wte"]["embedding"], params["wte"]["embedding"][:50257])
    for case in ref["cases"]:
        ids = jnp.asarray([case["ids"]])
        out, state = GPT(config).apply({"params": params}, ids, return_hidden=True, mutable=["intermediates"])
        hidden = list(state["intermediates"]["h"]["block_input"][0][:, 0]) + [out.hidden[0]]
        np.testing.assert_allclose(np.stack(hidden), case["hidden_states"], atol=1e-6, rtol=1e-5)
        logits = np.asarray(out.logits[0])
        assert np.all(logits[:, 50257:] == -np.inf)
        logits = logits[:, :50257]
        np.testing.assert_allclose(logits[:, :8], case["logits_first8"], atol=1e-6)
        np.testing.assert_allclose(logits[np.arange(len(case["ids"])), case["ids"]], case["logits_at_ids"], atol=1e-6)
        np.testing.assert_allclose(logits.max(-1), case["logits_max"], atol=1e-6)
        np.testing.assert_allclose(jax.nn.logsumexp(logits, -1), case["logsumexp"], atol=1e-5)
        assert logits.argmax(-1).tolist() == case["logits_argmax"]
        loss = float(lm_loss(out.logits[:, :-1], ids[:, 1:]))
        assert abs(loss - case["loss"]) <= 1e-5, (case["text"], case["dtype"], loss, case["loss"])


def test_lm_loss_weights_average_over_the_kept_positions():
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(2, 5, 7)), rng.integers(0, 7, size=(2, 5))
    weights = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 1, 1]])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    got = lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(got, (nll * weights).sum() / weights.sum(), rtol=1e-5)
    np.testing.assert_allclose(lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets)), nll.mean(), rtol=1e-5)
    assert float(lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.zeros((2, 5)))) == 0.0  # not NaN
    one = np.zeros((2, 5), bool)  # a single kept position (boolean weights): its own loss, not half of it
    one[1, 3] = True
    np.testing.assert_allclose(lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(one)),
                               nll[1, 3], rtol=1e-5)


def test_init_cache_takes_the_compute_dtype_or_the_one_given_and_the_read_layouts():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    L, N, H = cfg.n_layer, cfg.n_head, cfg.head_dim
    for dtype, want in ((None, jnp.bfloat16), (jnp.float16, jnp.float16)):
        cache = init_cache(cfg, 2, 20, dtype)
        assert (cache["k"].dtype, cache["v"].dtype) == (want, want), dtype
        assert cache["k"].shape == (L, 2, N, H, 20) and cache["v"].shape == (L, 2, N, 20, H)
        assert not cache["k"].any() and not cache["v"].any()


def test_parameters_take_param_dtype_and_each_bias_the_axis_of_its_kernels_output():
    """bfloat16 parameters (for inference) are bfloat16 everywhere; a Dense bias is sharded like the
    output axis of its kernel (the layer axis of the scanned blocks first), a LayerNorm's like the features."""
    from gpt_jax.model import logical_axes

    cfg = dataclasses.replace(TINY, param_dtype="bfloat16")
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}
    blocks = logical_axes(TINY)["h"]
    for module in (blocks["attn"]["c_attn"], blocks["attn"]["c_proj"], blocks["mlp"]["c_fc"], blocks["mlp"]["c_proj"]):
        kernel, bias = tuple(module["kernel"]), tuple(module["bias"])
        assert len(kernel) == 3 and bias == (kernel[0], kernel[-1]), (kernel, bias)
    for ln in (blocks["ln_1"], blocks["ln_2"]):  # LayerNorms: like the features they normalise
        assert tuple(ln["scale"]) == tuple(ln["bias"]) == ("layers", "embed")
    assert tuple(logical_axes(TINY)["ln_f"]["scale"]) == tuple(logical_axes(TINY)["ln_f"]["bias"]) == ("embed",)


def test_a_bf16_decode_step_scores_the_cache_in_float32():
    """With bf16 compute, the decode step's two score matmuls (the new query against the cached keys,
    and against its own key) take bf16 operands and give float32 results, as the full pass does."""
    import re

    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    B, S = 2, 20
    step = jax.jit(lambda p, t, c, i: GPT(cfg).apply({"params": p}, t, cache=c, cache_index=i))
    text = step.lower(params, tokens((B, 1)), init_cache(cfg, B, S), 6).as_text()
    N = cfg.n_head
    scores = {f"{B}x{N}x1x{S}": 0, f"{B}x{N}x1": 0}
    for line in text.splitlines():
        m = re.search(r"stablehlo\.dot_general .*: \(tensor<([0-9x]+)x(\w+)>, tensor<([0-9x]+)x(\w+)>\) -> tensor<([0-9x]+)x(\w+)>", line)
        if m and m.group(5) in scores:
            assert (m.group(2), m.group(4), m.group(6)) == ("bf16", "bf16", "f32"), line.strip()
            scores[m.group(5)] += 1
    assert all(scores.values()), f"no score matmul found: {scores}"  # (once per layer, or once in the scanned body)
