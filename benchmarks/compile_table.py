"""What fits where, from the compilers: for each GPT-2 size and target, the largest per-device batch
at T = 1024 whose train step the target's compiler plans within a device's memory.

    python benchmarks/compile_table.py --out benchmarks/compile_table.jsonl [--targets v5e-8 h100 ...]
    python benchmarks/compile_table.py --out benchmarks/compile_table.jsonl --table   # the README's table

The run is configs/gpt2_124m.yaml's (bf16 compute, fp32 parameters and AdamW, remat: dots, no dropout),
with model.preset set to each size, compiled by `gpt_jax.aot` on the target's abstract devices. Layouts:
one device; or, on a several-device target, data parallel (parameters replicated) and fsdp over every
device. Memory grows about linearly with the batch, so the search compiles batch 1 and 8, predicts the
largest batch from the line through them, compiles that batch (stepping down until one fits), then
bisects up to three times between the largest batch that fits and the smallest that does not. Each finished cell is appended to --out, so a stopped run goes on where it stopped.
"""

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_jax import aot, targets  # noqa: E402
from gpt_jax.config import load_config  # noqa: E402

SIZES = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
TARGETS = ["v5e-8", "v4-8", "v5p-8", "v6e-8", "h100", "h100x8"]
CAP = 64  # per-device batches above this are reported as ">= 64"


def planned(size: str, target, devices, layout: str, batch: int) -> float | None:
    """GiB per device the compiler plans for one train step, or the GiB it said it needed when it refused."""
    n = 1 if layout == "single" else target.devices
    parallel = {"single": ["parallel.strategy=single"],
                "data": ["parallel.strategy=mesh", f"parallel.data={n}", "parallel.fsdp=1", "parallel.tensor=1"],
                "fsdp": ["parallel.strategy=mesh", "parallel.data=1", f"parallel.fsdp={n}", "parallel.tensor=1"]}
    config = load_config(ROOT / "configs" / "gpt2_124m.yaml", [
        f"model.preset={size}", f"train.batch_size={batch * n}", "optim.grad_accum=1", *parallel[layout]])
    entry = aot.compile_programs(config, target, devices, programs=("train",))["train"]
    if "error" in entry:
        used = re.search(r"Used ([0-9.]+)([GM])", entry["error"])
        return (float(used.group(1)) / (1024 if used.group(2) == "M" else 1)) if used else math.inf
    return entry["total"] / 2**30


def largest_batch(size, target, devices, layout, usable_gib) -> dict:
    """The largest per-device batch that fits, with the planned GiB at it."""
    tried = {}

    def fits(b):
        if b not in tried:
            tried[b] = planned(size, target, devices, layout, b)
        return tried[b] <= usable_gib

    if not fits(1):
        return {"batch": 0, "gib": tried[1], "tried": tried}
    fits(8)
    slope = max((tried[8] - tried[1]) / 7, 1e-6)
    b = max(1, min(CAP, 1 + int((usable_gib - tried[1]) / slope)))
    while not fits(b):  # the line was optimistic (memory grows a little faster than linearly): step down
        b = max(1, b - max(1, math.ceil((tried[b] - usable_gib) / slope)))
    failed = [n for n in tried if n > b and tried[n] > usable_gib]
    hi = min(failed) if failed else None
    for _ in range(3):  # then bisect between the largest batch that fits and the smallest that does not
        if hi is None or hi - b <= 1:
            break
        mid = (b + hi) // 2
        b, hi = (mid, hi) if fits(mid) else (b, mid)
    return {"batch": b, "gib": tried[b], "next_does_not_fit": hi, "tried": tried}


def layouts_of(target, layouts) -> list[str]:
    return ["single"] if target.devices == 1 else [lay for lay in ("data", "fsdp") if lay in layouts]


def run(out: Path, names, layouts):
    done = {(r["target"], r["size"], r["layout"]) for r in map(json.loads, out.read_text().splitlines())} \
        if out.exists() else set()
    for name in names:
        target = targets.get(name)
        devices = targets.devices(target)
        usable = targets.usable_memory(target)[0] / 2**30
        for size in SIZES:
            for layout in layouts_of(target, layouts):
                if (name, size, layout) in done:
                    continue
                t = time.time()
                r = largest_batch(size, target, devices, layout, usable)
                record = {"target": name, "size": size, "layout": layout, "usable_gib": round(usable, 2),
                          **r, "seconds": round(time.time() - t), "jax": jax.__version__,
                          "date": time.strftime("%Y-%m-%d")}
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)


def table(out: Path) -> str:
    rows = {}
    for r in map(json.loads, out.read_text().splitlines()):
        hi = r.get("next_does_not_fit")
        slope = (r["tried"].get("8", 0) - r["tried"]["1"]) / 7 if "8" in r["tried"] else 0
        if hi is None and r["batch"] < CAP and r["gib"] + slope > r["usable_gib"]:
            hi = r["batch"] + 1  # one more sequence would not fit by the line through batch 1 and 8
        cell = "does not fit" if r["batch"] == 0 else (
            f">= {r['batch']}" if r["batch"] >= CAP or hi is None else str(r["batch"]) + (
                f" (< {hi})" if hi > r["batch"] + 1 else ""))
        rows.setdefault(r["size"], {})[(r["target"], r["layout"])] = f"{cell} ({r['gib']:.1f} GiB)" \
            if r["batch"] else cell
    cols = [(t, lay) for t in TARGETS for lay in layouts_of(targets.get(t), ("fsdp",) if t.startswith("v") else
                                                                 ("data", "fsdp"))]
    head = "| model | " + " | ".join(f"{t} {'' if lay == 'single' else lay}".strip() for t, lay in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for size in SIZES:
        lines.append(f"| {size} | " + " | ".join(rows.get(size, {}).get(c, "") for c in cols) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "compile_table.jsonl")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--layouts", nargs="+", default=["data", "fsdp"], choices=["data", "fsdp"],
                        help="layouts of several-device targets (one-device targets: single)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    jax.config.update("jax_platforms", "cpu")
    run(args.out, args.targets, args.layouts)


if __name__ == "__main__":
    main()
