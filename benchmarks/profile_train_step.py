"""Per-op profile of a training step on CPU: where XLA's time goes, by op kind and by thread.

XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/profile_train_step.py [section.key=value ...]

Defaults to nanoGPT's CPU baby shape (4 layers, width 128, 4 heads, batch 12 x 64, vocab 65,
unrolled layers). Traces 10 steps with jax.profiler (a Perfetto trace under --trace-dir), then sums
op durations per step by op kind (the HLO fusion name without its number) and per thread.
"""

import argparse
import collections
import glob
import gzip
import json
import re
import time

import jax
import numpy as np

from gpt_jax.config import load_config
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.pretrain import init_state, make_train_step

BABY = ["model.n_layer=4", "model.n_embd=128", "model.n_head=4", "model.vocab_size=65", "model.n_positions=64",
        "train.batch_size=12", "model.scan_layers=false"]
CONTAINERS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "block_until", "Execute")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--trace-dir", default="profile_trace")
    args = parser.parse_args()
    config = load_config(None, BABY + args.overrides)
    optimizer = make_optimizer(config.optim, 100)
    state = init_state(config, optimizer)
    step = jax.jit(make_train_step(config, optimizer, make_schedule(config.optim, 100)))
    tc = config.train
    batch = np.random.default_rng(0).integers(0, config.model.vocab_size,
                                              (1, tc.batch_size, config.model.n_positions + 1)).astype(np.int32)
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t) / args.steps * 1e3
    trace = sorted(glob.glob(f"{args.trace_dir}/**/*perfetto_trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
    by_kind, count, by_thread = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(CONTAINERS):
            kind = re.sub(r"[._]\d+$", "", e["name"])
            by_kind[kind] += e["dur"] / 1e3 / args.steps
            count[kind] += 1
            by_thread[e.get("tid")] += e["dur"] / 1e3 / args.steps
    if not by_kind:
        print("no per-op events: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true")
        return
    busy = sorted((v for v in by_thread.values() if v > 0.5), reverse=True)
    print(f"step wall time {wall:.1f} ms; op time {sum(by_kind.values()):.1f} ms, per busy thread "
          + ", ".join(f"{v:.1f}" for v in busy) + " ms")
    for kind, ms in by_kind.most_common(15):
        print(f"{ms:8.2f} ms/step  {count[kind] // args.steps:4d} ops  {kind}")


if __name__ == "__main__":
    main()
