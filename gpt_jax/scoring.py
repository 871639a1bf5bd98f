"""Scoring text with a language model: the log-likelihoods the zero-shot evaluations are built on.

`scorer` is the jitted log p(next token) of every position; `perplexity` slides the context window
over a long text with a stride, as in the GPT-2 paper; `continuation_scores` sums the
log-likelihood of candidate continuations after their prompts and counts their tokens, batched at
one compiled shape (`continuation_logprobs`: the sums alone);
`split_continuation` says which tokens a candidate is; `choice_accuracy` is zero-shot
classification or multiple choice from those scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt_jax.config import ConfigError, GPTConfig
from gpt_jax.data import DataError
from gpt_jax.model import GPT
from gpt_jax.records import field


def scorer(config: GPTConfig, with_argmax: bool = False):
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
    score = scorer(config)
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


def continuation_scores(config: GPTConfig, params, prompts, continuations, batch_size: int = 16,
                        progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p(continuation tokens | prompt), number of those tokens) for each (prompt ids,
    continuation ids) pair, at one compiled shape; prompt + continuation keeps its last `context + 1`
    tokens. The sums rank candidates; the counts give a mean per token. `progress(rows)` is called
    after each batch with the number of pairs it scored."""
    C = config.n_positions
    score = scorer(config)
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
    sums, counts = np.zeros(len(seqs)), np.array([n for _, n in seqs])
    for i in range(0, len(seqs), batch_size):
        group = seqs[i:i + batch_size]
        tokens = np.zeros((batch_size, T), np.int32)
        for r, (s, _) in enumerate(group):
            tokens[r, :len(s)] = s
        logp = np.asarray(score(params, tokens), np.float64)
        for r, (s, n) in enumerate(group):
            sums[i + r] = logp[r, len(s) - 1 - n:len(s) - 1].sum()
        if progress is not None:
            progress(len(group))
    return sums, counts


def continuation_logprobs(config: GPTConfig, params, prompts, continuations, batch_size: int = 16) -> np.ndarray:
    """Sum of log p(continuation tokens | prompt) for each (prompt ids, continuation ids) pair."""
    return continuation_scores(config, params, prompts, continuations, batch_size)[0]


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
