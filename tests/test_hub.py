"""Models by name from a Hugging Face hub cache laid out here, as huggingface_hub lays it out
(models--<org>--<name>/refs/main, snapshots/<revision>/ linking into blobs/). No test touches the
network: the `no_network` fixture puts a huggingface_hub in place whose download fails loudly."""

import hashlib
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from conftest import ROOT, data_path
from gpt_jax import GPTConfig, init_params, load_pretrained, load_tokenizer, save_pretrained
from gpt_jax.hub import HubError, cache_dirs


def put_snapshot(cache, folder, files, revision="0123abcd"):
    """A cached repo: each file a blob named by its hash, linked from snapshots/<revision>/."""
    repo = cache / f"models--{folder.replace('/', '--')}"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (repo / "snapshots" / revision / name).symlink_to(os.path.relpath(blob, repo / "snapshots" / revision))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def gpt2_files():
    tiny, bpe = data_path("tiny-gpt2"), data_path("gpt2-bpe", "hf")
    return {"config.json": tiny / "config.json", "model.safetensors": tiny / "model.safetensors",
            "vocab.json": bpe / "vocab.json", "merges.txt": bpe / "merges.txt"}


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty hub cache in tmp_path, no other cache, and a huggingface_hub whose downloads fail."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        raise OSError("Network is unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "hub", calls


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gpt2_by_name_from_the_cache(no_network, monkeypatch, tmp_path):
    cache, calls = no_network
    files = gpt2_files()
    stale = put_snapshot(cache, "openai-community/gpt2", {"config.json": files["vocab.json"]}, revision="old")
    snapshot = put_snapshot(cache, "openai-community/gpt2", files, revision="new")  # refs/main -> new
    assert stale.parent == snapshot.parent
    config, params = load_pretrained(data_path("tiny-gpt2"))
    vectors = [v for v in json.loads(data_path("gpt2-bpe", "test_vectors.json").read_text()) if "allowed_special" not in v]
    for name in ("gpt2", "openai-community/gpt2"):
        by_name = load_pretrained(name)
        assert by_name[0] == config
        assert_same_params(by_name[1], params)
        tok = load_tokenizer(name)
        assert [tok.encode(v["text"]) for v in vectors] == [v["ids"] for v in vectors]
    assert tok.spec()["path"] == str(snapshot.resolve())
    # "gpt2" is also the tokenizer kind: its files come from $GPT_JAX_DATA/gpt2-bpe if set, else from the cache
    monkeypatch.delenv("GPT_JAX_DATA")
    assert load_tokenizer("gpt2").spec()["path"] == str(snapshot.resolve())
    # older downloads of the short names sit under models--<name>; $HF_HOME/hub and ~/.cache are searched too
    put_snapshot(tmp_path / "hf-home" / "hub", "gpt2-medium", files)
    put_snapshot(tmp_path / "home" / ".cache" / "huggingface" / "hub", "openai-community/gpt2-large", files)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert cache_dirs() == [cache, tmp_path / "hf-home" / "hub", tmp_path / "home" / ".cache" / "huggingface" / "hub"]
    assert_same_params(load_pretrained("gpt2-medium")[1], params)
    assert_same_params(load_pretrained("openai-community/gpt2-large")[1], params)
    assert calls == []


def test_openai_gpt_by_name_for_sampling_and_fine_tuning(no_network):
    from gpt_jax.config import FinetuneConfig
    from gpt_jax.finetune import load_base
    from gpt_jax.runs import load_for_sampling

    cache, calls = no_network
    bpe = data_path("gpt1-bpe")
    config = GPTConfig.preset("gpt1-tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=40478)
    params = init_params(config, jax.random.key(0))
    save_pretrained(config, params, cache.parent / "saved")
    put_snapshot(cache, "openai-community/openai-gpt", {
        "config.json": cache.parent / "saved" / "config.json", "model.safetensors": cache.parent / "saved" / "model.safetensors",
        "vocab.json": bpe / "encoder_bpe_40000.json", "merges.txt": bpe / "vocab_40000.bpe"})
    for name in ("openai-gpt", "openai-community/openai-gpt"):
        loaded, loaded_params, tok = load_for_sampling(name)
        assert loaded.norm == "post" and loaded.vocab_size == 40478
        assert_same_params(loaded_params, params)
        assert tok.kind == "gpt1" and tok.encode("the president is") == [481, 4735, 544]
    base, base_params, tok = load_base(FinetuneConfig(init_from="openai-gpt"), None, jax.random.key(1))
    assert base == loaded and tok.kind == "gpt1"
    assert_same_params(base_params, params)
    assert calls == []


def test_not_cached_names_say_where_they_looked(no_network, monkeypatch):
    cache, calls = no_network
    with pytest.raises(HubError) as err:
        load_pretrained("gpt2-xl")
    message = str(err.value)
    assert calls == ["openai-community/gpt2-xl"]
    for words in (str(cache), ".cache/huggingface/hub", "OSError: Network is unreachable",
                  "hf download openai-community/gpt2-xl config.json model.safetensors"):
        assert words in message, message
    assert "\n" not in message
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(HubError, match=r"huggingface_hub is not installed \(pip install 'gpt_jax\[hub\]'"):
        load_pretrained("openai-gpt")
    monkeypatch.delenv("GPT_JAX_DATA")
    from gpt_jax.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="GPT_JAX_DATA.*no vocab.json \\+ merges.txt in the Hugging Face cache"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="gpt2-medium: no vocab.json"):
        load_tokenizer("gpt2-medium")


def test_a_download_lands_in_the_cache_and_is_used(no_network, monkeypatch):
    cache, _ = no_network
    asked = []

    def snapshot_download(repo_id, allow_patterns=None):  # what huggingface_hub does, without the network
        asked.append((repo_id, sorted(allow_patterns)))
        return str(put_snapshot(cache, repo_id, {k: v for k, v in gpt2_files().items() if k in allow_patterns}))

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    config, params = load_pretrained("gpt2")
    assert asked == [("openai-community/gpt2", ["config.json", "merges.txt", "model.safetensors", "vocab.json"])]
    assert_same_params(params, load_pretrained(data_path("tiny-gpt2"))[1])
    load_pretrained("gpt2")  # now cached: no second download
    assert len(asked) == 1


def test_sample_cli_by_name(no_network, tmp_path):
    cache, _ = no_network
    put_snapshot(cache, "openai-community/gpt2", gpt2_files())
    ref = json.loads((data_path("tiny-gpt2") / "reference_outputs.json").read_text())["cases"][0]
    # HF_HUB_OFFLINE: were a real huggingface_hub installed there, it would not reach the network either
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", "gpt2", "--prompt", ref["text"],
                           "--max-new-tokens", "20", "--temperature", "0"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == load_tokenizer("gpt2").decode(ref["greedy_20"]).strip()
    bad = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", "gpt2-large"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: gpt2-large: no config.json + model.safetensors")
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
