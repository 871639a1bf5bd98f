"""The GPT-2 paper's zero-shot LM protocol (gpt_jax.zeroshot) against direct computation on small cases."""

import json
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import data_path
from gpt_jax import GPT, GPTConfig, init_params
from gpt_jax.generate import generate
from gpt_jax.tokenizer import CharTokenizer
from gpt_jax.zeroshot import (lambada, lambada_examples, language_modelling, ptb_detokenize, word_count,
                              wikitext_detokenize)

# each test compares the protocol with a direct computation on the same model (conftest.compiled_alike)
pytestmark = pytest.mark.usefixtures("unoptimized")

TOK = CharTokenizer(sorted(set(string.printable)))
CFG = GPTConfig(vocab_size=TOK.vocab_size, n_positions=96, n_embd=32, n_layer=2, n_head=2, pad_vocab_multiple=32)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def direct_logprobs(cfg, params, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from one plain forward pass."""
    logits = jax.jit(GPT(cfg).apply)({"params": params}, np.asarray([ids[:-1]], np.int32))[0]
    return np.asarray(jax.nn.log_softmax(logits), np.float64)[np.arange(len(ids) - 1), ids[1:]], np.asarray(logits)


def test_detokenizers():
    assert wikitext_detokenize(" = = Early life = = \n") == " == Early life ==\n"
    assert wikitext_detokenize("a 1 @,@ 000 @-@ year span , in ( 1990 ) Teddy 's . \n") == \
        "a 1,000-year span, in (1990) Teddy's.\n"
    assert ptb_detokenize("it was n't the dow 's fault at $ N a share \n") == "it wasn't the dow's fault at $1 a share\n"


def test_word_counts_are_the_published_ones():
    assert word_count(data_path("wikitext-2", "wiki.test.tokens").read_text()) == 245_569
    assert word_count(data_path("ptb", "ptb.test.txt").read_text()) == 82_430


def test_lambada_plain_split_is_the_same_passages_lowercased_and_tokenised():
    from gpt_jax.zeroshot import data_file

    root = data_path("lambada").parent
    cased, plain = (lambada_examples(data_file("lambada", split, root)) for split in ("test", "plain"))
    assert len(cased) == len(plain) == 5153
    assert all(word == word.lower() for _, word in plain)
    assert sum(p[1] == c[1].lower() for c, p in zip(cased, plain)) > 0.95 * 5153  # the same target words


def test_language_modelling_equals_direct_computation(params):
    text = " = Homarus = \n the lobster 's claws , at 1 @.@ 5 m , grow . \n"
    r = language_modelling(CFG, params, TOK, text, wikitext_detokenize)
    ids = TOK.encode(wikitext_detokenize(text))
    assert len(ids) <= CFG.n_positions + 1  # one window: every target scored with all of its past
    logp, _ = direct_logprobs(CFG, params, ids)
    assert r["tokens"] == len(ids) - 1 and r["words"] == len(text.split()) + 2
    np.testing.assert_allclose(r["nll"], -logp.mean(), rtol=1e-5)
    np.testing.assert_allclose(r["word_perplexity"], math.exp(-logp.sum() / r["words"]), rtol=1e-5)


def test_lambada_accuracy_and_perplexity_equal_direct_computation(tmp_path):
    """Targets of several characters (multi-token words). The model is first taught the cycle "abc abc ...",
    so whole-word hits ("abc"), partial hits ("abm": only its last token is missed) and misses all occur."""
    tok = CharTokenizer(sorted(set("abcmno ")))
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_vocab_multiple=8)
    params = init_params(cfg, jax.random.key(1))
    batch = np.asarray([tok.encode(("abc " * 10)[i:i + 25]) for i in range(4)], np.int32)
    opt = optax.adam(1e-2)
    loss = lambda p: -jnp.mean(jax.nn.log_softmax(GPT(cfg).apply({"params": p}, batch[:, :-1]))
                               [np.arange(4)[:, None], np.arange(24), batch[:, 1:]])

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(100):
        params, state = step(params, state)
    passages = ["abc abc abc abc", "c abc abc abc", "abc abc abc abm", "abc abc mno", "bc abc abc mno",
                "abc abc abc abcab", "abc ab", "b abc abc abc"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps({"text": p}) for p in passages) + "\n")
    examples = lambada_examples(path)
    assert [c + " " + w for c, w in examples] == passages
    r = lambada(cfg, params, tok, examples, batch_size=3)
    nll, hits, partial = [], [], 0
    for context, word in examples:
        ctx, tgt = tok.encode(context), tok.encode(" " + word)
        logp, logits = direct_logprobs(cfg, params, ctx + tgt)
        nll.append(-logp[-len(tgt):].sum())
        token_hits = [np.argmax(logits[len(ctx) - 1 + j]) == t for j, t in enumerate(tgt)]
        partial += any(token_hits) and not all(token_hits)
        hits.append(all(token_hits))
        greedy, _ = generate(cfg, params, [ctx], len(tgt), greedy=True)
        assert hits[-1] == (greedy[0] == tgt)  # whole-word greedy: every token of the word
    assert r["n"] == 8 and 0 < sum(hits) < 8 and partial > 0
    assert r["accuracy"] == np.mean(hits)
    np.testing.assert_allclose(r["perplexity"], math.exp(np.mean(nll)), rtol=1e-5)


def test_lambada_scores_the_target_as_the_passage_writes_it_with_sentencepiece(tmp_path):
    """A sentencepiece vocabulary writes " word" alone as "▁" + "▁word" but inside the passage as "▁word":
    the score is that of the passage's own encoding, its tokens after the context's."""
    from gpt_jax.tokenizer import SentencePieceTokenizer

    lines = [line.split("\t")[0] for line in data_path("sst2", "dev.tsv").read_text().splitlines()[1:200]]
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    tok = SentencePieceTokenizer.train(tmp_path / "text.txt", tmp_path / "sp", vocab_size=500)
    passages = [line.strip() for line in lines[:3]]
    examples = [tuple(p.rsplit(" ", 1)) for p in passages]
    assert tok.encode(" " + examples[0][1])[0] != tok.encode(passages[0])[len(tok.encode(examples[0][0]))]
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)
    params = init_params(cfg, jax.random.key(2))
    nll = []
    for passage, (context, _) in zip(passages, examples):
        whole, n_ctx = tok.encode(passage), len(tok.encode(context))
        assert whole[:n_ctx] == tok.encode(context)
        logp, _ = direct_logprobs(cfg, params, whole)
        nll.append(-logp[-(len(whole) - n_ctx):].sum())
    r = lambada(cfg, params, tok, examples, batch_size=4)
    np.testing.assert_allclose(r["perplexity"], math.exp(np.mean(nll)), rtol=1e-5)


def test_benchmark_command_scores_the_test_file(tmp_path, capsys):
    """`python -m gpt_jax.evaluate benchmark lambada` on a GPT-2 checkpoint: its figures equal a direct
    per-passage computation; a missing test file is one line naming the folder to give."""
    from gpt_jax import load_pretrained
    from gpt_jax.evaluate import main
    from gpt_jax.tokenizer import load_tokenizer

    model_dir, bpe_dir = data_path("tiny-gpt2"), data_path("gpt2-bpe")
    (tmp_path / "lambada").mkdir()
    lines = data_path("lambada", "lambada_test.jsonl").read_text().splitlines()[:5]
    (tmp_path / "lambada" / "lambada_test.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--checkpoint", str(model_dir), "--tokenizer", str(bpe_dir), "benchmark", "lambada"]
    assert main(args + ["--data-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    config, params = load_pretrained(model_dir)
    tok = load_tokenizer(bpe_dir)
    nll = []
    for line in lines:
        context, _, word = json.loads(line)["text"].rpartition(" ")
        ctx, tgt = tok.encode(context), tok.encode(" " + word)
        logits = GPT(config).apply({"params": params}, np.asarray([ctx + tgt[:-1]], np.int32))[0]
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
        nll.append(-sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(tgt)))
    assert f"perplexity {math.exp(np.mean(nll)):.2f} over 5 passages" in printed
    assert main(args + ["--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "give --data-dir" in capsys.readouterr().err


def sst2_direct(cfg, params, tok, lines, cue=" very", words=(" negative", " positive")):
    """(accuracy, fraction positive, AUC) of GPT-1's heuristic on TSV lines: log p(word | sentence + cue)
    summed over the word's tokens, from one plain forward pass over the right-padded sequences (causal:
    the padding changes no earlier logit)."""
    seqs, gold = [], []
    for line in lines:
        sentence, label = line.split("\t")
        prompt = tok.encode(sentence.strip() + cue)
        for word in words:
            ids = tok.encode(sentence.strip() + cue + word)
            assert ids[:len(prompt)] == prompt
            seqs.append((ids, len(prompt)))
        gold.append(int(label))
    tokens = np.zeros((len(seqs), max(len(ids) for ids, _ in seqs)), np.int32)
    assert tokens.shape[1] <= cfg.n_positions  # every word scored with the whole sentence before it
    for row, (ids, _) in enumerate(seqs):
        tokens[row, :len(ids)] = ids
    logits = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))(params, tokens)
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    scores = [sum(logp[row, t - 1, ids[t]] for t in range(n, len(ids))) for row, (ids, n) in enumerate(seqs)]
    preds = np.argmax(np.reshape(scores, (-1, 2)), axis=1)
    margin = np.reshape(scores, (-1, 2)) @ [-1, 1]
    pairs = [(m1 > m0) + 0.5 * (m1 == m0) for m1, g1 in zip(margin, gold) if g1 for m0, g0 in zip(margin, gold) if not g0]
    return np.mean(preds == gold), np.mean(preds), np.mean(pairs)


def sst2_model(cfg, seed):
    """A random model whose position embeddings are as large as its token embeddings, so that its
    preference between the two words varies with the sentence (the last input is always " very")."""
    params = init_params(cfg, jax.random.key(seed))
    params["wpe"]["embedding"] = params["wpe"]["embedding"] * 50
    return params


def test_sst2_zero_shot_sums_the_log_probabilities_of_each_words_tokens(tmp_path):
    from gpt_jax.zeroshot import sst2

    lines = data_path("sst2", "dev.tsv").read_text().splitlines()[:25]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n")  # SST-2's sentences end in a space
    tok = CharTokenizer(sorted(set("".join(lines[1:]) + "very positive negative") - {"\t"}))
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5)
    params = sst2_model(cfg, 0)
    r = sst2(cfg, params, tok, tmp_path / "dev.tsv")  # " positive" and " negative": 9 tokens each
    accuracy, positive, auc = sst2_direct(cfg, params, tok, lines[1:])
    assert r["n"] == 24 and 0 < positive < 1 and 0 < auc < 1
    assert r["accuracy"] == accuracy and r["positive"] == positive
    np.testing.assert_allclose(r["auc"], auc, atol=1e-12)  # the pairwise count, ties half
    from gpt_jax.zeroshot import auc as area
    assert area(np.array([1.0, 1.0, 2.0, 0.0]), np.array([1, 0, 1, 0])) == 0.875  # one tie: (1 + 1 + 0.5 + 1) / 4


def test_sst2_zero_shot_takes_another_prompt_and_its_auc_flips_with_the_words(tmp_path):
    """A prompt of one's own (benchmarks/gpt1_fig2.py's verbalizers) scores as the direct computation does;
    swapping which word stands for positive turns the AUC into 1 - AUC."""
    from gpt_jax.zeroshot import sst2

    lines = data_path("sst2", "dev.tsv").read_text().splitlines()[:25]
    (tmp_path / "dev.tsv").write_text("\n".join(lines) + "\n")
    tok = CharTokenizer(sorted(set("".join(lines[1:]) + "it was great terrible") - {"\t"}))
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5)
    params = sst2_model(cfg, 1)
    prompt = {"template": "{text} it was", "candidates": [" terrible", " great"]}
    r = sst2(cfg, params, tok, tmp_path / "dev.tsv", prompt)
    accuracy, positive, auc = sst2_direct(cfg, params, tok, lines[1:], " it was", (" terrible", " great"))
    assert 0 < positive < 1 and r["accuracy"] == accuracy and r["positive"] == positive
    np.testing.assert_allclose(r["auc"], auc, atol=1e-12)
    swapped = sst2(cfg, params, tok, tmp_path / "dev.tsv", {**prompt, "candidates": [" great", " terrible"]})
    np.testing.assert_allclose(swapped["auc"], 1 - r["auc"], atol=1e-12)
    assert swapped["positive"] == pytest.approx(1 - r["positive"])  # no ties between the two words


def test_sst2_zero_shot_command_evaluates_each_kept_step(tmp_path, capsys):
    """`evaluate --step N benchmark sst2` on two kept checkpoints of a run with a sentencepiece vocabulary,
    which writes " positive" alone as "▁" + "▁positive" but after "very" as "▁positive"."""
    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.config import Config, TrainConfig, save_config
    from gpt_jax.evaluate import main
    from gpt_jax.tokenizer import SentencePieceTokenizer

    lines = data_path("sst2", "dev.tsv").read_text().splitlines()[:25]
    words = ["very positive", "very negative"] * 500  # one piece each
    (tmp_path / "text.txt").write_text("\n".join([line.split("\t")[0] for line in lines[1:]] + words) + "\n")
    tok = SentencePieceTokenizer.train(tmp_path / "text.txt", tmp_path / "sp", vocab_size=500)
    very = tok.encode("it 's very")
    assert [tok.encode("it 's very" + w)[len(very):] for w in (" positive", " negative")] == \
        [tok.encode(w)[1:] for w in (" positive", " negative")]  # not the lone "▁" piece first
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "dev.tsv").write_text("\n".join(lines) + "\n")
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5)
    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(model=cfg, train=TrainConfig(out_dir=str(run))), run / "config.yaml")
    (run / "tokenizer.json").write_text(json.dumps(tok.spec()))
    ckpt = Checkpointer(run, keep=2)
    models = {step: sst2_model(cfg, step) for step in (10, 20)}
    for step, params in models.items():
        ckpt.save(step, {"params": params}, {})
    ckpt.wait()
    ckpt.close()
    args = ["--checkpoint", str(run), "benchmark", "sst2", "--data-dir", str(tmp_path)]
    for step, params in models.items():
        assert main(args[:2] + ["--step", str(step)] + args[2:]) == 0
        accuracy, positive, auc = sst2_direct(cfg, params, tok, lines[1:])
        out = capsys.readouterr().out
        assert f"sst2: zero-shot accuracy {accuracy:.4f} on 24 sentences ({positive:.1%} predicted positive" in out
        assert f"AUC {auc:.4f}" in out
    assert sst2_direct(cfg, models[10], tok, lines[1:]) != sst2_direct(cfg, models[20], tok, lines[1:])
    assert main(args[:2] + ["--step", "15"] + args[2:]) == 2
    assert "has no checkpoint at step 15; its checkpoints are at steps [10, 20]" in capsys.readouterr().err
