"""Predict with a fine-tuned model:

    python -m gpt_jax.predict --checkpoint runs/gpt1_cpu_sst2 --input dev.tsv [--output predictions.tsv]

Reads the input with the run's task and field mapping (labels optional), writes one line per
example: the predicted label (or choice index) and the probability of each, and prints the accuracy
when the input has labels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt_jax.errors import ArgumentParser, entry_point, number
from gpt_jax.config import FinetuneConfig


def predict_file(run_dir, input_path, output_path=None, batch_size: int = 32, fmt: str = "auto") -> dict:
    from gpt_jax.finetune import load_finetuned, predict_probs
    from gpt_jax.records import SpecialIds, encode_examples, read_records

    model, params, tokenizer, meta = load_finetuned(run_dir)
    cfg = FinetuneConfig(task=meta["task"], fields=meta["fields"], labels=meta["labels"], format=fmt)
    records = read_records(input_path, fmt)
    examples = encode_examples(records, cfg, tokenizer, SpecialIds(**meta["special_ids"]), meta["max_length"],
                               input_path, meta["labels"], need_labels=False)
    probs = predict_probs(model, meta["task"], params, examples, batch_size)
    names = meta["labels"] or [str(i) for i in range(probs.shape[1])]
    pred = probs.argmax(-1)
    output_path = Path(output_path or Path(input_path).with_suffix(".predictions.tsv"))
    with open(output_path, "w") as f:
        f.write("prediction\t" + "\t".join(f"p_{n}" for n in names) + "\n")
        for p, row in zip(pred, probs):
            f.write(names[p] + "\t" + "\t".join(f"{x:.6f}" for x in row) + "\n")
    result = {"output": str(output_path), "n": len(examples), "truncated": examples.truncated}
    labelled = examples.labels >= 0
    if labelled.any():
        result["accuracy"] = float((pred[labelled] == examples.labels[labelled]).mean())
    return result


@entry_point
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a fine-tuning run directory (train.py, mode: finetune)")
    parser.add_argument("--input", required=True, help="TSV (header row) or JSONL with the run's fields")
    parser.add_argument("--output", help="where to write predictions (default: INPUT.predictions.tsv)")
    parser.add_argument("--format", default="auto", choices=["auto", "tsv", "jsonl"])
    parser.add_argument("--batch-size", type=number("[1, 65536]"), default=32)
    args = parser.parse_args(argv)
    result = predict_file(args.checkpoint, args.input, args.output, args.batch_size, args.format)
    msg = f"wrote {result['n']} predictions to {result['output']}"
    if result["truncated"]:
        msg += f" ({result['truncated']} examples truncated to fit)"
    if "accuracy" in result:
        msg += f"; accuracy {result['accuracy']:.4f}"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
