"""Sample text at the command line, streamed as it is produced.

python -m gpt_jax.sample --checkpoint runs/quickstart --prompt "def " [--max-new-tokens N --temperature T
    --top-k K --top-p P --num-samples S --seed S]

--checkpoint takes a training run directory (its best checkpoint and its tokenizer), a Hugging Face
GPT-2 / OpenAI-GPT directory (tokenizer files from that directory, --tokenizer, or $GPT_JAX_DATA), or
a model name from the Hugging Face cache: gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-gpt.
"""

from __future__ import annotations

import argparse
import sys
import time

from gpt_jax.config import SAMPLING_RANGES, SEED_RANGE
from gpt_jax.errors import ArgumentParser, entry_point, number
from gpt_jax.generate import GenerateError, generate
from gpt_jax.runs import load_for_sampling


class _Streamer:
    """Prints each sample's new text as tokens arrive (decoding the whole sample so BPE bytes join up)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed, self.done = tokenizer, out, [], "", False

    def __call__(self, _i, tokens):
        if self.done:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


@entry_point
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training run directory, Hugging Face directory, or model name (gpt2, ...)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=number(SAMPLING_RANGES["max_new_tokens"]), default=200)
    parser.add_argument("--temperature", type=number(SAMPLING_RANGES["temperature"], float), default=0.8)
    parser.add_argument("--top-k", type=number(SAMPLING_RANGES["top_k"]), default=None)
    parser.add_argument("--top-p", type=number(SAMPLING_RANGES["top_p"], float), default=None)
    # sample k draws with seed + k: with these bounds every seed fits jax.random.key's 32 bits
    parser.add_argument("--num-samples", type=number("[1, 10000]"), default=1)
    parser.add_argument("--seed", type=number(SEED_RANGE), default=0)
    parser.add_argument("--tokenizer", default=None, help="tokenizer path, if the checkpoint has none")
    args = parser.parse_args(argv)
    config, params, tok = load_for_sampling(args.checkpoint, args.tokenizer)
    ids = tok.encode(args.prompt)
    if not ids:
        raise GenerateError("the prompt encodes to no tokens; give some text")
    stop = [tok.eot_id] if tok.eot_id is not None else []
    for k in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {k + 1} ---")
        sys.stdout.write(args.prompt)
        t = time.perf_counter()
        _, counts = generate(config, params, [ids], args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, stop_tokens=stop, rng=args.seed + k,
                             on_token=_Streamer(tok, sys.stdout))
        print(f"\n[{counts[0]} tokens in {time.perf_counter() - t:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
