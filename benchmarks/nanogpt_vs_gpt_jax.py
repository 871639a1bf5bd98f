"""nanoGPT's CPU baby GPT and configs/shakespeare_char_cpu.yaml, back to back on this machine.

python benchmarks/nanogpt_vs_gpt_jax.py --nanogpt PATH/TO/nanoGPT [--data PATH/input.txt] [--runs 2] [--json out.json]

nanoGPT is not a dependency: give the path of a checkout (git clone https://github.com/karpathy/nanoGPT).
Its own instructions are followed inside that checkout: the text is copied to
data/shakespeare_char/input.txt and its prepare.py writes train.bin / val.bin there; its train.py
runs config/train_shakespeare_char.py with the CPU settings of its README (4 layers, 4 heads, width
128, block 64, batch 12, 2,000 iterations, lr decay to 2,000, no dropout), eval every 250 steps over
20 batches, fp32 (`--dtype=float32`: on CPU it computes in fp32 anyway), checkpoints to a temporary
directory. gpt_jax runs `train.py --config configs/shakespeare_char_cpu.yaml` as shipped, with its
run directory and data cache in a fresh temporary directory, so it prepares its data and compiles.

For each it prints the wall time of the whole command (nanoGPT: prepare.py + train.py), the
training-loop time (from the line printed as the loop starts to the step-2000 eval line: nanoGPT's
"step 0:" eval line, gpt_jax's "parallel:" line, which precedes the first step's compilation) and
the final val loss. Both evaluate at the same steps; nanoGPT also evaluates before step 1 and
estimates the train loss at each eval (random batches), gpt_jax scores 20 fixed val batches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
NANOGPT_ARGS = ["--device=cpu", "--compile=False", "--dtype=float32", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
                "--dropout=0.0", "--eval_iters=20", "--eval_interval=250", "--log_interval=10"]


def timed_lines(cmd, cwd, env=None):
    """Run `cmd`; returns [(seconds since start, line)] of its stdout (\\r-separated tqdm updates
    count as lines) and the total wall time. Stops with the command's stderr if it fails."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        lines, buf = [], ""
        while chunk := proc.stdout.read(1):  # text mode reads "\r" as "\n": tqdm updates are lines too
            if chunk == "\n":
                lines.append((time.perf_counter() - t0, buf))
                buf = ""
            else:
                buf += chunk
        if proc.wait() != 0:
            err.seek(0)
            sys.exit(f"{' '.join(map(str, cmd))} failed:\n{err.read()[-3000:]}")
        return lines, time.perf_counter() - t0


def loop_figures(lines, start_marker, last_step):
    """(train-loop seconds, final val loss) from timed lines: from the first line starting with
    `start_marker` to the eval line of `last_step`."""
    start = next(t for t, line in lines if line.startswith(start_marker))
    evals = [(t, m) for t, line in lines if (m := EVAL_LINE.search(line)) and int(m.group(1)) == last_step]
    if not evals:
        sys.exit(f"no eval line for step {last_step} in the output")
    t, m = evals[-1]
    return t - start, float(m.group(3))


def run_nanogpt(checkout: Path, text: Path, steps: int) -> dict:
    data_dir = checkout / "data" / "shakespeare_char"
    shutil.copyfile(text, data_dir / "input.txt")
    _, prep_s = timed_lines([sys.executable, "prepare.py"], data_dir)
    with tempfile.TemporaryDirectory() as out:
        args = [a if not a.startswith("--max_iters") else f"--max_iters={steps}" for a in NANOGPT_ARGS]
        args = [a if not a.startswith("--lr_decay_iters") else f"--lr_decay_iters={steps}" for a in args]
        lines, wall = timed_lines([sys.executable, "train.py", "config/train_shakespeare_char.py", *args,
                                   f"--out_dir={out}"], checkout)
    loop_s, val = loop_figures(lines, "step 0:", steps)
    return {"wall_s": prep_s + wall, "prepare_s": prep_s, "loop_s": loop_s, "val_loss": val}


def run_gpt_jax(text: Path, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lines, wall = timed_lines([sys.executable, str(ROOT / "train.py"), "--config",
                                   str(ROOT / "configs" / "shakespeare_char_cpu.yaml"), f"data.source={text}",
                                   f"data.cache_dir={tmp}/cache", f"train.out_dir={tmp}/run", f"train.steps={steps}",
                                   f"optim.decay_steps={steps}"], ROOT, env={"PYTHONPATH": str(ROOT)})
    loop_s, val = loop_figures(lines, "parallel:", steps)
    return {"wall_s": wall, "loop_s": loop_s, "val_loss": val}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", required=True, type=Path, help="path of a nanoGPT checkout")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt",
                        help="Tiny Shakespeare input.txt (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=1, help="pairs of runs, nanoGPT first in each")
    parser.add_argument("--steps", type=int, default=2000, help="iterations (2000 as in nanoGPT's README)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (args.nanogpt / "train.py").is_file() or not (args.nanogpt / "data" / "shakespeare_char").is_dir():
        sys.exit(f"{args.nanogpt} is not a nanoGPT checkout (train.py, data/shakespeare_char/); "
                 "git clone https://github.com/karpathy/nanoGPT")
    if not args.data.is_file():
        sys.exit(f"{args.data} not found; give Tiny Shakespeare's input.txt with --data")
    results = []
    for i in range(args.runs):
        pair = {"nanogpt": run_nanogpt(args.nanogpt.resolve(), args.data.resolve(), args.steps),
                "gpt_jax": run_gpt_jax(args.data.resolve(), args.steps), "loadavg": os.getloadavg()[0]}
        results.append(pair)
        for name, r in (("nanoGPT", pair["nanogpt"]), ("gpt_jax", pair["gpt_jax"])):
            print(f"run {i + 1} {name:8s} wall {r['wall_s']:6.1f} s  train loop {r['loop_s']:6.1f} s  "
                  f"val loss {r['val_loss']:.4f}", flush=True)
        n, g = pair["nanogpt"], pair["gpt_jax"]
        print(f"run {i + 1} gpt_jax speed-up: {n['wall_s'] / g['wall_s']:.2f}x wall, {n['loop_s'] / g['loop_s']:.2f}x "
              f"train loop; val loss difference {g['val_loss'] - n['val_loss']:+.4f} "
              f"(1-min load average after: {pair['loadavg']:.1f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
