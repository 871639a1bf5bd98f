"""GPT-1 fine-tuning: special tokens, task transformations, heads and losses against transformers'
OpenAIGPTDoubleHeadsModel, bad task files, an SST-2 run that beats chance, predict, and zero-shot
evaluation (sliding-window perplexity, likelihood choice)."""

import dataclasses
import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, data_path
from gpt_jax.config import ConfigError, FinetuneConfig, GPTConfig, load_config
from gpt_jax.data import DataError
from gpt_jax.finetune import add_special_tokens, forward, init_head, losses, n_outputs
from gpt_jax.records import SpecialIds, encode_examples, make_batch, read_records
from gpt_jax.model import GPT, init_params, lm_loss
from gpt_jax.tokenizer import CharTokenizer

TOK = CharTokenizer("abcdefgh ")


def tiny(**kw):
    return GPTConfig.preset("gpt1-tiny", vocab_size=TOK.vocab_size, n_positions=32, **kw)


def test_special_tokens_grow_the_embedding_and_leave_the_model_unchanged():
    config = tiny()
    params = init_params(config, jax.random.key(0))
    grown_config, grown, ids = add_special_tokens(config, params, jax.random.key(1))
    V = config.vocab_size
    assert ids == SpecialIds(V, V + 1, V + 2) and grown_config.vocab_size == V + 3
    old, new = params["wte"]["embedding"], grown["wte"]["embedding"]
    np.testing.assert_array_equal(new[:V], old)
    assert new.shape == (V + 3, config.n_embd) and 0.01 < float(new[V:].std()) < 0.03  # N(0, 0.02)
    # an explicit std scales the same draws: N(0, std) from the same key
    _, scaled, _ = add_special_tokens(config, params, jax.random.key(1), std=0.5)
    np.testing.assert_allclose(scaled["wte"]["embedding"][V:], 25 * new[V:], rtol=1e-6)
    # the new rows take the embedding's dtype (a half-precision checkpoint stays half precision)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert add_special_tokens(config, half, jax.random.key(1))[1]["wte"]["embedding"].dtype == jnp.bfloat16
    tokens = jnp.array([[1, 2, 3, 4, 5]])
    # ordinary text gives the same logits over the old vocabulary (the output layer is tied)
    np.testing.assert_allclose(GPT(grown_config).apply({"params": grown}, tokens)[..., :V],
                               GPT(config).apply({"params": params}, tokens), atol=1e-6)


def test_a_new_head_is_drawn_from_n_0_initializer_range_with_one_output_per_label_or_per_choice():
    """The task head: a kernel [n_embd, outputs] drawn N(0, initializer_range) and a zero bias; one output per
    label, except multiple choice, which scores each choice with one output. On 768 x 2 draws the sample
    standard deviation is within 10% of 0.02 but for a chance of about 1e-7 (5.4 of its standard errors)."""
    labels = ["a", "b", "c", "d"]
    assert n_outputs(FinetuneConfig(task="multiple_choice"), labels) == 1
    for task in ("classification", "entailment", "similarity"):
        assert n_outputs(FinetuneConfig(task=task), labels) == 4
    head = init_head(GPTConfig.preset("gpt1-tiny", n_embd=768, n_head=12), 2, jax.random.key(3))
    assert head["kernel"].shape == (768, 2) and head["kernel"].dtype == jnp.float32
    assert abs(float(head["kernel"].std()) - 0.02) < 0.002 and abs(float(head["kernel"].mean())) < 0.002
    np.testing.assert_array_equal(head["bias"], np.zeros(2, np.float32))


def test_task_transformations_follow_figure_1(tmp_path):
    s, d, c = 100, 101, 102
    sp = SpecialIds(s, d, c)
    enc = TOK.encode
    cases = {
        "classification": ({"text": "sentence"}, {"sentence": "abc", "label": "1"}, [[s, *enc("abc"), c]]),
        "entailment": ({"text": "p", "text_b": "h"}, {"p": "ab", "h": "cd", "label": "1"},
                       [[s, *enc("ab"), d, *enc("cd"), c]]),
        "similarity": ({"text": "a", "text_b": "b"}, {"a": "ab", "b": "h", "label": "1"},
                       [[s, *enc("ab"), d, *enc("h"), c], [s, *enc("h"), d, *enc("ab"), c]]),
        "multiple_choice": ({"text": "q", "choices": "opts"}, {"q": "ab", "opts": ["c", "dd", "e"], "label": 2},
                            [[s, *enc("ab"), d, *enc(x), c] for x in ("c", "dd", "e")]),
    }
    for task, (fields, record, expected) in cases.items():
        cfg = FinetuneConfig(task=task, fields={**fields, "label": "label"}, labels=["0", "1"])
        ex = encode_examples([(2, record)], cfg, TOK, sp, 32, "f", ["0", "1"])
        got = [list(ex.tokens[0, j, :ex.lengths[0, j]]) for j in range(ex.tokens.shape[1])]
        assert got == expected, task
        assert ex.labels[0] == (2 if task == "multiple_choice" else 1)
    # over-long examples are cut (the longer part first) and counted
    cfg = FinetuneConfig(task="entailment", fields={"text": "p", "text_b": "h", "label": "label"})
    ex = encode_examples([(2, {"p": "abcdefgh", "h": "ab", "label": "0"})], cfg, TOK, sp, 8, "f", ["0", "1"])
    assert ex.truncated == 1 and list(ex.tokens[0, 0]) == [s, *enc("abc"), d, *enc("ab"), c]


def test_heads_and_losses_match_transformers_double_heads(tmp_path):
    torch = pytest.importorskip("torch", reason="torch runs the reference double-heads model")
    transformers = pytest.importorskip("transformers", reason="transformers' OpenAIGPTDoubleHeadsModel is the reference")
    from gpt_jax.pretrained import save_pretrained

    base = tiny()
    config, gpt, ids = add_special_tokens(base, init_params(base, jax.random.key(0)), jax.random.key(1))
    head = init_head(config, 1, jax.random.key(2))
    head["bias"] = jnp.array([0.3])
    params = {"gpt": gpt, "head": head}
    save_pretrained(config, gpt, tmp_path / "hf")
    hf = transformers.OpenAIGPTDoubleHeadsModel.from_pretrained(tmp_path / "hf", num_labels=1).eval()
    with torch.no_grad():
        hf.multiple_choice_head.summary.weight.copy_(torch.tensor(np.asarray(head["kernel"]).T))
        hf.multiple_choice_head.summary.bias.copy_(torch.tensor(np.asarray(head["bias"])))
    cfg = FinetuneConfig(task="multiple_choice", fields={"text": "q", "choices": "opts", "label": "label"})
    records = [(1, {"q": "abc de", "opts": ["f", "ghh a", "b"], "label": 1}),
               (2, {"q": "h", "opts": ["aaaa bbb", "c", "dd"], "label": 0})]
    ex = encode_examples(records, cfg, TOK, ids, 32, "f", None)
    batch = make_batch(ex, np.arange(2))
    task_loss, lm, scores = losses(config, "multiple_choice", params, batch)
    input_ids = torch.tensor(ex.tokens, dtype=torch.long)
    lm_labels = input_ids.clone()
    lm_labels[torch.arange(ex.tokens.shape[2]) >= torch.tensor(ex.lengths)[..., None]] = -100
    with torch.no_grad():
        out = hf(input_ids=input_ids, mc_token_ids=torch.tensor(ex.lengths - 1, dtype=torch.long), labels=lm_labels,
                 mc_labels=torch.tensor(ex.labels, dtype=torch.long))
    np.testing.assert_allclose(scores, out.mc_logits.numpy(), atol=2e-5)
    np.testing.assert_allclose(task_loss, out.mc_loss.item(), atol=2e-5)
    np.testing.assert_allclose(lm, out.loss.item(), atol=2e-5)


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_similarity_is_symmetric_and_choices_are_permutation_equivariant():
    base = tiny()
    config, gpt, ids = add_special_tokens(base, init_params(base, jax.random.key(0)), jax.random.key(1))
    sim = FinetuneConfig(task="similarity", fields={"text": "a", "text_b": "b", "label": "label"})
    ab = encode_examples([(1, {"a": "abc", "b": "hg e", "label": "0"})], sim, TOK, ids, 32, "f", ["0", "1"])
    ba = encode_examples([(1, {"a": "hg e", "b": "abc", "label": "0"})], sim, TOK, ids, 32, "f", ["0", "1"])
    params = {"gpt": gpt, "head": init_head(config, 2, jax.random.key(3))}
    la, _ = forward(config, "similarity", params, ab.tokens, ab.lengths)
    lb, _ = forward(config, "similarity", params, ba.tokens, ba.lengths)
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
    mc = FinetuneConfig(task="multiple_choice", fields={"text": "q", "choices": "o", "label": "label"})
    one = encode_examples([(1, {"q": "ab", "o": ["c", "dd", "eee"], "label": 0})], mc, TOK, ids, 32, "f", None)
    two = encode_examples([(1, {"q": "ab", "o": ["eee", "c", "dd"], "label": 0})], mc, TOK, ids, 32, "f", None)
    params["head"] = init_head(config, 1, jax.random.key(4))
    s1, _ = forward(config, "multiple_choice", params, one.tokens, one.lengths)
    s2, _ = forward(config, "multiple_choice", params, two.tokens, two.lengths)
    np.testing.assert_allclose(s2[0], s1[0][np.array([2, 0, 1])], rtol=1e-5, atol=1e-6)


def test_a_training_forward_pass_applies_the_transformer_s_dropout_and_an_evaluation_none():
    """Fine-tuning trains with the GPT's own dropout too, not only the classifier's: with resid_pdrop = 0.5 (and
    no classifier dropout) two copies of one example get other outputs in a training pass. An evaluation (the
    default, deterministic, also in `losses`) uses every unit: the same outputs for both. The classifier's
    dropout zeroes the state it reads, the rest scaled up."""
    base = tiny()
    grown, gpt, ids = add_special_tokens(base, init_params(base, jax.random.key(0)), jax.random.key(1))
    config = dataclasses.replace(grown, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.5)
    params = {"gpt": gpt, "head": init_head(config, 2, jax.random.key(3))}
    # the same example twice: each row draws its own dropout masks in training, none in evaluation
    tokens, lengths = jnp.array([[[ids.start, 1, 2, 3, ids.classify]]] * 2), jnp.array([[5]] * 2)
    trained, lm = forward(config, "classification", params, tokens, lengths, deterministic=False, rng=jax.random.key(5))
    assert not np.allclose(trained[0], trained[1]) and not np.allclose(lm[0], lm[1])
    evaluated, lm = forward(config, "classification", params, tokens, lengths)
    np.testing.assert_array_equal(evaluated[0], evaluated[1])
    batch = {"tokens": tokens, "lengths": lengths, "labels": jnp.array([1, 1]), "weight": jnp.array([0.5, 0.5]),
             "lm_weight": jnp.array([0.125, 0.125])}
    np.testing.assert_array_equal(losses(config, "classification", params, batch)[2], evaluated)
    # the classifier's own dropout, inverted at clf_pdrop: through an identity head each output is the evaluation's
    # state divided by 1 - p, or 0 (kept with probability 0.75: 2 x n_embd draws, the bounds are 4 standard errors)
    plain = dataclasses.replace(grown, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    eye = {"gpt": gpt, "head": {"kernel": jnp.eye(plain.n_embd), "bias": jnp.zeros(plain.n_embd)}}
    state, _ = forward(plain, "classification", eye, tokens, lengths)
    dropped, _ = forward(plain, "classification", eye, tokens, lengths, deterministic=False, rng=jax.random.key(7),
                         clf_pdrop=0.25)
    kept = np.asarray(dropped) != 0
    np.testing.assert_allclose(np.where(kept, dropped, 0), np.where(kept, np.asarray(state) / 0.75, 0), rtol=1e-5)
    assert abs(kept.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / kept.size), kept.mean()


def test_bad_task_files_name_file_and_line(tmp_path):
    sp = SpecialIds(100, 101, 102)
    cfg = FinetuneConfig(labels=["0", "1"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nabc\t1\nabd\t7\n")
    with pytest.raises(DataError, match=r"bad.tsv line 3: label '7' is not one of the declared labels \['0', '1'\]"):
        encode_examples(read_records(bad), cfg, TOK, sp, 32, bad, ["0", "1"])
    missing = tmp_path / "missing.tsv"
    missing.write_text("text\tlabel\nabc\t1\n")
    with pytest.raises(DataError, match=r"missing.tsv line 2: no field 'sentence' .*finetune.fields.text"):
        encode_examples(read_records(missing), cfg, TOK, sp, 32, missing, ["0", "1"])
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty.tsv has no examples"):
        read_records(empty)
    ragged = tmp_path / "ragged.jsonl"
    ragged.write_text('{"q": "a", "o": ["b", "c"], "label": 0}\n\n{"q": "a", "o": ["b", "c", "d"], "label": 0}\n')
    mc = FinetuneConfig(task="multiple_choice", fields={"text": "q", "choices": "o", "label": "label"})
    with pytest.raises(DataError, match="ragged.jsonl line 3: 3 choices, but earlier examples have 2"):
        encode_examples(read_records(ragged), mc, TOK, sp, 32, ragged, None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": "a"}\n{"q": \n')
    with pytest.raises(DataError, match="broken.jsonl line 2: not valid JSON"):
        read_records(broken)
    with pytest.raises(DataError, match="nowhere.tsv does not exist"):
        read_records(tmp_path / "nowhere.tsv")


def test_task_files_are_read_in_the_configured_format_and_cut_to_max_examples(tmp_path):
    from gpt_jax.finetune import _read_task_files

    with pytest.raises(ConfigError, match=r"^mode: finetune needs finetune.train_file \(a TSV or JSONL file of "
                                          r"labelled examples\)$"):
        _read_task_files(FinetuneConfig())
    rows = [{"sentence": "ab", "label": "1"}, {"sentence": "ba", "label": "0"}, {"sentence": "aa", "label": "1"}]
    (tmp_path / "train.data").write_text("".join(json.dumps(r) + "\n" for r in rows))  # no extension to go by
    (tmp_path / "dev.data").write_text(json.dumps(rows[1]) + "\n")
    files = {"train_file": str(tmp_path / "train.data"), "dev_file": str(tmp_path / "dev.data")}
    train, dev, labels = _read_task_files(FinetuneConfig(format="jsonl", max_examples=2, **files))
    assert train == [(1, rows[0]), (2, rows[1])] and dev == [(1, rows[1])] and labels == ["0", "1"]
    # auto: each file by its own extension
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nab\t1\nba\t0\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps(rows[2]) + "\n")
    train, dev, labels = _read_task_files(FinetuneConfig(train_file=str(tmp_path / "train.tsv"),
                                                         dev_file=str(tmp_path / "dev.jsonl")))
    assert train == [(2, rows[0]), (3, rows[1])] and dev == [(1, rows[2])] and labels == ["0", "1"]
    # multiple choice has no label set (the label is a choice index); a missing label column names the file
    mc = FinetuneConfig(task="multiple_choice", fields={"text": "sentence", "choices": "o", "label": "label"},
                        train_file=str(tmp_path / "train.tsv"))
    assert _read_task_files(mc)[2] is None
    (tmp_path / "nolabel.tsv").write_text("sentence\nab\n")
    with pytest.raises(DataError, match=r"nolabel.tsv line 2: no field 'label'"):
        _read_task_files(FinetuneConfig(train_file=str(tmp_path / "nolabel.tsv")))


# ---------------------------------------------------------------------------------------------------
# End to end on SST-2 slices


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sst2")
    lines = data_path("sst2", "train.tsv").read_text().splitlines()[1:20_001]
    (tmp / "sentences.txt").write_text("\n".join(line.split("\t")[0] for line in lines) + "\n")
    held = data_path("sst2", "train_heldout.tsv").read_text().splitlines()
    (tmp / "train.tsv").write_text("\n".join(held[:1201]) + "\n")
    return tmp


def run(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def pretrained(sst2):
    """A tiny GPT pretrained briefly on unlabelled SST-2 sentences (sentencepiece tokenizer)."""
    proc = run([str(ROOT / "train.py"), "model.preset=gpt2-tiny", "model.n_layer=2", "model.n_embd=64",
                "model.n_head=4", "model.n_positions=64", "model.vocab_size=1000",
                f"data.source={sst2 / 'sentences.txt'}", "data.tokenizer=sentencepiece",
                "data.sentencepiece_vocab_size=1000", "train.batch_size=16", "train.steps=40", "train.eval_every=40",
                "train.save_every=40", "train.eval_batches=2", "optim.lr=2e-3", "optim.warmup_steps=5",
                "train.out_dir=pre", "data.cache_dir=cache"], sst2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sst2 / "pre"


def test_finetune_from_a_pretrained_run_beats_chance_and_predicts(sst2, pretrained):
    dev = data_path("sst2", "dev.tsv")
    args = ["mode=finetune", f"finetune.init_from={pretrained}", f"finetune.train_file={sst2 / 'train.tsv'}",
            f"finetune.dev_file={dev}", "finetune.labels=[0, 1]", "finetune.lr=2e-3", "finetune.epochs=4",
            "finetune.dropout=0", "finetune.max_length=48", "train.out_dir=ft"]
    proc = run([str(ROOT / "train.py"), *args], sst2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "1200 training examples, 872 dev" in out
    assert "truncated" in out and "to 48 tokens (finetune.max_length)" in out
    records = [json.loads(line) for line in (sst2 / "ft" / "metrics.jsonl").read_text().splitlines()]
    accs = [r["dev_accuracy"] for r in records if r["kind"] == "eval"]
    assert len(accs) == 4
    # chance on the 872 dev sentences is 0.51 (444 positive); 0.56 is 3 standard errors above it
    assert max(accs) > 0.56, accs
    assert f"best dev accuracy {max(accs):.4f}" in out

    # pretrained rows unchanged: the fine-tuning run started from the pretrained weights
    from gpt_jax.finetune import load_base, load_finetuned
    from gpt_jax.runs import load_run

    _, pre_params, _ = load_run(pretrained)
    model, ft_params, _, meta = load_finetuned(sst2 / "ft")
    assert meta["special_ids"] == {"start": 1000, "delimiter": 1001, "classify": 1002}
    assert model.vocab_size == 1003 and ft_params["head"]["kernel"].shape == (64, 2)
    cfg = load_config(None, ["mode=finetune", f"finetune.init_from={pretrained}"])
    _, base_params, _ = load_base(cfg.finetune, cfg, jax.random.key(0))
    np.testing.assert_array_equal(base_params["wte"]["embedding"], pre_params["wte"]["embedding"])

    # predict with the best checkpoint: the same dev accuracy as the run reported
    proc = run(["-m", "gpt_jax.predict", "--checkpoint", "ft", "--input", str(dev), "--output", "pred.tsv"], sst2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"accuracy {max(accs):.4f}" in proc.stdout
    lines = (sst2 / "pred.tsv").read_text().splitlines()
    assert lines[0] == "prediction\tp_0\tp_1" and len(lines) == 873
    assert all(line.split("\t")[0] in ("0", "1") for line in lines[1:])

    # the same command again resumes the finished run: nothing is trained twice
    proc = run([str(ROOT / "train.py"), *args], sst2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step 152" in proc.stdout and "epoch 4:" not in proc.stdout


def test_zero_shot_evaluate_commands(sst2, pretrained):
    dev = data_path("sst2", "dev.tsv")
    proc = run(["-m", "gpt_jax.evaluate", "--checkpoint", str(pretrained), "choice", "--input", str(dev),
                "--labels", "0", "1", "--candidates", " bad", " good", "--template", "{text} it 's"], sst2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = float(proc.stdout.split("zero-shot accuracy ")[1].split()[0])
    assert 0.0 <= acc <= 1.0 and "on 872 examples" in proc.stdout
    (sst2 / "text.txt").write_text(" ".join(dev.read_text().splitlines()[1:40]))
    proc = run(["-m", "gpt_jax.evaluate", "--checkpoint", str(pretrained), "perplexity", "--input", "text.txt",
                "--stride", "32"], sst2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stride 32" in proc.stdout and float(proc.stdout.split()[1]) < 1000  # vocab 1000: uniform would be 1000
    proc = run(["-m", "gpt_jax.evaluate", "--checkpoint", str(pretrained), "choice", "--input", str(dev),
                "--labels", "0", "1"], sst2)
    assert proc.returncode == 2 and "--labels and --candidates" in proc.stderr


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_sliding_window_perplexity_and_choice_scores_against_direct_computation():
    from gpt_jax.scoring import continuation_logprobs, perplexity

    config = GPTConfig.preset("gpt2-tiny", vocab_size=50, n_positions=8)
    params = init_params(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 50, 30)

    forward = jax.jit(GPT(config).apply)  # a plain forward, compiled once per context length (at most 8)

    def logp_direct(context, target):  # log p(target | context), one forward per token
        logits = forward({"params": params}, jnp.asarray(context)[None])
        return float(jax.nn.log_softmax(logits[0, -1])[target])

    # a text that fits the context: every stride gives the model's plain LM loss
    short = ids[:9]
    loss = float(lm_loss(GPT(config).apply({"params": params}, jnp.asarray(short[:-1])[None]), jnp.asarray(short[1:])[None]))
    for stride in (1, 3, 8):
        assert math.isclose(perplexity(config, params, short, stride)["nll"], loss, rel_tol=1e-5)
    # stride 1: token k is scored once, with the previous min(k, context) tokens
    nll = -np.mean([logp_direct(ids[max(0, k - 8):k], ids[k]) for k in range(1, 30)])
    r = perplexity(config, params, ids, stride=1)
    assert r["tokens"] == 29 and math.isclose(r["nll"], nll, rel_tol=1e-5)
    # stride = context: non-overlapping windows; token k sees the tokens since its window began
    nll = -np.mean([logp_direct(ids[(k - 1) // 8 * 8:k], ids[k]) for k in range(1, 30)])
    assert math.isclose(perplexity(config, params, ids, stride=8)["nll"], nll, rel_tol=1e-5)
    # continuation scores: the sum of per-token log-probs after the prompt
    prompts, conts = [list(ids[:3]), list(ids[5:10])], [list(ids[20:22]), list(ids[11:12])]
    got = continuation_logprobs(config, params, prompts, conts)
    for g, p, c in zip(got, prompts, conts):
        seq = p + c
        want = sum(logp_direct(seq[:len(p) + i], c[i]) for i in range(len(c)))
        assert math.isclose(g, want, rel_tol=1e-5)


def test_init_from_a_hugging_face_directory_and_reinit(tmp_path):
    from gpt_jax.finetune import load_base
    from gpt_jax.pretrained import save_pretrained

    config = GPTConfig.preset("gpt2-tiny", vocab_size=50257, n_embd=32, n_head=2, n_layer=1, n_positions=16)
    params = init_params(config, jax.random.key(5))
    save_pretrained(config, params, tmp_path / "hf")
    cfg = load_config(None, ["mode=finetune", f"finetune.init_from={tmp_path / 'hf'}"])
    model, loaded, tok = load_base(cfg.finetune, cfg, jax.random.key(0))
    assert model.n_embd == 32 and tok.kind == "gpt2"  # the GPT-2 BPE for a GPT-2 directory without its files
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    cfg = load_config(None, ["mode=finetune", f"finetune.init_from={tmp_path / 'hf'}", "finetune.reinit=true"])
    _, fresh, _ = load_base(cfg.finetune, cfg, jax.random.key(0))
    assert not np.allclose(fresh["wte"]["embedding"], params["wte"]["embedding"])
    (tmp_path / "weights.bin").write_bytes(b"not a folder")
    cfg = load_config(None, ["mode=finetune", f"finetune.init_from={tmp_path / 'weights.bin'}"])
    with pytest.raises(ConfigError, match=re.escape(
            f"finetune.init_from={tmp_path / 'weights.bin'} is not a directory; give a training run directory, a Hugging "
            "Face GPT-2 / OpenAI-GPT directory, or a model name (gpt2, openai-gpt, ...)")):
        load_base(cfg.finetune, cfg, jax.random.key(0))
    cfg = load_config(None, ["mode=finetune", f"finetune.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(Exception, match="is not a directory"):
        load_base(cfg.finetune, cfg, jax.random.key(0))
    (tmp_path / "hf" / "finetune.json").write_text("{}")  # as a fine-tuning run's folder has
    cfg = load_config(None, ["mode=finetune", f"finetune.init_from={tmp_path / 'hf'}"])
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path / 'hf'))} is a fine-tuning run; init_from takes a "
                                          "pretrained model$"):
        load_base(cfg.finetune, cfg, jax.random.key(0))


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_transfer_layers_takes_the_first_blocks_and_initialises_the_rest(tmp_path):
    from gpt_jax.finetune import FinetuneTask
    from gpt_jax.parallel import Single
    from gpt_jax.pretrained import save_pretrained

    data_path("gpt2-bpe")  # the tokenizer of a Hugging Face GPT-2 directory without tokenizer files
    config = GPTConfig.preset("gpt2-tiny", vocab_size=50257, n_embd=32, n_head=2, n_layer=3, n_positions=16)
    leaves, treedef = jax.tree.flatten(init_params(config, jax.random.key(5)))
    # moved off any initialisation (LayerNorms start at 1 and 0), so pretrained and fresh differ everywhere
    params = treedef.unflatten([x + 0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])
    save_pretrained(config, params, tmp_path / "hf")
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")

    def initial_gpt_params(*overrides):
        cfg = load_config(None, ["mode=finetune", f"finetune.init_from={tmp_path / 'hf'}", "train.seed=3",
                                 f"finetune.train_file={tmp_path / 't.tsv'}", f"train.out_dir={tmp_path / 'run'}",
                                 *overrides])
        task = FinetuneTask(cfg, verbose=False)
        lines.append(task.describe())
        return task.initial_state(Single(task.config)).params["gpt"]

    lines = []
    fresh = initial_gpt_params("finetune.reinit=true")  # the random-initialisation baseline, same seed
    rest = ": 2 training examples; 1 sequence(s) of 8 tokens per example; batch 32, 3 epochs = 3 steps; lm_coef 0.5"
    assert lines == [[f"fine-tuning (classification, labels ['0', '1']) from {tmp_path / 'hf'} (re-initialised){rest}"]]
    V = config.vocab_size
    for n in (0, 1, 3):
        got = initial_gpt_params(f"finetune.transfer_layers={n}")
        assert lines[-1] == [f"fine-tuning (classification, labels ['0', '1']) from {tmp_path / 'hf'} (embeddings and "
                             f"{n} block(s) transferred){rest}"]
        np.testing.assert_array_equal(got["wte"]["embedding"][:V], params["wte"]["embedding"])  # + 3 special rows
        np.testing.assert_array_equal(got["wpe"]["embedding"], params["wpe"]["embedding"])
        for g, p, f in zip(jax.tree.leaves(got["h"]), jax.tree.leaves(params["h"]), jax.tree.leaves(fresh["h"]),
                           strict=True):  # every block leaf is there
            np.testing.assert_array_equal(g[:n], p[:n])
            np.testing.assert_array_equal(g[n:], f[n:])
            assert not np.any(np.isclose(f[n:], p[n:]))
        expected_ln_f = params["ln_f"] if n == 3 else fresh["ln_f"]
        jax.tree.map(np.testing.assert_array_equal, got["ln_f"], expected_ln_f)
    with pytest.raises(ConfigError, match=r"transfer_layers=4 is more than the 3 blocks of .*; give 0..3"):
        initial_gpt_params("finetune.transfer_layers=4")
    with pytest.raises(ConfigError, match="finetune.transfer_layers must be >= 0, got -1"):
        initial_gpt_params("finetune.transfer_layers=-1")
    with pytest.raises(ConfigError, match="set finetune.init_from"):
        load_config(None, ["mode=finetune", "finetune.transfer_layers=1"])
    with pytest.raises(ConfigError, match=r"\(and reinit false\)"):
        initial_gpt_params("finetune.transfer_layers=1", "finetune.reinit=true")


@pytest.mark.usefixtures("unoptimized")  # compares runs compiled alike (conftest.compiled_alike)
def test_zero_shot_multiple_choice_picks_the_most_likely_choice(tmp_path):
    from gpt_jax.scoring import choice_accuracy, continuation_logprobs

    config = GPTConfig.preset("gpt2-tiny", vocab_size=TOK.vocab_size, n_positions=16)
    params = init_params(config, jax.random.key(7))
    path = tmp_path / "mc.jsonl"
    rows = [{"ctx": "abc", "options": ["de", "fgh", "a"], "answer": i % 3} for i in range(3)]
    rows.append({"ctx": "hhg", "options": ["a", "b", "c"], "answer": 1})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = choice_accuracy(config, params, TOK, read_records(path), text_field="ctx", label_field="answer",
                        choices_field="options", path=path)
    for row, pred in zip(rows, r["predictions"]):
        scores = continuation_logprobs(config, params, [TOK.encode(row["ctx"])] * 3,
                                       [TOK.encode(o) for o in row["options"]])
        assert pred == int(np.argmax(scores))
    assert r["accuracy"] == np.mean([p == row["answer"] for p, row in zip(r["predictions"], rows)])
    path.write_text(json.dumps({"ctx": "a", "options": ["b", "c"], "answer": 5}) + "\n")
    with pytest.raises(DataError, match="mc.jsonl line 1: label '5' is not a choice index in 0..1"):
        choice_accuracy(config, params, TOK, read_records(path), text_field="ctx", label_field="answer",
                        choices_field="options", path=path)
