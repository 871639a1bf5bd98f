"""Zero-shot evaluation of a language model, no training:

    python -m gpt_jax.evaluate --checkpoint PATH perplexity --input text.txt [--stride 512]
    python -m gpt_jax.evaluate --checkpoint PATH choice --input dev.tsv --labels 0 1 \\
        --candidates " terrible" " great" [--template "{text} it was"] [--text-field sentence --label-field label]
    python -m gpt_jax.evaluate --checkpoint PATH choice --input mc.jsonl --text-field context --choices-field endings
    python -m gpt_jax.evaluate --checkpoint PATH benchmark wikitext2|ptb|lambada|sst2 [--data-dir DIR] [--stride 512]
    python -m gpt_jax.evaluate --checkpoint RUN --step 3000 ...   # a kept checkpoint of a training run

`perplexity` slides a window of the model's context over the text with the given stride, as in the
GPT-2 paper: every token is scored once, with up to `context - stride` tokens of earlier text.
`choice` scores each candidate continuation by the model's log-likelihood of its tokens after the
prompt and predicts the most likely: for classification the candidates stand for the labels in
order; for multiple choice they are each example's choices. A candidate's tokens are those that
follow the prompt's in the encoding of prompt + candidate (how the model saw such text in training).
`benchmark` runs the GPT-2 paper's zero-shot protocol on a published test set, or GPT-1's zero-shot
SST-2 heuristic (see `gpt_jax.zeroshot`). `--step` evaluates the checkpoint a training run kept at
that step (`train.keep_every`) instead of its best.
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.cli import at_least, entry_point
from gpt_jax.config import ConfigError, GPTConfig
from gpt_jax.data import DataError, read_text
from gpt_jax.model import GPT


def _scorer(config: GPTConfig, with_argmax: bool = False):
    @jax.jit
    def token_logprobs(params, tokens_BT):
        """log p(token t + 1 | tokens <= t): [B, T - 1]; with_argmax: also whether it is the argmax."""
        logits = GPT(config).apply({"params": params}, tokens_BT[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target_logp = jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
        if with_argmax:
            return target_logp, jnp.argmax(logits, axis=-1) == tokens_BT[:, 1:]
        return target_logp

    return token_logprobs


def sliding_windows(n_tokens: int, context: int, stride: int):
    """(begin, end, n_scored) windows: the last n_scored targets of tokens[begin:end] are new."""
    if not 0 < stride <= context:
        raise ConfigError(f"stride must be in 1..{context} (the context), got {stride}")
    windows, prev_end = [], 1  # token 0 has no context and is never scored
    for begin in range(0, n_tokens, stride):
        end = min(begin + context + 1, n_tokens)  # context inputs predict context targets
        if end > prev_end:
            windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(config: GPTConfig, params, ids, stride: int | None = None, batch_size: int = 8) -> dict:
    """Sliding-window perplexity of a token sequence (mean NLL per scored token, and its exp)."""
    ids = np.asarray(ids, np.int32)
    if len(ids) < 2:
        raise DataError("perplexity needs a text of at least 2 tokens")
    if ids.max() >= config.vocab_size or ids.min() < 0:
        raise DataError(f"token ids must be in [0, {config.vocab_size}); this tokenizer does not match the model")
    C = config.n_positions
    stride = C if stride is None else stride
    windows = sliding_windows(len(ids), C, stride)
    score = _scorer(config)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        tokens = np.zeros((batch_size, C + 1), np.int32)  # one compiled shape
        for r, (b, e, _) in enumerate(group):
            tokens[r, :e - b] = ids[b:e]
        logp = np.asarray(score(params, tokens), np.float64)
        for r, (b, e, n) in enumerate(group):
            nll -= logp[r, e - b - 1 - n:e - b - 1].sum()
            count += n
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens": count, "windows": len(windows)}


def continuation_logprobs(config: GPTConfig, params, prompts, continuations, batch_size: int = 16) -> np.ndarray:
    """Sum of log p(continuation tokens | prompt) for each (prompt ids, continuation ids) pair;
    prompt + continuation keeps its last `context + 1` tokens."""
    C = config.n_positions
    score = _scorer(config)
    seqs = []
    for p, c in zip(prompts, continuations):
        if not c:
            raise DataError("a candidate continuation encodes to no tokens")
        if not p:
            raise DataError("a prompt encodes to no tokens; give a --template with some text before the candidate")
        seq = (list(p) + list(c))[-(C + 1):]
        seqs.append((seq, min(len(c), len(seq) - 1)))
    T = min(C + 1, max(len(s) for s, _ in seqs))
    T = -(-T // 8) * 8 if T < C + 1 else T
    out = np.zeros(len(seqs))
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        tokens = np.zeros((batch_size, T), np.int32)
        for r, (s, _) in enumerate(group):
            tokens[r, :len(s)] = s
        logp = np.asarray(score(params, tokens), np.float64)
        for r, (s, n) in enumerate(group):
            out[i + r] = logp[r, len(s) - 1 - n:len(s) - 1].sum()
    return out


def split_continuation(tokenizer, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids) as the tokenizer writes prompt + continuation: the ids after the
    prompt's in the whole text's encoding (a sentencepiece model writes " positive" on its own with an
    extra "▁" piece, but after "very" as "▁positive"), or the continuation's own encoding when the whole
    does not begin with the prompt's ids."""
    prompt_ids, whole = tokenizer.encode(prompt), tokenizer.encode(prompt + continuation)
    if whole[:len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        return prompt_ids, whole[len(prompt_ids):]
    return prompt_ids, tokenizer.encode(continuation)


def choice_accuracy(config, params, tokenizer, records, *, text_field="sentence", label_field="label", labels=None,
                    candidates=None, choices_field=None, template="{text}", path="input") -> dict:
    """Zero-shot classification (candidates per label) or multiple choice (choices per example)."""
    from gpt_jax.records import field

    prompts, conts, n_options, gold = [], [], None, []
    for no, record in records:
        prompt = template.format(text=field(record, text_field, path, no, "text"))
        if choices_field:
            options = field(record, choices_field, path, no, "choices")
            if not isinstance(options, list):
                raise DataError(f"{path} line {no}: field {choices_field!r} should be a list of choices")
        else:
            options = candidates
        if n_options is None:
            n_options = len(options)
        if len(options) != n_options:
            raise DataError(f"{path} line {no}: {len(options)} choices, but earlier examples have {n_options}")
        for opt in options:
            prompt_ids, cont_ids = split_continuation(tokenizer, prompt, str(opt))
            prompts.append(prompt_ids)
            conts.append(cont_ids)
        value = str(field(record, label_field, path, no, "label"))
        if choices_field:
            if not value.isdigit() or int(value) >= n_options:
                raise DataError(f"{path} line {no}: label {value!r} is not a choice index in 0..{n_options - 1}")
            gold.append(int(value))
        else:
            if value not in labels:
                raise DataError(f"{path} line {no}: label {value!r} is not one of {labels}")
            gold.append(labels.index(value))
    scores = continuation_logprobs(config, params, prompts, conts).reshape(len(gold), n_options)
    pred = scores.argmax(-1)
    return {"accuracy": float((pred == np.array(gold)).mean()), "n": len(gold), "predictions": pred,
            "scores": scores, "gold": np.array(gold)}


@entry_point
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training run directory or a Hugging Face directory")
    parser.add_argument("--tokenizer", help="tokenizer files, if not the checkpoint's")
    parser.add_argument("--step", type=at_least(0), help="a training run's checkpoint at this step (default: its best)")
    sub = parser.add_subparsers(dest="what", required=True)
    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    ppl.add_argument("--input", required=True)
    ppl.add_argument("--stride", type=at_least(1), help="tokens the window moves each time (default: the context)")
    ch = sub.add_parser("choice", help="zero-shot classification / multiple choice by likelihood")
    ch.add_argument("--input", required=True, help="TSV (header row) or JSONL")
    ch.add_argument("--text-field", default="sentence")
    ch.add_argument("--label-field", default="label")
    ch.add_argument("--labels", nargs="+", help="label values, in the order of --candidates")
    ch.add_argument("--candidates", nargs="+", help="one continuation per label")
    ch.add_argument("--choices-field", help="multiple choice: the field with each example's list of choices")
    ch.add_argument("--template", default="{text}", help="the prompt, with {text} for the example's text")
    bench = sub.add_parser("benchmark", help="WikiText-2 / PTB perplexity or LAMBADA accuracy (GPT-2 paper "
                           "protocol), SST-2 accuracy (GPT-1's ' very' heuristic)")
    bench.add_argument("name", choices=["wikitext2", "ptb", "lambada", "sst2"])
    bench.add_argument("--split", help="test (sst2: dev) unless given")
    bench.add_argument("--data-dir", help="the folder holding wikitext-2/, ptb/, lambada/, sst2/ (default "
                       "$GPT_JAX_DATA or ../shared/data)")
    bench.add_argument("--stride", type=at_least(1),
                       help="WikiText / PTB: tokens the window moves (default: the context)")
    args = parser.parse_args(argv)
    from gpt_jax.sample import load_for_sampling

    if args.what == "benchmark":
        from gpt_jax import zeroshot

        zeroshot.data_file(args.name, args.split, args.data_dir)  # a missing file before the model loads
        config, params, tok = load_for_sampling(args.checkpoint, args.tokenizer, args.step)
        print(zeroshot.describe(zeroshot.run(args.name, config, params, tok, args.split, args.data_dir, args.stride)))
        return 0
    config, params, tok = load_for_sampling(args.checkpoint, args.tokenizer, args.step)
    if args.what == "perplexity":
        r = perplexity(config, params, tok.encode(read_text(args.input)), args.stride)
        print(f"perplexity {r['perplexity']:.4f} (nll {r['nll']:.4f} per token) over {r['tokens']:,} tokens, "
              f"{r['windows']} windows of up to {config.n_positions} tokens, stride {args.stride or config.n_positions}")
    else:
        from gpt_jax.records import read_records

        if not args.choices_field and not (args.labels and args.candidates
                                           and len(args.labels) == len(args.candidates)):
            raise ConfigError("choice needs --choices-field (multiple choice) or --labels and --candidates "
                              "of the same length (classification)")
        r = choice_accuracy(config, params, tok, read_records(args.input), text_field=args.text_field,
                            label_field=args.label_field, labels=args.labels, candidates=args.candidates,
                            choices_field=args.choices_field, template=args.template, path=args.input)
        print(f"zero-shot accuracy {r['accuracy']:.4f} on {r['n']} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
