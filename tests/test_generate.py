import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, data_path
from gpt_jax import GPTConfig, init_params, load_pretrained
from gpt_jax.generate import GenerateError, _generate, _split_cache, clear_decode_cache, decode_layers, generate

TINY = GPTConfig.preset("gpt2-tiny", n_layer=2, n_positions=64, vocab_size=50)


def off_init(params, scale):
    """Weights `scale` times the init's, so the next-token distribution is far from uniform, and every
    leaf moved off its init (biases are zero there: a sign error on a bias would change nothing)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [(x * scale if x.ndim > 1 else x) + 0.1 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny():
    return TINY, off_init(init_params(TINY, jax.random.key(0)), 8)


def test_tiny_gpt2_greedy_references():
    root = data_path("tiny-gpt2")
    config, params = load_pretrained(root)
    cases = [c for c in json.loads((root / "reference_outputs.json").read_text())["cases"] if c["dtype"] == "float32"]
    out, lengths = generate(config, params, [c["ids"] for c in cases], 20, greedy=True)
    for case, new in zip(cases, out):
        assert case["ids"] + new == case["greedy_20"]
    assert lengths == [20] * len(cases)


@pytest.mark.parametrize("kind", ["gpt2", "openai-gpt"])
def test_greedy_equals_transformers_generate(tmp_path, kind):
    torch = pytest.importorskip("torch", reason="torch is the generation reference")
    transformers = pytest.importorskip("transformers", reason="transformers is the generation reference")
    torch.manual_seed(0)
    if kind == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=300,
                                                                  n_positions=64, attn_implementation="eager"))
    else:
        hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
            n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=64, attn_implementation="eager"))
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(6.0)  # peaked distributions: greedy paths that are not one repeated token
    hf.eval().save_pretrained(tmp_path)
    config, params = load_pretrained(tmp_path)
    prompts = [[5, 17, 42, 7], [100, 3], [250, 251, 252, 253, 254, 255, 9]]
    ours, _ = generate(config, params, prompts, 24, greedy=True)
    for prompt, new in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                              pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert new == ref[0, len(prompt):].tolist()
        assert len(set(new)) > 2, "degenerate reference; the test would prove little"


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_batched_left_padded_equals_each_prompt_alone(tiny):
    config, params = tiny
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [4], [7, 8, 9]]
    together, _ = generate(config, params, prompts, 12, greedy=True)
    for p, t in zip(prompts, together):
        assert generate(config, params, [p], 12, greedy=True)[0][0] == t
    # a padded array plus lengths is the same request
    arr = np.zeros((3, 11), np.int32)
    for i, p in enumerate(prompts):
        arr[i, 11 - len(p):] = p
    assert generate(config, params, arr, 12, greedy=True, lengths=[len(p) for p in prompts])[0] == together


def test_top_k_1_is_greedy_and_seeds_reproduce(tiny):
    config, params = tiny
    prompts = [[1, 2, 3], [9, 8]]
    greedy, _ = generate(config, params, prompts, 16, greedy=True)
    assert generate(config, params, prompts, 16, top_k=1, temperature=1.3, rng=5)[0] == greedy
    assert generate(config, params, prompts, 16, temperature=0)[0] == greedy
    a = generate(config, params, prompts, 16, rng=7)[0]
    assert generate(config, params, prompts, 16, rng=7)[0] == a
    assert generate(config, params, prompts, 16, rng=8)[0] != a


def test_stop_tokens_end_sequences_and_the_loop(tiny):
    config, params = tiny
    free, _ = generate(config, params, [[1, 2, 3], [4, 5]], 20, greedy=True)
    stop = free[0][5]
    out, lengths = generate(config, params, [[1, 2, 3], [4, 5]], 20, greedy=True, stop_tokens=[stop])
    assert out[0] == free[0][: free[0].index(stop) + 1] and lengths[0] == len(out[0])
    if stop in free[1]:
        assert out[1] == free[1][: free[1].index(stop) + 1]
    else:
        assert out[1] == free[1]


def test_sampled_runs_stop_at_the_listed_tokens_only(tiny):
    """Three stop tokens (padded to four inside): each sampled row is its free run cut after its first
    stop token, so no other id (0 or 1, say) ends a row. Same rng, so the free run samples the same tokens."""
    config, params = tiny
    prompts = [[i % 50, 7] for i in range(16)]
    kw = dict(temperature=20.0, rng=3)  # nearly uniform: every id turns up
    free, _ = generate(config, params, prompts, 24, **kw)
    stops = [2, 3, 4]
    cut = [row[: min([row.index(t) for t in stops if t in row], default=len(row) - 1) + 1] for row in free]
    assert any(0 in row[:-1] for row in cut) and any(1 in row[:-1] for row in cut), "the test needs 0 and 1 mid-row"
    out, lengths = generate(config, params, prompts, 24, stop_tokens=stops, **kw)
    assert out == cut and lengths == [len(row) for row in cut]


def test_loop_stops_once_every_sequence_has_stopped(tiny):
    """The decode loop runs until the last sequence meets a stop token, not max_new_tokens steps: the
    streaming callback sees exactly that many steps (from where the stop tokens stand in a free run)."""
    config, params = tiny
    prompts = [[1, 2, 3], [4, 5]]
    free, _ = generate(config, params, prompts, 30, greedy=True)
    stops = [free[0][2], free[1][4]]
    first_stop = [min(row.index(t) for t in stops if t in row) for row in free]
    steps = []
    generate(config, params, prompts, 30, greedy=True, stop_tokens=stops, on_token=lambda i, _: steps.append(int(i)))
    assert steps == list(range(max(first_stop) + 1)) and max(first_stop) + 1 < 30


def test_decode_copy_of_the_weights_follows_the_params(tiny):
    """`generate` reuses its per-layer copy of the weights only while the very same arrays are alive."""
    import gc

    config, params = tiny
    prompts = [[1, 2, 3], [9, 8]]
    a, _ = generate(config, params, prompts, 12, greedy=True)
    assert decode_layers(params) is decode_layers(params)
    host = jax.tree.map(np.asarray, params)  # numpy leaves (no is_deleted) are kept and reused too
    assert decode_layers(host) is decode_layers(host)
    # Other weights of the same shapes (as after a training step) must not be served from the copy.
    other = jax.tree.map(lambda x: -1.5 * x, params)
    b, _ = generate(config, other, prompts, 12, greedy=True)
    clear_decode_cache()
    assert generate(config, other, prompts, 12, greedy=True)[0] == b
    assert b != a
    # One leaf swapped in a dict that is otherwise the same also counts as other weights.
    swapped = {**params, "wte": {"embedding": other["wte"]["embedding"]}}
    generate(config, params, prompts, 12, greedy=True)
    c, _ = generate(config, swapped, prompts, 12, greedy=True)
    clear_decode_cache()
    assert generate(config, swapped, prompts, 12, greedy=True)[0] == c
    # The copy goes when the params go, or when their buffers are deleted (donated to a train step).
    generate(config, other, prompts, 4, greedy=True)
    assert _split_cache
    del other, b
    gc.collect()
    assert not _split_cache
    gone = jax.tree.map(lambda x: x + 0, params)
    generate(config, gone, prompts, 4, greedy=True)
    assert decode_layers(gone) is decode_layers(gone)
    jax.tree.leaves(gone)[0].delete()
    with pytest.raises(RuntimeError, match="deleted"):  # not the stale copy
        decode_layers(gone)


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_compiles_once_per_bucket(tiny):
    config, params = tiny
    generate(config, params, [[1, 2, 3, 4, 5]], 10, temperature=0.9, rng=0)
    before = _generate._cache_size()
    generate(config, params, [[7, 1, 2, 3, 4, 5, 6]], 10, temperature=0.5, rng=1)       # prompt 7 <= bucket 8
    generate(config, params, [[9, 9]], 12, temperature=1.5, rng=2)                      # 12 new <= bucket 16
    generate(config, params, [[3, 4, 5]], 9, top_p=0.7, rng=3)
    assert _generate._cache_size() == before
    generate(config, params, [[9, 9]], 12, temperature=1.5, top_k=5, rng=2)             # top-k on: a new bucket
    generate(config, params, [[3, 4, 5]], 16, top_k=3, top_p=0.9, temperature=0.2, rng=jax.random.key(4))
    assert _generate._cache_size() == before + 1
    generate(config, params, [[1, 2]] * 5, 10, rng=0)                                  # batch 5 -> 8: a new bucket
    assert _generate._cache_size() == before + 2
    generate(config, params, [[3]] * 7, 16, rng=1, temperature=0.3)                     # the same bucket again
    assert _generate._cache_size() == before + 2
    generate(config, params, [[3]] * 7, 16, rng=1, stop_tokens=[1, 2, 3])              # 3 stop tokens -> 4
    generate(config, params, [[3]] * 7, 16, rng=1, stop_tokens=[4, 5, 6, 7])
    assert _generate._cache_size() == before + 3


def filtered_probs(logits, temperature, top_k, top_p):
    """An independent numpy version of temperature -> top-k -> top-p filtering."""
    z = logits / temperature
    order = np.argsort(-z)
    keep = np.zeros_like(z, bool)
    p_sorted = np.exp(z[order] - z[order].max())
    if top_k:
        p_sorted[top_k:] = 0
    p_sorted /= p_sorted.sum()
    cum = 0.0
    for rank, idx in enumerate(order):
        if (top_k and rank >= top_k) or (rank > 0 and cum >= top_p):
            break
        keep[idx] = True
        cum += p_sorted[rank]
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


def test_top_k_then_top_p_within_it_equals_the_full_sort_definition():
    """lax.top_k's few best logits, then top-p among them, keep exactly the tokens that sorting the
    whole vocabulary keeps (the numpy definition above), for many random logits and settings."""
    from gpt_jax.generate import filter_logits, top_k_bucket

    rng = np.random.default_rng(0)
    V = 1000
    for top_k, top_p in [(1, 1.0), (7, 1.0), (40, 0.9), (64, 0.5), (100, 0.95), (300, 0.3), (2000, 0.8), (0, 0.6)]:
        logits = rng.standard_normal((8, V)) * rng.uniform(0.5, 4.0)
        temperature = rng.uniform(0.5, 1.5)
        out = np.asarray(filter_logits(logits.astype(np.float32), np.float32(temperature), np.int32(top_k),
                                       np.float32(top_p), top_k_bucket(top_k, V)))
        for row, filtered in zip(logits, out):
            expected = filtered_probs(row, temperature, top_k, top_p)
            kept = np.isfinite(filtered)
            np.testing.assert_array_equal(kept, expected > 0, err_msg=f"top_k={top_k}, top_p={top_p}")
            probs = np.exp(filtered[kept] - filtered[kept].max())
            np.testing.assert_allclose(probs / probs.sum(), expected[kept], rtol=1e-4, atol=1e-7)
    # with top-k on, the vocabulary is never sorted: lax.top_k finds the candidates, top-p sorts nothing more
    traced = str(jax.make_jaxpr(lambda x: filter_logits(x, 1.0, 40, 0.9, top_k_bucket(40, V)))(logits.astype(np.float32)))
    assert "top_k[" in traced and "sort[" not in traced, traced
    # at the boundary: probabilities 1/2, 1/4, 1/4 (exact in float32) and top_p = 1/2. The second token's
    # better mass is exactly top_p, so it is dropped (a token is kept while that mass < top_p, as in the
    # definition above), and with it the third, tied with it: only the best survives.
    edge = np.full((1, V), -1e9, np.float32)
    edge[0, [5, 17, 300]] = [np.log(2.0), 0.0, 0.0]
    for top_k in (0, 64):
        out = np.asarray(filter_logits(edge, np.float32(1.0), np.int32(top_k), np.float32(0.5), top_k_bucket(top_k, V)))
        assert np.flatnonzero(np.isfinite(out[0])).tolist() == [5], (top_k, np.flatnonzero(np.isfinite(out[0])))


@pytest.mark.parametrize("rows", [1, 32, 33])
def test_decode_matmul_is_x_times_w_transposed_in_float32_with_the_cpu_layout_only_for_a_few_rows(rows):
    """`_matmul_out_in(x, w)` is x @ w.T for a weight stored [out, in], accumulated and returned in float32
    from bfloat16 operands too; on CPU up to 32 rows it computes (w @ x.T).T behind an optimization
    barrier, and for more rows or when lowered for an accelerator the plain product (its docstring)."""
    from gpt_jax.generate import _matmul_out_in

    rng = np.random.default_rng(rows)
    x, w = rng.standard_normal((rows, 48)), rng.standard_normal((40, 48))
    for dtype, tol in [(np.float32, 1e-5), (jax.numpy.bfloat16, 1e-2)]:
        xd, wd = jax.numpy.asarray(x, dtype), jax.numpy.asarray(w, dtype)
        expected = np.asarray(xd, np.float64) @ np.asarray(wd, np.float64).T  # the operands' exact values
        for platform in ("cpu", "cuda", "tpu"):
            out = jax.jit(_matmul_out_in, static_argnums=2)(xd, wd, platform)
            assert out.dtype == np.float32 and out.shape == (rows, 40)
            np.testing.assert_allclose(np.asarray(out), expected, rtol=tol, atol=tol)
            text = jax.jit(_matmul_out_in, static_argnums=2).lower(xd, wd, platform).as_text()
            assert ("optimization_barrier" in text) == (platform == "cpu" and rows <= 32), (platform, rows)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 6, None), (1.3, None, 0.8),
                                                       (0.9, 10, 0.6)])
def test_first_token_distribution_matches_filtered_softmax(tiny, temperature, top_k, top_p):
    from scipy.stats import chisquare

    from gpt_jax import GPT

    config, params = tiny
    prompt = [3, 14, 15, 9]
    logits = np.asarray(GPT(config).apply({"params": params}, np.array([prompt])))[0, -1].astype(np.float64)
    expected = filtered_probs(logits, temperature, top_k, top_p if top_p else 1.0)
    n = 4096
    out, _ = generate(config, params, [prompt] * n, 1, temperature=temperature, top_k=top_k, top_p=top_p, rng=11)
    counts = np.bincount([o[0] for o in out], minlength=config.vocab_size)
    assert counts[expected == 0].sum() == 0, "sampled a token the filters remove"
    support = expected > 0
    assert support.sum() >= 3
    stat = chisquare(counts[support], n * expected[support])
    assert stat.pvalue > 1e-3, (stat, counts[support], n * expected[support])


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompts=[[]], max_new_tokens=5), ["prompt 0 is empty"]),
    (dict(prompts=[[1, 50]], max_new_tokens=5), ["token id 50", "[0, 50)"]),
    (dict(prompts=[[1, -1]], max_new_tokens=5), ["token id -1"]),
    (dict(prompts=[[1]], max_new_tokens=5, top_p=0.0), ["top_p", "(0, 1]"]),
    (dict(prompts=[[1]], max_new_tokens=5, top_p=1.5), ["top_p"]),
    (dict(prompts=[[1]], max_new_tokens=5, temperature=-1.0), ["temperature must be in [0, 100] (0 means greedy)"]),
    (dict(prompts=[[1]], max_new_tokens=5, temperature=float("nan")), ["temperature must be in [0, 100]", "got nan"]),
    (dict(prompts=[[1]], max_new_tokens=5, temperature=float("inf")), ["temperature", "got inf"]),
    (dict(prompts=[[1]], max_new_tokens=0), ["max_new_tokens"]),
    (dict(prompts=[[1]], max_new_tokens=2**40), ["max_new_tokens must be in [1, 1000000], got 1099511627776"]),
    (dict(prompts=[], max_new_tokens=3), ["no prompts"]),
    (dict(prompts=[[1]], max_new_tokens=3, top_k=-1), ["top_k must be in [0, 1000000] (0 or None means off)", "got -1"]),
    (dict(prompts=[[1]], max_new_tokens=3, top_k=2**31), ["top_k must be in [0, 1000000]"]),
    (dict(prompts=[[1]], max_new_tokens=3, top_p=float("nan")), ["top_p must be in (0, 1], got nan"]),
])
def test_bad_input_is_refused_before_compiling(tiny, kwargs, words):
    config, params = tiny
    before = _generate._cache_size()
    with pytest.raises(GenerateError) as err:
        generate(config, params, **kwargs)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert _generate._cache_size() == before


def test_the_ends_of_each_accepted_range_and_the_default_temperature(tiny):
    """Token ids 0 and vocab - 1, temperature 0 (greedy), top_k 0 (off) and top_p 1 (off) are all accepted;
    the default temperature is 1, the default rng seed 0."""
    config, params = tiny
    prompts = [[0, 7, config.vocab_size - 1]]
    greedy, _ = generate(config, params, prompts, 6, greedy=True)
    assert generate(config, params, prompts, 6, temperature=0.0, top_k=0, top_p=1.0, rng=5)[0] == greedy
    seeded = generate(config, params, prompts, 6, rng=5)[0]
    assert seeded == generate(config, params, prompts, 6, temperature=1.0, rng=5)[0]
    assert seeded != generate(config, params, prompts, 6, temperature=2.0, rng=5)[0]
    # rng: an int seeds jax.random.key; None means seed 0
    default = generate(config, params, prompts, 6)[0]
    assert default == generate(config, params, prompts, 6, rng=jax.random.key(0))[0] == generate(config, params, prompts, 6, rng=0)[0]
    assert generate(config, params, prompts, 6, rng=jax.random.key(5))[0] == seeded
    assert generate(config, params, prompts, 6, rng=1)[0] != default


def cropped_greedy_reference(config, params, prompts, n):
    """nanoGPT's sample loop, one prompt at a time: crop the context to the last n_positions tokens,
    run the full model, take the argmax of the last position."""
    from gpt_jax import GPT

    forward = jax.jit(lambda ids: GPT(config).apply({"params": params}, ids)[0])
    out = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(n):
            context = seq[-config.n_positions:]
            # padded on the right to one shape (one compilation); causal, so the padding changes nothing before it
            logits = forward(np.array([context + [0] * (config.n_positions - len(context))]))[len(context) - 1]
            seq.append(int(np.argmax(logits)))
        out.append(seq[len(prompt):])
    return out


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt1-tiny"])
def test_past_the_context_window_conditions_on_the_last_n_positions(preset):
    config = GPTConfig.preset(preset, n_layer=2, n_positions=16, vocab_size=50)
    params = off_init(init_params(config, jax.random.key(1)), 10)
    # ragged prompts, left-padded together: shorter than the window, exactly the window, longer than it
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7], list(range(20, 36)), list(range(1, 21))]
    n = 40  # every row passes the 16-position window at least twice
    out, lengths = generate(config, params, prompts, n, greedy=True)
    assert lengths == [n] * len(prompts)
    assert out == cropped_greedy_reference(config, params, prompts, n)
    assert all(len(set(new[-20:])) > 2 for new in out), "degenerate reference; the test would prove little"
    # alone, each prompt gives the same tokens as in the batch; another length in the bucket does not compile
    before = _generate._cache_size()
    assert generate(config, params, prompts[1:], n - 7, greedy=True)[0] == [o[:n - 7] for o in out[1:]]
    assert _generate._cache_size() == before


def test_streaming_callback_sees_every_token(tiny):
    config, params = tiny
    seen = []
    out, _ = generate(config, params, [[1, 2], [5]], 8, greedy=True, on_token=lambda i, t: seen.append((i, t.copy())))
    assert [i for i, _ in seen] == list(range(8))
    assert [int(t[0]) for _, t in seen] == out[0] and [int(t[1]) for _, t in seen] == out[1]


def test_sample_cli_streams_from_hf_directory(tmp_path):
    root = data_path("tiny-gpt2")
    ref = json.loads((root / "reference_outputs.json").read_text())["cases"][0]
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", str(root), "--prompt", ref["text"],
                           "--max-new-tokens", "20", "--temperature", "0", "--tokenizer", str(data_path("gpt2-bpe"))],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from gpt_jax import load_tokenizer

    tok = load_tokenizer("gpt2", data_path("gpt2-bpe"))
    assert proc.stdout.strip() == tok.decode(ref["greedy_20"]).strip()
    assert "[20 tokens in" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "is not a training run" in bad.stderr


def test_sample_cli_defaults_run_past_a_small_context(tmp_path):
    """`python -m gpt_jax.sample --checkpoint RUN` with no options: its 200 new tokens exceed the
    32-position context of the run, as they exceed the shipped small configs' 64 to 256."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(data_path("tinyshakespeare", "input.txt").read_text()[:20_000])
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
                            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_positions=32",
                            "train.batch_size=4", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
                            "train.sample_tokens=0", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                            f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[200 tokens in" in proc.stderr and len(proc.stdout) >= 200


def test_sample_cli_defaults_fit_every_shipped_pretraining_context(monkeypatch, capsys):
    """`gpt_jax.sample.main` with no options but --checkpoint (200 new tokens, temperature 0.8) runs on a
    model with the context of each shipped pretraining config (fine-tuning configs take the model of
    their init_from run, gpt1_cpu_pretrain's), one layer wide enough to be quick."""
    import dataclasses

    from gpt_jax import sample
    from gpt_jax.config import load_config
    from gpt_jax.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("\n abcdefghijklmnopqrstuvwxyz")
    contexts = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        if config.mode == "pretrain":
            contexts.setdefault(config.model.n_positions, []).append(path.name)
    assert set(contexts) >= {64, 128, 256, 1024}, contexts
    for n_positions, names in sorted(contexts.items()):
        model = dataclasses.replace(TINY, n_layer=1, n_positions=n_positions, vocab_size=tok.vocab_size)
        params = init_params(model, jax.random.key(0))
        monkeypatch.setattr(sample, "load_for_sampling", lambda *_, m=model, p=params: (m, p, tok))
        assert sample.main(["--checkpoint", "run"]) == 0, names
        out, err = capsys.readouterr()
        assert "[200 tokens in" in err and len(out) == 1 + 200, (names, err)  # the prompt "\n", then 200 characters
