"""Generation speed, gpt_jax vs transformers (PyTorch, KV cache), side by side in one run.

python benchmarks/generate_vs_transformers.py [--batches 1 8] [--prompt 128] [--new 128] [--json out.json]

GPT-2 124M shape with random weights, fp32, greedy decoding forced to exactly --new tokens. For each
implementation and batch: prefill time (a 1-token generation), decode tokens/s ((new - 1) tokens over
the time beyond prefill), overall new tokens/s, and gpt_jax's compile time apart. Needs the test extras
(torch, transformers); the runtime package does not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from gpt_jax import GPTConfig, init_params
from gpt_jax.bench import bench_generate


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_torch(prompts, new, repeats, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(attn_implementation="sdpa")).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=0, use_cache=True)

    run(2)  # warm up
    return {"prefill_s": best_of(lambda: run(1), repeats), "total_s": best_of(lambda: run(new), repeats)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = GPTConfig.preset("gpt2", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dtype=args.dtype)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    rows = []
    print(f"GPT-2 124M shape, {args.dtype}, prompt {args.prompt}, {args.new} new tokens, greedy; "
          f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for batch in args.batches:
        prompts = rng.integers(0, config.vocab_size, (batch, args.prompt)).tolist()
        g = bench_generate(config, params, prompts, args.new, args.repeats)
        rows.append({"impl": "gpt_jax", **{k: g[k] for k in ("batch", "prefill_ms", "decode_tok_s", "new_tok_s",
                                                               "compile_s")}})
        if not args.skip_torch:
            r = bench_torch(prompts, args.new, args.repeats, os.cpu_count())
            rows.append({"impl": "transformers", "batch": batch, "prefill_ms": 1e3 * r["prefill_s"],
                         "decode_tok_s": batch * (args.new - 1) / max(r["total_s"] - r["prefill_s"], 1e-9),
                         "new_tok_s": batch * args.new / r["total_s"], "compile_s": None})
        if not args.skip_torch:
            ours, ref = rows[-2], rows[-1]
            ratio = ours["new_tok_s"] / ref["new_tok_s"]
            rows[-2]["speedup_vs_transformers"] = ratio
    print(f"{'impl':<14}{'batch':>6}{'prefill ms':>12}{'decode tok/s':>14}{'new tok/s':>11}{'compile s':>11}{'speed-up':>10}")
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        speedup = f"{r['speedup_vs_transformers']:.2f}x" if "speedup_vs_transformers" in r else ""
        print(f"{r['impl']:<14}{r['batch']:>6}{r['prefill_ms']:>12.1f}{r['decode_tok_s']:>14.1f}"
              f"{r['new_tok_s']:>11.1f}{compile_s:>11}{speedup:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
