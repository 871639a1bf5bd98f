"""Generation from a model whose vocabulary is padded (pad_vocab_multiple): no id at or above vocab_size is
ever produced, greedy or sampled, with or without top-k / top-p, inside the context window and past it. The
model is built so that the padded rows' logits would win by far if they were not masked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import GPT, GPTConfig, generate, init_params

CONFIG = GPTConfig.preset("gpt2-tiny", n_layer=1, n_positions=16, vocab_size=50, pad_vocab_multiple=64)


@pytest.fixture(scope="module")
def padded_rows_win():
    """ln_f's bias pushes every final hidden state along the all-ones direction, and the padded embedding rows
    (ids 50-63) point that way: their logits are about 10 * 64 = 640, the real rows' a few units."""
    rng = np.random.default_rng(0)  # drawn here, not by init_params: its unjitted scan costs seconds
    shapes = jax.eval_shape(lambda: init_params(CONFIG, jax.random.key(0)))
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), jnp.float32), shapes)
    D = CONFIG.n_embd
    params["ln_f"]["bias"] = jnp.full((D,), 10.0)
    params["wte"]["embedding"] = params["wte"]["embedding"].at[CONFIG.vocab_size:].set(1.0)
    # The premise, from the hidden states alone: unmasked, a padded id is the argmax and holds the mass.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, CONFIG.n_positions)))
    hidden_BTD = jax.jit(lambda p, t: GPT(CONFIG).apply({"params": p}, t, return_hidden=True).hidden)(params, tokens)
    unmasked_BTV = hidden_BTD @ params["wte"]["embedding"].T
    assert unmasked_BTV.shape[-1] == 64 and bool(jnp.all(unmasked_BTV.argmax(-1) >= CONFIG.vocab_size))
    assert float(jax.nn.softmax(unmasked_BTV)[..., CONFIG.vocab_size:].sum(-1).min()) > 0.999
    return params


@pytest.mark.parametrize("settings", [dict(greedy=True), dict(temperature=1.0), dict(temperature=1.0, top_k=5),
                                      dict(temperature=1.0, top_p=0.9), dict(temperature=2.0, top_k=40, top_p=0.95)],
                         ids=["greedy", "sampled", "top-k", "top-p", "top-k and top-p"])
def test_no_padded_id_is_ever_generated(padded_rows_win, settings):
    prompts = [[1, 2, 3], [49], [7] * 20]  # the last is longer than the context: it starts past the window
    new, lengths = generate(CONFIG, padded_rows_win, prompts, 24, rng=0, **settings)  # 24 > 16: past the window
    assert lengths == [24, 24, 24]
    ids = np.array(new)
    assert ids.min() >= 0 and ids.max() < CONFIG.vocab_size, ids
