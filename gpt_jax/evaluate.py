"""Zero-shot evaluation of a language model, no training:

    python -m gpt_jax.evaluate --checkpoint PATH perplexity --input text.txt [--stride 512]
    python -m gpt_jax.evaluate --checkpoint PATH choice --input dev.tsv --labels 0 1 \\
        --candidates " terrible" " great" [--template "{text} it was"] [--text-field sentence --label-field label]
    python -m gpt_jax.evaluate --checkpoint PATH choice --input mc.jsonl --text-field context --choices-field endings
    python -m gpt_jax.evaluate --checkpoint PATH benchmark wikitext2|ptb|lambada|sst2|hellaswag [--data-dir DIR] [--stride 512]
    python -m gpt_jax.evaluate --checkpoint RUN --step 3000 ...   # a kept checkpoint of a training run

`perplexity` slides a window of the model's context over the text with the given stride, as in the
GPT-2 paper: every token is scored once, with up to `context - stride` tokens of earlier text.
`choice` scores each candidate continuation by the model's log-likelihood of its tokens after the
prompt and predicts the most likely: for classification the candidates stand for the labels in
order; for multiple choice they are each example's choices. A candidate's tokens are those that
follow the prompt's in the encoding of prompt + candidate (how the model saw such text in training).
`benchmark` runs the GPT-2 paper's zero-shot protocol on a published test set, or GPT-1's zero-shot
SST-2 heuristic (see `gpt_jax.zeroshot`), or HellaSwag as lm-evaluation-harness and llm.c score it
(see `gpt_jax.hellaswag`). `--step` evaluates the checkpoint a training run kept at
that step (`train.keep_every`) instead of its best.
"""

from __future__ import annotations

import argparse
import sys

from gpt_jax import hellaswag, zeroshot
from gpt_jax.config import ConfigError
from gpt_jax.data import read_text
from gpt_jax.errors import ArgumentParser, entry_point, number
from gpt_jax.records import read_records
from gpt_jax.runs import load_for_sampling
from gpt_jax.scoring import choice_accuracy, perplexity


@entry_point
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a training run directory or a Hugging Face directory")
    parser.add_argument("--tokenizer", help="tokenizer files, if not the checkpoint's")
    parser.add_argument("--step", type=number("[0, 2147483647]"), help="a training run's checkpoint at this step (default: its best)")
    sub = parser.add_subparsers(dest="what", required=True)
    ppl = sub.add_parser("perplexity", help="sliding-window perplexity of a text file")
    ppl.add_argument("--input", required=True)
    ppl.add_argument("--stride", type=number("[1, 1000000]"), help="tokens the window moves each time (default: the context)")
    ch = sub.add_parser("choice", help="zero-shot classification / multiple choice by likelihood")
    ch.add_argument("--input", required=True, help="TSV (header row) or JSONL")
    ch.add_argument("--text-field", default="sentence")
    ch.add_argument("--label-field", default="label")
    ch.add_argument("--labels", nargs="+", help="label values, in the order of --candidates")
    ch.add_argument("--candidates", nargs="+", help="one continuation per label")
    ch.add_argument("--choices-field", help="multiple choice: the field with each example's list of choices")
    ch.add_argument("--template", default="{text}", help="the prompt, with {text} for the example's text")
    bench = sub.add_parser("benchmark", help="WikiText-2 / PTB perplexity or LAMBADA accuracy (GPT-2 paper "
                           "protocol), SST-2 accuracy (GPT-1's ' very' heuristic), HellaSwag accuracy (lm-eval, llm.c)")
    bench.add_argument("name", choices=sorted(zeroshot.FILES))
    bench.add_argument("--split", help="test (sst2: dev, hellaswag: val) unless given")
    bench.add_argument("--data-dir", help="the folder holding wikitext-2/, ptb/, lambada/, sst2/, hellaswag/ (default "
                       "$GPT_JAX_DATA or ../shared/data)")
    bench.add_argument("--stride", type=number("[1, 1000000]"),
                       help="WikiText / PTB: tokens the window moves (default: the context)")
    args = parser.parse_args(argv)
    if args.what == "benchmark":
        path = zeroshot.data_file(args.name, args.split, args.data_dir)  # a missing file before the model loads
        if args.name == "hellaswag":  # and a malformed one; a file that is not the published one is said at once
            _, warning = hellaswag.read_examples(path)
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        config, params, tok = load_for_sampling(args.checkpoint, args.tokenizer, args.step)
        print(zeroshot.describe(zeroshot.run(args.name, config, params, tok, args.split, args.data_dir, args.stride)))
        return 0
    config, params, tok = load_for_sampling(args.checkpoint, args.tokenizer, args.step)
    if args.what == "perplexity":
        r = perplexity(config, params, tok.encode(read_text(args.input)), args.stride)
        print(f"perplexity {r['perplexity']:.4f} (nll {r['nll']:.4f} per token) over {r['tokens']:,} tokens, "
              f"{r['windows']} windows of up to {config.n_positions} tokens, stride {args.stride or config.n_positions}")
    else:
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
