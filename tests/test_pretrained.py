"""Parity with Hugging Face transformers (PyTorch, CPU) on models built from configs with random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import GPT, ConfigError, GPTConfig, init_params, lm_loss, load_pretrained, save_pretrained

torch = pytest.importorskip("torch", reason="torch is needed for reference parity (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="transformers is needed for reference parity")

GPT2_SHAPES = {
    "small": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=211, n_positions=48),
    "odd_heads": dict(n_layer=3, n_head=6, n_embd=90, vocab_size=173, n_positions=40, n_inner=200,
                      activation_function="gelu"),  # 6 heads of width 15, an erf GELU
    "short_ctx": dict(n_layer=2, n_head=3, n_embd=48, vocab_size=97, n_positions=8, activation_function="relu"),
}
GPT1_SHAPE = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=151, n_positions=32, afn="gelu")


def randomize_torch(model, seed=0):
    """Random weights everywhere, LayerNorms included, so no parameter can be silently ignored."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_model(kind, shape):
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**shape, attn_implementation="eager")
        return randomize_torch(transformers.GPT2LMHeadModel(cfg))
    cfg = transformers.OpenAIGPTConfig(**shape, attn_implementation="eager")
    return randomize_torch(transformers.OpenAIGPTLMHeadModel(cfg))


def compare(model, config, params, seq_len, seed=0):
    ids = np.random.default_rng(seed).integers(0, config.vocab_size, (3, seq_len))
    with torch.no_grad():
        out = model(torch.tensor(ids), labels=torch.tensor(ids))
    ours = GPT(config).apply({"params": params}, jnp.asarray(ids))
    diff = float(np.abs(np.asarray(ours) - out.logits.numpy()).max())
    loss = float(lm_loss(ours[:, :-1], jnp.asarray(ids[:, 1:])))
    return diff, abs(loss - float(out.loss))


CASES = [("gpt2", name, shape) for name, shape in GPT2_SHAPES.items()] + [("openai-gpt", "gpt1", GPT1_SHAPE)]


@pytest.mark.parametrize("kind, name, shape", CASES, ids=[c[1] for c in CASES])
def test_import_matches_transformers(tmp_path, kind, name, shape):
    model = hf_model(kind, shape)
    model.save_pretrained(tmp_path)  # safetensors
    config, params = load_pretrained(tmp_path)
    assert config.norm == ("pre" if kind == "gpt2" else "post")
    diff, loss_diff = compare(model, config, params, min(shape["n_positions"], 24))
    print(f"{name}: max |logits diff| = {diff:.2e}, |loss diff| = {loss_diff:.2e}")
    assert diff <= 1e-4 and loss_diff <= 1e-5


@pytest.mark.parametrize("kind, name, shape", CASES[:1] + CASES[-1:], ids=["gpt2", "gpt1"])
def test_import_pytorch_bin_without_torch_code(tmp_path, kind, name, shape):
    model = hf_model(kind, shape)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config, params = load_pretrained(tmp_path)
    diff, _ = compare(model, config, params, 16)
    assert diff <= 1e-4


def test_import_sharded_safetensors(tmp_path):
    model = hf_model("gpt2", GPT2_SHAPES["small"])
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    config, params = load_pretrained(tmp_path)
    diff, loss_diff = compare(model, config, params, 24)
    assert diff <= 1e-4 and loss_diff <= 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_import_half_precision_pytorch_bin(tmp_path, dtype):
    """A .bin saved in fp16 / bf16 gives the logits of the reference model with those rounded weights."""
    model = hf_model("gpt2", GPT2_SHAPES["small"])
    model.config.save_pretrained(tmp_path)
    torch.save(model.to(getattr(torch, dtype)).state_dict(), tmp_path / "pytorch_model.bin")
    config, params = load_pretrained(tmp_path)
    diff, _ = compare(model.float(), config, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), 16)
    assert diff <= 1e-4


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt1-tiny"])
def test_export_loads_in_transformers(tmp_path, preset):
    config = GPTConfig.preset(preset, n_head=2, activation="gelu_tanh")
    params = init_params(config, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), params)
    save_pretrained(config, params, tmp_path)
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(auto).__name__ == ("GPT2LMHeadModel" if config.norm == "pre" else "OpenAIGPTLMHeadModel")
    diff, loss_diff = compare(auto, config, params, 20)
    assert diff <= 1e-4 and loss_diff <= 1e-5
    # And back again, unchanged.
    config2, params2 = load_pretrained(tmp_path)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        load_pretrained(tmp_path)
    model = hf_model("gpt2", GPT2_SHAPES["small"])
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "n_layer": 3}))
    with pytest.raises(ConfigError, match="h.2.* is missing"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf, "n_embd": 32}))
    with pytest.raises(ConfigError, match="shape"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_pretrained(tmp_path)
