"""HellaSwag (gpt_jax.hellaswag): lm-eval's preprocessing on its documented examples, and the four
accuracies of `evaluate benchmark hellaswag` against a direct computation on a hand-made file."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import data_path
from gpt_jax import GPT, GPTConfig, init_params, save_pretrained
from gpt_jax.hellaswag import preprocess, read_examples

pytestmark = pytest.mark.usefixtures("unoptimized")  # both sides of each comparison compile alike

# The example item quoted in karpathy/llm.c dev/data/hellaswag.py's docstring (rowanz/hellaswag, ind 24).
ROOF = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        "source_id": "activitynet~v_-JhWjGDPHMY"}
# The start of example 50476's ctx_a, quoted in EleutherAI/lm-evaluation-harness pull request 608 ("[Refactor]
# Hellaswag"), which describes the preprocessing: bracketed WikiHow markers such as [step] removed, [title] made
# a sentence break.
BRONZE = ("[header] How to make bronze color eyeshadow [title] If you don't want the hassle, and don't want to try "
          "your own, you could always just search for your perfect colour. [title] Go to the stores. [step] They are "
          "often cheaper in stores")


def test_preprocessing_follows_lm_eval_on_its_documented_examples(tmp_path):
    """lm-eval's utils.py: preprocess(text) strips, turns " [title]" into ". ", removes every [...] and then
    replaces double spaces once; the query is preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()). The expected strings were worked out by hand from those rules, artefacts included:
    the space left where [header] stood, and ".." where a sentence ended before [title]."""
    assert preprocess(BRONZE) == (
        " How to make bronze color eyeshadow. If you don't want the hassle, and don't want to try your own, you could "
        "always just search for your perfect colour.. Go to the stores. They are often cheaper in stores")
    assert preprocess("a [x] [y] b") == "a  b"  # one pass of "  " -> " ": three spaces leave two
    assert preprocess("  Wash it. [step]  ") == "Wash it. "  # stripped before the marker goes
    path = tmp_path / "hellaswag_val.jsonl"
    write(path, [ROOF, {**ROOF, "ctx_b": "THE man", "activity_label": "Roof [x]shingle removal", "label": "0"}])
    examples, warning = read_examples(path)
    assert examples[0].query == "Roof shingle removal: A man is sitting on a roof. He"
    assert examples[0].choices == tuple(ROOF["endings"]) and examples[0].label == 3
    assert examples[0].ctx == ROOF["ctx"] and examples[0].endings == tuple(ROOF["endings"])  # llm.c: raw
    assert examples[1].query == "Roof shingle removal: A man is sitting on a roof. The man"  # str.capitalize()
    assert examples[1].label == 0 and warning is not None


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# A hand-made validation file: ActivityNet and WikiHow styles, an ending that preprocesses with a leading
# space, a query that ends in a space once its marker goes, a label written as a string (the Hugging Face copy).
FILE = [
    ROOF,
    {**ROOF, "ind": 1, "activity_label": "Personal Care and Style", "ctx_b": "", "label": 1,
     "ctx_a": "[header] How to make bronze color eyeshadow [title] Go to the stores. [step] They are often cheaper",
     "ctx": "[header] How to make bronze color eyeshadow [title] Go to the stores. [step] They are often cheaper",
     "endings": ["in stores than online.", "[substeps] Look for a shade that suits you.", "and blue.",
                 "than a car [title] Buy two."]},
    {**ROOF, "ind": 2, "activity_label": "Cleaning", "ctx_a": "Wash the brush. [step]", "ctx_b": "",
     "ctx": "Wash the brush. [step]", "label": "2",
     "endings": ["Dry it.", "Then rinse the brush well under warm water.", "It flies away over the hills.", "No."]},
    {**ROOF, "ind": 3, "activity_label": "Playing guitar", "ctx_a": "A boy holds a guitar on a stage.",
     "ctx_b": "THE boy", "ctx": "A boy holds a guitar on a stage. THE boy", "label": 0,
     "endings": ["strums the strings and sings.", "eats it.", "plays a long song for the crowd in the hall.",
                 "is."]},
]
# lm-eval's rendering of FILE, worked out by hand from its rules (query, choices)
LM_EVAL = [
    ("Roof shingle removal: A man is sitting on a roof. He", ROOF["endings"]),
    ("Personal Care and Style: How to make bronze color eyeshadow. Go to the stores. They are often cheaper",
     ["in stores than online.", " Look for a shade that suits you.", "and blue.", "than a car. Buy two."]),
    ("Cleaning: Wash the brush. ", FILE[2]["endings"]),
    ("Playing guitar: A boy holds a guitar on a stage. The boy", FILE[3]["endings"]),
]


def direct_scores(cfg, params, tok):
    """Per example and ending: (lm-eval sum, llm.c sum, llm.c token count), tokenised as each source does.
    lm-eval's _encode_pair: the context's trailing spaces move to the continuation, whose tokens are those of
    context + continuation after the context's. llm.c: encode(ctx) + encode(" " + ending). One forward pass over
    the right-padded sequences (causal: the padding changes no earlier logit)."""
    seqs = []
    for (query, choices), record in zip(LM_EVAL, FILE):
        context = query.rstrip()
        for choice in choices:
            n_ctx = len(tok.encode(context))
            seqs.append((tok.encode(query + " " + choice), n_ctx))
        for ending in record["endings"]:
            ctx = tok.encode(record["ctx"])
            seqs.append((ctx + tok.encode(" " + ending), len(ctx)))
    tokens = np.zeros((len(seqs), max(len(ids) for ids, _ in seqs)), np.int32)
    for row, (ids, _) in enumerate(seqs):
        tokens[row, :len(ids)] = ids
    logits = jax.jit(GPT(cfg).apply)({"params": params}, tokens[:, :-1])
    logp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0], np.float64)
    sums = np.array([logp[row, n - 1:len(ids) - 1].sum() for row, (ids, n) in enumerate(seqs)])
    counts = np.array([len(ids) - n for ids, n in seqs])
    return sums.reshape(len(FILE), 2, 4), counts.reshape(len(FILE), 2, 4)


def test_benchmark_command_scores_as_lm_eval_and_llm_c_do(tmp_path, capsys, monkeypatch):
    """`evaluate benchmark hellaswag` on a GPT-2-vocabulary model: each accuracy and the predictions behind it
    equal a direct computation; a file other than the published one is scored, with a warning line."""
    from gpt_jax import hellaswag
    from gpt_jax.evaluate import main
    from gpt_jax.tokenizer import load_tokenizer

    bpe = data_path("gpt2-bpe")
    tok = load_tokenizer("gpt2", bpe)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=128, n_embd=16, n_layer=2, n_head=2, initializer_range=0.3)
    params = jax.jit(lambda key: init_params(cfg, key))(jax.random.key(3))  # one compilation, not one per op
    save_pretrained(cfg, params, tmp_path / "model")
    write(tmp_path / "hellaswag" / "hellaswag_val.jsonl", FILE)
    sums, counts = direct_scores(cfg, params, tok)
    chars = np.array([[len(c) for c in choices] for _, choices in LM_EVAL])
    losses = {"lm_eval_acc": -sums[:, 0], "lm_eval_acc_norm": -sums[:, 0] / chars,  # lm-eval: argmax of -loss
              "llmc_acc": -sums[:, 1], "llmc_acc_norm": -sums[:, 1] / counts[:, 1]}  # llm.c: argmin of (mean) loss
    gold = np.array([int(r["label"]) for r in FILE])
    expected = {name: loss.argmin(-1) for name, loss in losses.items()}
    assert all(np.diff(np.sort(loss, -1)[:, :2]).min() > 1e-3 for loss in losses.values())  # no near-ties
    assert len({tuple(p) for p in expected.values()}) >= 3  # the four rules rank differently here

    examples, _ = read_examples(tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    r = hellaswag.score(cfg, params, tok, examples, batch_size=16, verbose=False)  # 2 examples per call
    np.testing.assert_array_equal(r["counts"], counts)
    np.testing.assert_allclose(r["sums"], sums, rtol=1e-5)
    for name, pred in expected.items():
        np.testing.assert_array_equal(r["predictions"][name], pred, err_msg=name)
        assert r[name] == np.mean(pred == gold)

    args = ["--checkpoint", str(tmp_path / "model"), "--tokenizer", str(bpe), "benchmark", "hellaswag",
            "--data-dir", str(tmp_path)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    acc = {name: np.mean(pred == gold) for name, pred in expected.items()}
    assert (f"hellaswag: lm-eval acc {acc['lm_eval_acc']:.4f}, acc_norm {acc['lm_eval_acc_norm']:.4f} (per character); "
            f"llm.c acc {acc['llmc_acc']:.4f}, acc_norm {acc['llmc_acc_norm']:.4f} (per token) on 4 examples "
            "(not the published validation file: not comparable)") in out
    assert err.count("warning:") == 1 and "not the published HellaSwag validation file (4 examples" in err
    assert "the published one has 10,042 examples, 12,246,618 bytes, sha256 0aa3b8884399" in err

    path = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    monkeypatch.setitem(hellaswag.PUBLISHED, "sha256", hashlib.sha256(path.read_bytes()).hexdigest())
    assert read_examples(path)[1] is None  # the published file (as if this were it): no warning, no remark
    assert hellaswag.describe({**r, "published": True}).endswith("(per token) on 4 examples")


def test_each_rule_ranks_by_its_own_normalisation():
    """One example whose four endings each rule ranks differently: lm-eval's sum; its sum per character of
    the choice (the delimiter not counted: with it, ending 0 would win); llm.c's sum; its mean per token (with
    one token more per ending, ending 2 would win)."""
    from gpt_jax.hellaswag import predictions

    sums = np.array([[[-2.2, -10, -50, -60], [-9, -3, -8, -20]]])
    counts = np.array([[[9, 9, 9, 9], [3, 1, 5, 13]]])  # lm-eval's token counts play no part
    chars = np.array([[2, 10, 40, 45]])
    assert {k: v.tolist() for k, v in predictions(sums, counts, chars).items()} == {
        "lm_eval_acc": [0], "lm_eval_acc_norm": [1], "llmc_acc": [1], "llmc_acc_norm": [3]}


@pytest.mark.parametrize("change, message", [
    (lambda lines: lines[:1] + ["{not json"], "line 2: not valid JSON"),
    (lambda lines: [json.dumps({**ROOF, "label": 4})], "line 1: label 4 is not an ending index 0..3"),
    (lambda lines: [json.dumps({**ROOF, "endings": ROOF["endings"][:3]})], "line 1: 3 endings; a HellaSwag example has 4"),
    (lambda lines: [json.dumps({k: v for k, v in ROOF.items() if k != "ctx_b"})], "line 1: no field 'ctx_b'"),
    (lambda lines: [json.dumps({**ROOF, "endings": "abcd"})], "line 1: field 'endings' should be a list of 4 strings"),
    (lambda lines: [], "hellaswag_val.jsonl has no examples"),
    (None, "download it from https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"),
])
def test_a_missing_or_malformed_file_is_one_line_before_any_model_loads(tmp_path, capsys, change, message):
    from gpt_jax.evaluate import main

    if change is not None:
        (tmp_path / "hellaswag").mkdir()
        lines = change([json.dumps(ROOF), json.dumps(ROOF)])
        (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(line + "\n" for line in lines))
    args = ["--checkpoint", str(tmp_path / "no-model"), "benchmark", "hellaswag", "--data-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
