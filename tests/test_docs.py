"""The README's Python blocks and the example notebook's cells run as written, and every public
function (generate, save_pretrained, the evaluate and zero-shot helpers) takes parameters as
`GPT(config).init(...)["params"]` returns them (boxed)."""

import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from conftest import ROOT
from test_hub import gpt2_files, no_network, put_snapshot  # noqa: F401 (no_network is a fixture)


def run_blocks(blocks, cwd, monkeypatch):
    """exec each block in turn in one namespace (as a reader pastes them), in `cwd`; returns stdout."""
    monkeypatch.chdir(cwd)
    namespace, out = {"__name__": "__main__"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(blocks):
            exec(compile(block, f"<block {i}>", "exec"), namespace)
    return out.getvalue()


def test_readme_python_blocks_run(no_network, monkeypatch, tmp_path):
    cache, calls = no_network
    put_snapshot(cache, "openai-community/gpt2", gpt2_files())  # "gpt2" is the small tiny-gpt2 here
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert len(blocks) >= 2
    out = run_blocks(blocks, tmp_path, monkeypatch)
    assert out.strip() and (tmp_path / "out-dir" / "model.safetensors").is_file()
    assert calls == []


def test_notebook_cells_run(monkeypatch):
    path = ROOT / "examples" / "generate.ipynb"
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    out = run_blocks(["".join(c["source"]) for c in cells], path.parent, monkeypatch)
    assert "second call" in out and "Error" not in out


def test_public_functions_take_params_as_init_returns_them(tmp_path):
    from flax import linen as nn

    from gpt_jax import GPT, GPTConfig, generate, load_pretrained, save_pretrained
    from gpt_jax.scoring import continuation_logprobs, perplexity
    from gpt_jax.tokenizer import CharTokenizer
    from gpt_jax.zeroshot import lambada

    config = GPTConfig.preset("gpt2-tiny", n_layer=2, n_positions=16, vocab_size=50)
    boxed = GPT(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert any(isinstance(x, nn.LogicallyPartitioned) for x in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(
        x, nn.LogicallyPartitioned)))
    plain = nn.unbox(boxed)
    prompts = [[1, 2, 3], [4]]
    assert generate(config, boxed, prompts, 20, greedy=True) == generate(config, plain, prompts, 20, greedy=True)
    save_pretrained(config, boxed, tmp_path)
    for a, b in zip(jax.tree.leaves(load_pretrained(tmp_path)[1]), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, np.asarray(b))
    ids = list(np.random.default_rng(0).integers(0, 50, 40))
    assert perplexity(config, boxed, ids, stride=8) == perplexity(config, plain, ids, stride=8)
    np.testing.assert_array_equal(continuation_logprobs(config, boxed, prompts, [[5, 6], [7]]),
                                  continuation_logprobs(config, plain, prompts, [[5, 6], [7]]))
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ")
    examples = [("the cat sat on the", "mat"), ("a quick brown", "fox")]
    assert lambada(config, boxed, tok, examples) == lambada(config, plain, tok, examples)
