"""HellaSwag (Zellers et al., 2019) zero-shot on the validation set, scored as lm-evaluation-harness and
llm.c score it, each figure under its source's name:

    python -m gpt_jax.evaluate --checkpoint PATH benchmark hellaswag [--data-dir DIR]

Each example is a context and four endings, one of them right (`label`). The model scores every ending
as a continuation of the context; an example counts as right when the ending it ranks first is the
labelled one.

    lm-eval acc        EleutherAI lm-evaluation-harness, task `hellaswag` (lm_eval/tasks/hellaswag/utils.py
                       and hellaswag.yaml; lm_eval/api/task.py, output_type multiple_choice). The context is
                       preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), the choices are
                       preprocess(ending), each scored as " " + choice (the target_delimiter); the choice of
                       largest summed log-likelihood wins.
    lm-eval acc_norm   the same sums divided by len(choice), the choice's length in characters (without the
                       delimiter): `completion_len` in task.py's process_results.
    llm.c acc          karpathy/llm.c dev/data/hellaswag.py ("completion style"): the raw `ctx` field and
                       " " + ending, no preprocessing; the ending of largest summed log-likelihood.
    llm.c acc_norm     on that rendering, the ending of smallest mean loss per token of the ending.

An ending's tokens are those that follow the context's in the encoding of the two together, the
context's trailing whitespace moved to the ending first (lm-eval's `_encode_pair`); with GPT-2's BPE
that is llm.c's encode(ctx) + encode(" " + ending) too. Every (context, ending) pair of both
renderings is scored at one compiled shape, a batch of whole examples per call.

The file is rowanz/hellaswag's data/hellaswag_val.jsonl (MIT), not redistributed here. A file that is
not that one byte for byte is still scored (a subset, say), but the command warns that its figures are
not comparable with published ones, and the result line says so too.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt_jax.data import DataError
from gpt_jax.records import read_records
from gpt_jax.scoring import continuation_scores, split_continuation

SOURCE = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
PUBLISHED = {"examples": 10_042, "bytes": 12_246_618,
             "sha256": "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"}
ENDINGS = 4
TEXT_FIELDS = ("activity_label", "ctx_a", "ctx_b", "ctx")


def preprocess(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text. The WikiHow half carries markers in brackets: " [title]"
    becomes a sentence break, every other bracketed marker ([header], [step], [substeps], ...) goes,
    and then one pass turns each double space into one (so three spaces in a row leave two, as there)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass(frozen=True)
class Example:
    query: str  # lm-eval's context
    choices: tuple[str, ...]  # lm-eval's choices
    ctx: str  # llm.c's context: the raw field
    endings: tuple[str, ...]  # llm.c's endings: as the file has them
    label: int


def example(record: dict, path, no: int) -> Example:
    """One line of the file, checked, in both renderings."""
    for name in (*TEXT_FIELDS, "endings", "label"):
        if name not in record:
            raise DataError(f"{path} line {no}: no field {name!r}; a HellaSwag line has {', '.join(TEXT_FIELDS)}, "
                            "endings and label")
    for name in TEXT_FIELDS:
        if not isinstance(record[name], str):
            raise DataError(f"{path} line {no}: field {name!r} should be a string, got {record[name]!r}")
    endings = record["endings"]
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{path} line {no}: field 'endings' should be a list of {ENDINGS} strings")
    if len(endings) != ENDINGS:
        raise DataError(f"{path} line {no}: {len(endings)} endings; a HellaSwag example has {ENDINGS}")
    label = str(record["label"])  # an integer in rowanz's files, a string in the Hugging Face copy
    if label not in [str(i) for i in range(ENDINGS)]:
        raise DataError(f"{path} line {no}: label {record['label']!r} is not an ending index 0..{ENDINGS - 1}")
    query = preprocess(record["activity_label"] + ": " + record["ctx_a"] + " " + record["ctx_b"].capitalize())
    return Example(query, tuple(preprocess(e) for e in endings), record["ctx"], tuple(endings), int(label))


def read_examples(path) -> tuple[list[Example], str | None]:
    """The file's examples, and None when it is the published validation file, else a warning line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; download HellaSwag's validation file from {SOURCE}")
    examples = [example(record, path, no) for no, record in read_records(path, "jsonl")]  # none: one line too
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest == PUBLISHED["sha256"]:
        return examples, None
    return examples, (f"{path} is not the published HellaSwag validation file ({len(examples):,} examples, "
                      f"{len(data):,} bytes, sha256 {digest[:12]}...; the published one has {PUBLISHED['examples']:,} "
                      f"examples, {PUBLISHED['bytes']:,} bytes, sha256 {PUBLISHED['sha256'][:12]}...): its figures are "
                      f"not comparable with published ones; the published file is {SOURCE}")


def pairs(tokenizer, examples: list[Example]) -> tuple[list, list]:
    """(context ids, ending ids) of every ending: per example its 4 lm-eval pairs, then its 4 llm.c pairs."""
    prompts, conts = [], []
    for ex in examples:
        context = ex.query.rstrip()  # lm-eval moves the context's trailing whitespace onto the continuation
        rendered = [(context, ex.query[len(context):] + " " + c) for c in ex.choices]
        rendered += [(ex.ctx, " " + e) for e in ex.endings]
        for text, ending in rendered:
            p, c = split_continuation(tokenizer, text, ending)
            prompts.append(p)
            conts.append(c)
    return prompts, conts


def score(config, params, tokenizer, examples: list[Example], batch_size: int = 32, verbose: bool = True) -> dict:
    """The four accuracies (see the module docstring), the predictions behind them, the gold labels, and the
    summed log-likelihoods and token counts of each ending [example, rendering (lm-eval, llm.c), ending]."""
    rows = 2 * ENDINGS  # pairs per example; a batch holds whole examples, so the bar counts examples
    prompts, conts = pairs(tokenizer, examples)
    with tqdm(total=len(examples), unit="example", desc="hellaswag", disable=not verbose, file=sys.stdout,
              dynamic_ncols=True, mininterval=1.0) as bar:
        sums, counts = continuation_scores(config, params, prompts, conts, max(rows, batch_size // rows * rows),
                                           progress=lambda n: bar.update(n // rows))
    sums, counts = sums.reshape(-1, 2, ENDINGS), counts.reshape(-1, 2, ENDINGS)
    chosen = predictions(sums, counts, np.array([[len(c) for c in ex.choices] for ex in examples]))
    gold = np.array([ex.label for ex in examples])
    return {**{name: float((pred == gold).mean()) for name, pred in chosen.items()},
            "n": len(examples), "predictions": chosen, "gold": gold, "sums": sums, "counts": counts}


def predictions(sums, counts, chars) -> dict[str, np.ndarray]:
    """Each rule's ending per example, from the summed log-likelihoods and token counts [example, rendering
    (lm-eval, llm.c), ending] and the lengths in characters of lm-eval's choices [example, ending]."""
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: numpy's -inf, as in lm-eval
        return {"lm_eval_acc": sums[:, 0].argmax(-1), "lm_eval_acc_norm": (sums[:, 0] / chars).argmax(-1),
                "llmc_acc": sums[:, 1].argmax(-1), "llmc_acc_norm": (sums[:, 1] / counts[:, 1]).argmax(-1)}


def benchmark(config, params, tokenizer, path, verbose: bool = True) -> dict:
    examples, warning = read_examples(path)
    return {"benchmark": "hellaswag", "file": str(path), "published": warning is None,
            **score(config, params, tokenizer, examples, verbose=verbose)}


def describe(r: dict) -> str:
    line = (f"hellaswag: lm-eval acc {r['lm_eval_acc']:.4f}, acc_norm {r['lm_eval_acc_norm']:.4f} (per character); "
            f"llm.c acc {r['llmc_acc']:.4f}, acc_norm {r['llmc_acc_norm']:.4f} (per token) on {r['n']:,} examples")
    return line if r["published"] else line + " (not the published validation file: not comparable)"
