"""Zero-shot language-modelling benchmarks of the GPT-2 paper (Table 3): WikiText-2, PTB, LAMBADA;
GPT-1's zero-shot SST-2 heuristic (Figure 2, right); and HellaSwag (`gpt_jax.hellaswag`).

    python -m gpt_jax.evaluate --checkpoint PATH [--step N] benchmark wikitext2|ptb|lambada|sst2|hellaswag [--split S] [--stride N]

WikiText-2 and PTB: the test file is detokenised (the paper used invertible detokenisers so that a
model trained on raw text reads natural text), scored with a sliding window, and reported as
perplexity per model token and per word-level token of the original file (its whitespace tokens
plus one <eos> per line: 245,569 for WikiText-2 test, 82,430 for PTB test), the figure papers
report. LAMBADA: each passage's last word is the target; accuracy counts passages whose target is
the model's greedy continuation as a whole word (every one of its tokens the argmax, so multi-token
words must be right throughout), and perplexity is exp of the mean negative log-likelihood of the
target word. SST-2: each dev sentence followed by " very"; the prediction is positive when the model
gives " positive" a higher log-likelihood than " negative" there (each word's tokens summed, as a
subword vocabulary may split it). Files come from `$GPT_JAX_DATA` (see the data README) or `--data-dir`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from gpt_jax import hellaswag
from gpt_jax.data import DataError
from gpt_jax.records import field, read_records
from gpt_jax.scoring import choice_accuracy, perplexity, scorer, split_continuation

FILES = {
    "wikitext2": {"test": "wikitext-2/wiki.test.tokens", "valid": "wikitext-2/wiki.valid.tokens"},
    "ptb": {"test": "ptb/ptb.test.txt", "valid": "ptb/ptb.valid.txt"},
    # plain: the original lowercased, tokenised release, for models trained on text in that form
    "lambada": {"test": "lambada/lambada_test.jsonl", "plain": "lambada/lambada_test_plain_text.txt"},
    "sst2": {"dev": "sst2/dev.tsv"},
    "hellaswag": {"val": "hellaswag/hellaswag_val.jsonl"},
}
SOURCES = {"hellaswag": hellaswag.SOURCE}  # files that are not in the shared data: where to get them
SST2_PROMPT = {"template": "{text} very", "candidates": [" negative", " positive"], "labels": ["0", "1"]}


def wikitext_detokenize(text: str) -> str:
    """WikiText's tokenisation undone: @-@ style number separators, spaces before punctuation,
    inside brackets and quotes, heading markers and possessives."""
    text = text.replace("s '", "s'")
    for sep in "-,.":
        text = text.replace(f" @{sep}@ ", sep)
    for mark in ":;.!?,":
        text = text.replace(f" {mark} ", f"{mark} ")
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for n in (4, 3, 2):
        text = text.replace(" ".join("=" * n), "=" * n)
    text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    return text.replace(" N ", " 1 ").replace(" 's", "'s")


def ptb_detokenize(text: str) -> str:
    """PTB's tokenisation undone where it is invertible: clitics and quotes joined, N read as a number."""
    text = text.replace(" '", "'").replace(" n't", "n't")
    text = text.replace(" \n", "\n").replace("\n ", "\n")
    return text.replace(" N ", " 1 ").replace("$ 1", "$1").replace("# 1", "#1")


def word_count(text: str) -> int:
    """Word-level tokens of a WikiText / PTB file: whitespace tokens plus one <eos> per line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return sum(len(line.split()) + 1 for line in lines)


def data_file(name: str, split: str | None, data_dir: str | os.PathLike | None = None) -> Path:
    """The benchmark's file of `split` (None: test, or the first split listed)."""
    if name not in FILES:
        raise DataError(f"unknown benchmark {name!r}; choose one of {sorted(FILES)}")
    split = split or next(iter(FILES[name]))
    if split not in FILES[name]:
        raise DataError(f"{name} has no {split!r} split here; splits: {sorted(FILES[name])}")
    root = Path(data_dir or os.environ.get("GPT_JAX_DATA", "../shared/data"))
    path = root / FILES[name][split]
    if not path.is_file():
        source = f" (download it from {SOURCES[name]})" if name in SOURCES else ""
        raise DataError(f"{path} is missing: give --data-dir (or set GPT_JAX_DATA) to the folder that holds "
                        f"{FILES[name][split]}{source}")
    return path


def language_modelling(config, params, tokenizer, text: str, detokenize, stride: int | None = None) -> dict:
    """Sliding-window perplexity of a detokenised WikiText / PTB text, per model token and per word."""
    r = perplexity(config, params, tokenizer.encode(detokenize(text)), stride)
    words = word_count(text)
    nll_total = r["nll"] * r["tokens"]
    return {**r, "words": words, "word_perplexity": math.exp(nll_total / words)}


def lambada_examples(path: Path) -> list[tuple[str, str]]:
    """(context, target word) pairs: the target is the passage's last whitespace-separated word."""
    out = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"] if path.suffix == ".jsonl" else line
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path} line {no}: expected a JSON object with a 'text' field") from None
        context, _, word = text.rstrip().rpartition(" ")
        if not context or not word:
            raise DataError(f"{path} line {no}: a passage needs a context and a last word")
        out.append((context, word))
    return out


def lambada(config, params, tokenizer, examples, batch_size: int = 16) -> dict:
    """Last-word accuracy (greedy, whole word) and perplexity of the target words."""
    C = config.n_positions
    seqs = []
    for context, word in examples:  # the target's tokens as the passage writes them (not a lone "▁" first)
        ctx, tgt = split_continuation(tokenizer, context, " " + word)
        if not ctx or not tgt:
            raise DataError(f"a LAMBADA passage encodes to no tokens: {context[:60]!r} / {word!r}")
        seq = (ctx + tgt)[-(C + 1):]
        seqs.append((seq, min(len(tgt), len(seq) - 1)))
    T = min(C + 1, max(len(s) for s, _ in seqs))
    score = scorer(config, with_argmax=True)
    nll, correct = np.zeros(len(seqs)), np.zeros(len(seqs), bool)
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        tokens = np.zeros((batch_size, T), np.int32)
        for r, (s, _) in enumerate(group):
            tokens[r, :len(s)] = s
        logp, hit = (np.asarray(a) for a in score(params, tokens))
        for r, (s, n) in enumerate(group):
            span = slice(len(s) - 1 - n, len(s) - 1)
            nll[i + r] = -logp[r, span].astype(np.float64).sum()
            correct[i + r] = hit[r, span].all()
    return {"accuracy": float(correct.mean()), "perplexity": math.exp(nll.mean()), "n": len(seqs)}


def sst2(config, params, tokenizer, path, prompt: dict = SST2_PROMPT) -> dict:
    """Zero-shot SST-2 accuracy by `prompt` (a template and the negative and positive candidates; the paper's
    SST2_PROMPT unless given), the fraction predicted positive and the AUC of the positive-minus-negative
    log-likelihood margin."""
    records = [(no, {**r, "sentence": str(field(r, "sentence", path, no, "text")).strip()})
               for no, r in read_records(path)]  # SST-2's sentences end in a space
    r = choice_accuracy(config, params, tokenizer, records, path=path, labels=SST2_PROMPT["labels"],
                        template=prompt["template"], candidates=prompt["candidates"])
    return {**r, "positive": float(np.mean(r["predictions"])), "auc": auc(r["scores"][:, 1] - r["scores"][:, 0], r["gold"])}


def auc(margin, gold) -> float:
    """Area under the ROC curve of `margin` for gold == 1: the chance that a random positive example has a
    higher margin than a random negative one (ties count half). Threshold-free, so a model whose
    " positive" / " negative" balance is off (all one class) can still show what it has learnt."""
    pos, neg = margin[gold == 1][:, None], margin[gold != 1][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def run(name: str, config, params, tokenizer, split: str | None = None, data_dir=None, stride: int | None = None) -> dict:
    path = data_file(name, split, data_dir)
    if name == "hellaswag":
        return hellaswag.benchmark(config, params, tokenizer, path)
    if name == "sst2":
        return {"benchmark": name, "file": str(path), **sst2(config, params, tokenizer, path)}
    if name == "lambada":
        return {"benchmark": name, "file": str(path), **lambada(config, params, tokenizer, lambada_examples(path))}
    detokenize = wikitext_detokenize if name == "wikitext2" else ptb_detokenize
    text = path.read_text(encoding="utf-8")
    return {"benchmark": name, "file": str(path),
            **language_modelling(config, params, tokenizer, text, detokenize, stride)}


def describe(r: dict) -> str:
    if r["benchmark"] == "hellaswag":
        return hellaswag.describe(r)
    if r["benchmark"] == "sst2":
        return (f"sst2: zero-shot accuracy {r['accuracy']:.4f} on {r['n']:,} sentences ({r['positive']:.1%} "
                f"predicted positive; ' very' then ' positive' vs ' negative'), AUC {r['auc']:.4f}")
    if r["benchmark"] == "lambada":
        return f"lambada: accuracy {r['accuracy']:.4f}, perplexity {r['perplexity']:.2f} over {r['n']:,} passages"
    return (f"{r['benchmark']}: perplexity {r['word_perplexity']:.2f} per word ({r['words']:,} word-level tokens), "
            f"{r['perplexity']:.2f} per model token ({r['tokens']:,} tokens, {r['windows']} windows)")
