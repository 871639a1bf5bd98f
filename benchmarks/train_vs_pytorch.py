"""Training step speed, gpt_jax vs a PyTorch reference, side by side in one run.

python benchmarks/train_vs_pytorch.py [--shapes baby gpt2w] [--steps N] [--json out.json]

The reference is `transformers`' GPT2LMHeadModel with the same shape plus torch.optim.AdamW,
eager, fp32, the same batch, all CPU threads. gpt_jax runs its jitted train step (AdamW, clipping)
with scanned and with unrolled layers. Shapes: `baby` is nanoGPT's CPU baby GPT (4 layers, width
128, 4 heads, batch 12 x 64, vocab 65); `gpt2w` is GPT-2 width (12 layers, 768, 12 heads, batch
4 x 256, vocab 50257). Needs the test extras (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from gpt_jax.bench import bench_train
from gpt_jax.config import load_config

SHAPES = {
    "baby": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=65, T=64, batch=12),
    "gpt2w": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, T=256, batch=4),
}


def bench_torch(shape, steps, warmup=2):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                                  vocab_size=shape["vocab_size"], n_positions=shape["T"], resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["T"]))

    def step():
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def ours(shape, scan: bool, steps):
    config = load_config(None, [f"model.n_layer={shape['n_layer']}", f"model.n_embd={shape['n_embd']}",
                                f"model.n_head={shape['n_head']}", f"model.vocab_size={shape['vocab_size']}",
                                f"model.n_positions={shape['T']}", f"train.batch_size={shape['batch']}",
                                f"model.scan_layers={str(scan).lower()}", "optim.lr=1e-4"])
    return bench_train(config, steps=steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 baby, 5 gpt2w)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        steps = args.steps or (30 if name == "baby" else 5)
        tokens = shape["batch"] * shape["T"]
        torch_s = bench_torch(shape, steps)
        rows.append({"shape": name, "impl": "pytorch (transformers + AdamW, eager)", "step_ms": 1e3 * torch_s,
                     "tokens_per_s": tokens / torch_s})
        for scan in (True, False):
            r = ours(shape, scan, steps)
            rows.append({"shape": name, "impl": f"gpt_jax ({'scan' if scan else 'unrolled'})", "step_ms": r["step_ms"],
                         "tokens_per_s": r["tokens_per_s"], "compile_s": r["compile_s"], "mfu": r["mfu"],
                         "vs_pytorch": r["tokens_per_s"] / (tokens / torch_s)})
        for row in rows[-3:]:
            extra = (f"  {row['vs_pytorch']:.2f}x  compile {row['compile_s']:.1f} s  MFU {100 * row['mfu']:.1f}%"
                     if "vs_pytorch" in row else "")
            print(f"{row['shape']:<6} {row['impl']:<40} {row['step_ms']:9.1f} ms {row['tokens_per_s']:9,.0f} tok/s{extra}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
