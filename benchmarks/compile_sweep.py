"""Every preset under every parallel layout of 8 devices, compiled for TPU v5e x8 and H100 x8.

    python benchmarks/compile_sweep.py --out benchmarks/compile_sweep.jsonl    # resumable
    python benchmarks/compile_sweep.py --out benchmarks/compile_sweep.jsonl --table

Layouts are the (data, fsdp, tensor) sizes from 1, 2, 4, 8 whose product is 8 (ten of them). The run is
configs/gpt2_124m.yaml's (bf16, T = 1024, fp32 parameters and AdamW, remat: dots) with model.preset set,
two layers (how a step partitions does not depend on depth; compile time hardly does under nn.scan, but
two keep the sweep short) and one sequence per data shard. Each case is one of: compiled (with the
attention kernel found and the plan per device), refused by gpt_jax before compiling (its one line), or
an error inside the compiler, which is a bug.
"""

import argparse
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_jax import aot, targets  # noqa: E402
from gpt_jax.config import ConfigError, load_config  # noqa: E402

PRESETS = ["gpt1", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
LAYOUTS = [s for s in itertools.product((1, 2, 4, 8), repeat=3) if math.prod(s) == 8]
TARGETS = ["v5e-8", "h100x8"]


def case(preset, layout, target, devices) -> dict:
    data, fsdp, tensor = layout
    t = time.time()
    try:
        config = load_config(ROOT / "configs" / "gpt2_124m.yaml", [
            f"model.preset={preset}", "model.n_layer=2", f"train.batch_size={data * fsdp}", "optim.grad_accum=1",
            "parallel.strategy=mesh", f"parallel.data={data}", f"parallel.fsdp={fsdp}", f"parallel.tensor={tensor}"])
        entry = aot.compile_programs(config, target, devices, programs=("train",))["train"]
    except ConfigError as e:
        return {"outcome": "refused", "message": str(e), "seconds": round(time.time() - t, 1)}
    except Exception as e:  # noqa: BLE001 - a compiler's crash is what this sweep looks for
        return {"outcome": "crashed", "message": f"{type(e).__name__}: {str(e)[:500]}",
                "trace": traceback.format_exc()[-1500:], "seconds": round(time.time() - t, 1)}
    if "error" in entry:
        return {"outcome": "does not fit", "message": entry["error"], "seconds": round(time.time() - t, 1)}
    return {"outcome": "compiled", "kernel": entry["kernel"], "gib": round(entry["total"] / 2**30, 3),
            "collectives": entry["collectives"], "seconds": round(entry["seconds"], 1)}


def run(out: Path):
    done = {(r["target"], r["preset"], tuple(r["layout"])) for r in map(json.loads, out.read_text().splitlines())} \
        if out.exists() else set()
    for name in TARGETS:
        target = targets.get(name)
        devices = targets.devices(target)
        for preset, layout in itertools.product(PRESETS, LAYOUTS):
            if (name, preset, layout) in done:
                continue
            record = {"target": name, "preset": preset, "layout": layout, **case(preset, layout, target, devices),
                      "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)


def table(out: Path) -> str:
    records = {(r["target"], r["preset"], tuple(r["layout"])): r for r in map(json.loads, out.read_text().splitlines())}
    lines = ["| data x fsdp x tensor | " + " | ".join(PRESETS) + " |", "|---|" + "---|" * len(PRESETS)]
    for layout in LAYOUTS:
        cells = []
        for preset in PRESETS:
            marks = []
            for name in TARGETS:
                r = records.get((name, preset, layout))
                marks.append("?" if r is None else {"compiled": "ok", "refused": "refused", "does not fit": "OOM",
                                                    "crashed": "CRASH"}[r["outcome"]])
            cells.append(" / ".join(marks))
        lines.append(f"| {' x '.join(map(str, layout))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "compile_sweep.jsonl")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out (TPU / H100 per cell)")
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    jax.config.update("jax_platforms", "cpu")
    run(args.out)


if __name__ == "__main__":
    main()
