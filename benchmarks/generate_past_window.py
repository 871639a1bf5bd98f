"""Sampling speed inside the context window and past it.

python benchmarks/generate_past_window.py --config configs/quickstart.yaml model.vocab_size=222 [--prompt 8] [--past 64]
python benchmarks/generate_past_window.py --config configs/gpt2_124m.yaml --prompt 128 --past 16 --repeats 2

The model of the config, random weights, greedy decoding forced to full length. "Inside" is
generation up to the context (n_positions - prompt new tokens: KV-cache decode steps); "past" is
each token beyond it (a forward pass over the last n_positions tokens each), timed as the
difference between a run of inside + past tokens and the inside run. Best of --repeats, compile apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import numpy as np

from gpt_jax import generate, init_params
from gpt_jax.config import load_config


def best_of(fn, repeats):
    """The shortest of `repeats` timed calls, after one untimed call that compiles."""
    fn()
    return min(seconds(fn) for _ in range(repeats))


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.vocab_size=65")
    parser.add_argument("--prompt", type=int, default=8)
    parser.add_argument("--past", type=int, default=64, help="new tokens beyond the context")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = dataclasses.replace(load_config(args.config, args.overrides).model, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    params = init_params(model, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(0, model.vocab_size, (args.batch, args.prompt)).tolist()
    inside = model.n_positions - args.prompt

    def run(n):
        return lambda: generate(model, params, prompts, n, greedy=True)

    t_one, t_in, t_all = (best_of(run(n), args.repeats) for n in (1, inside, inside + args.past))
    device = jax.devices()[0]
    print(f"{args.config}: {model.n_layer} layers, width {model.n_embd}, context {model.n_positions}, "
          f"batch {args.batch}, prompt {args.prompt}, {model.dtype}; {device.platform} ({device.device_kind}), "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"inside the window: {args.batch * (inside - 1) / (t_in - t_one):,.1f} tok/s ({inside} new tokens)")
    print(f"past the window:   {args.batch * args.past / (t_all - t_in):,.1f} tok/s ({args.past} more)")


if __name__ == "__main__":
    main()
