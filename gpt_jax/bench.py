"""Training and generation throughput, MFU, compile time and memory for a run config.

python -m gpt_jax.bench --config configs/NAME.yaml [section.key=value ...] [--steps N] [--json PATH]
python -m gpt_jax.bench --config configs/NAME.yaml --scan-table 12 24 48     # scan vs unrolled compile

The model, batch and strategy come from the config; the data are random tokens, so nothing is
downloaded or prepared. MFU divides achieved FLOP/s by the device's peak: a table for TPUs and
NVIDIA GPUs (bf16 or fp32 by `model.dtype`), a matmul measured at start-up on anything else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time

import jax
import numpy as np

from gpt_jax.errors import ArgumentParser, entry_point, number
from gpt_jax.config import SAMPLING_RANGES, Config, load_config
from gpt_jax.flops import device_peak_flops, flops_per_token, flops_per_token_llmc
from gpt_jax.generate import generate
from gpt_jax import attention
from gpt_jax.model import param_count
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.parallel import check_batch
from gpt_jax.pretrain import init_state, make_train_step


def _memory(compiled) -> dict:
    """Bytes from the compiled executable, and the device's peak where the runtime reports it."""
    out = {}
    analysis = compiled.memory_analysis()
    if analysis is not None:
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes"):
            out[name.removesuffix("_in_bytes")] = int(getattr(analysis, name, 0) or 0)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak"] = int(stats["peak_bytes_in_use"])
    return out


def bench_train(config: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Compile (timed apart) and run `steps` optimizer steps on random tokens."""
    tc, oc, mc = config.train, config.optim, config.model
    check_batch(config, 1)
    T = mc.n_positions
    optimizer = make_optimizer(oc, tc.steps)
    state = init_state(config, optimizer)
    batch = np.random.default_rng(0).integers(0, mc.vocab_size, (oc.grad_accum, tc.batch_size // oc.grad_accum, T + 1))
    batch = batch.astype(np.int32)
    step = jax.jit(make_train_step(config, optimizer, make_schedule(oc, tc.steps)), donate_argnums=0)
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps
    tokens = tc.batch_size * T
    peak, peak_src = device_peak_flops(mc.dtype)
    tok_s = tokens / step_s
    return {"compile_s": compile_s, "step_ms": 1e3 * step_s, "tokens_per_s": tok_s,
            "mfu": tok_s * flops_per_token(mc, T) / peak, "mfu_llmc": tok_s * flops_per_token_llmc(mc, T) / peak,
            "peak_flops": peak, "peak_source": peak_src, "memory": _memory(compiled),
            "loss": float(metrics["loss"])}


def bench_generate(model_config, params, prompts, new_tokens: int, repeats: int = 3) -> dict:
    """Prefill time (a one-token generation), decode tokens/s beyond it, compile time apart."""
    def best(n):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            generate(model_config, params, prompts, n, greedy=True)
            times.append(time.perf_counter() - t)
        return min(times)

    t = time.perf_counter()
    generate(model_config, params, prompts, new_tokens, greedy=True)
    generate(model_config, params, prompts, 1, greedy=True)
    first = time.perf_counter() - t
    total, prefill = best(new_tokens), best(1)
    B = len(prompts)
    return {"batch": B, "prompt": len(prompts[0]), "new_tokens": new_tokens, "prefill_ms": 1e3 * prefill,
            "decode_tok_s": B * (new_tokens - 1) / max(total - prefill, 1e-9), "new_tok_s": B * new_tokens / total,
            "compile_s": max(first - total - prefill, 0.0)}


def scan_table(config: Config, depths, steps: int = 3) -> list[dict]:
    """Compile seconds and step time, scanned vs unrolled layers, at each depth."""
    rows = []
    for L in depths:
        for scan in (True, False):
            model = dataclasses.replace(config.model, n_layer=L, scan_layers=scan)
            r = bench_train(dataclasses.replace(config, model=model), steps=steps, warmup=1)
            rows.append({"n_layer": L, "scan_layers": scan, "compile_s": r["compile_s"], "step_ms": r["step_ms"]})
            print(f"  n_layer={L:<3} {'scan    ' if scan else 'unrolled'} compile {r['compile_s']:7.1f} s  "
                  f"step {r['step_ms']:9.1f} ms", flush=True)
    return rows


@entry_point
def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=number("[1, 100000]"), default=10)
    parser.add_argument("--gen-batch", type=number("[1, 4096]"), default=1)
    parser.add_argument("--gen-prompt", type=number("[1, 1000000]"),
                        help="prompt tokens (default: a quarter of the context)")
    parser.add_argument("--gen-new", type=number(SAMPLING_RANGES["max_new_tokens"]),
                        help="new tokens (default: a quarter of the context)")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--scan-table", type=number("[1, 1000]"), nargs="*", default=None, metavar="N_LAYER")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    mc, device = config.model, jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}) x {jax.device_count()}, {platform.machine()}; "
          f"model {mc.n_layer} layers x {mc.n_embd}, {mc.n_head} heads, vocab {mc.vocab_size}, "
          f"{param_count(mc) / 1e6:.1f}M params, {mc.dtype}; batch {config.train.batch_size} x {mc.n_positions}")
    print(attention.describe(mc))
    result = {"device": device.device_kind, "platform": device.platform, "config": config.to_dict(),
              "attention": attention.resolve(mc, mc.attn_pdrop > 0)}
    if args.scan_table:
        result["scan_table"] = scan_table(config, args.scan_table)
    else:
        r = bench_train(config, steps=args.steps)
        result["train"] = r
        mem = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r["memory"].items())
        print(f"train: compile {r['compile_s']:.1f} s | step {r['step_ms']:.1f} ms | {r['tokens_per_s']:,.0f} tokens/s | "
              f"MFU {100 * r['mfu']:.1f}% (6N+12LHQT), {100 * r['mfu_llmc']:.1f}% (6N+6LDT) of "
              f"{r['peak_flops'] / 1e12:.2f} TFLOP/s [{r['peak_source']}]")
        print(f"memory: {mem}")
        if not args.no_generate:
            prompt = args.gen_prompt or max(mc.n_positions // 4, 1)
            new = args.gen_new or max(mc.n_positions // 4, 2)
            params = init_state(config, make_optimizer(config.optim, 1)).params
            prompts = np.random.default_rng(1).integers(0, mc.vocab_size, (args.gen_batch, prompt)).tolist()
            g = bench_generate(mc, params, prompts, new)
            result["generate"] = g
            print(f"generate: batch {g['batch']}, prompt {g['prompt']}, {g['new_tokens']} new | prefill "
                  f"{g['prefill_ms']:.1f} ms | decode {g['decode_tok_s']:,.1f} tok/s | {g['new_tok_s']:,.1f} new tok/s "
                  f"| compile {g['compile_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
