"""GPT-1's results at CPU scale: the experiments of BENCHMARKS.md "GPT-1 at CPU scale".

Run after the pretraining (python train.py --config configs/gpt1_cpu_pretrain.yaml):

    python benchmarks/gpt1_cpu.py hp          # learning rate per initialisation, on held-out training labels
    python benchmarks/gpt1_cpu.py hp_aux      # then the aux LM loss on or off per initialisation, the same way
    python benchmarks/gpt1_cpu.py labels      # dev accuracy for 100 ... all labels, pretrained vs random, 3 seeds
    python benchmarks/gpt1_cpu.py transfer    # Figure 2 left: dev accuracy by transferred blocks
    python benchmarks/gpt1_cpu.py aux         # the auxiliary LM loss on and off
    python benchmarks/gpt1_cpu.py zeroshot    # Figure 2 right: zero-shot SST-2 across pretraining checkpoints
    python benchmarks/gpt1_cpu.py report      # markdown tables; PNGs in benchmarks/figures/

Every fine-tuning run is `train.py --config configs/gpt1_cpu_sst2.yaml` with dotted overrides and its
own run directory under runs/gpt1_cpu/; a run that finished is read back, not repeated, so the
commands can be stopped and started again. Each run's result is its result.json; the choices are in
runs/gpt1_cpu/hp.json and the zero-shot curve in runs/gpt1_cpu/zeroshot.json.

Protocol (nothing is chosen on the 872 dev sentences):
- labelled examples: the first N rows of sst2/train_heldout.tsv (N = 100, 300, 1,000, 3,000); "all" is
  the whole GLUE training set (train_heldout.tsv + train.tsv, 67,349 phrases);
- held-out slice for choosing hyper-parameters: train_heldout.tsv rows 3,001-6,735 (3,735 phrases), never
  used as labels below 3,000;
- the number reported is dev accuracy after the last epoch (not the best epoch on dev), mean and
  spread (min-max) of seeds 0, 1, 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
OUT = ROOT / "runs" / "gpt1_cpu"
PRETRAIN = ROOT / "runs" / "gpt1_cpu_pretrain"
CONFIG = ROOT / "configs" / "gpt1_cpu_sst2.yaml"
FIGURES = ROOT / "benchmarks" / "figures"
SEEDS = (0, 1, 2)
SIZES = (100, 300, 1000, 3000, "all")
# epochs by number of labels: 80-280 optimizer steps up to 3,000 labels, one pass over all 67k
EPOCHS = {100: 20, 300: 10, 1000: 6, 3000: 3, "all": 1}
HP_LRS = (5e-4, 1e-3, 2e-3)


@functools.cache
def label_files() -> dict:
    """data_cache/gpt1_cpu/{heldout,all}.tsv, made from the SST-2 training files (once per command)."""
    d = ROOT / "data_cache" / "gpt1_cpu"
    d.mkdir(parents=True, exist_ok=True)
    heldout_rows = (SST2 / "train_heldout.tsv").read_text(encoding="utf-8").splitlines()
    train_rows = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()
    header = heldout_rows[0]
    files = {"heldout": d / "heldout.tsv", "all": d / "all.tsv"}
    files["heldout"].write_text("\n".join([header] + heldout_rows[1 + 3000:]) + "\n", encoding="utf-8")
    files["all"].write_text("\n".join([header] + heldout_rows[1:] + train_rows[1:]) + "\n", encoding="utf-8")
    return files


def finetune(name: str, overrides: dict, runs: Path = OUT, config: Path = CONFIG) -> dict:
    """One fine-tuning run (or its earlier result): the per-epoch eval records and the wall time."""
    out = runs / name
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(config), f"train.out_dir={out}"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    print("$", " ".join(args[1:]), flush=True)
    t0 = time.time()
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / "data_cache" / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    result = {"name": name, "overrides": overrides, "seconds": time.time() - t0,
              "evals": [{k: r[k] for k in ("epoch", "step", "train_accuracy", "dev_accuracy") if k in r} for r in evals],
              "final": evals[-1]["dev_accuracy"]}
    done.write_text(json.dumps(result, indent=1))
    print(f"  {name}: accuracy after the last epoch {result['final']:.4f} "
          f"({' '.join(format(r['dev_accuracy'], '.3f') for r in evals)}), {result['seconds']:.0f} s", flush=True)
    return result


def base(init: str, size, seed: int, dev: str = "dev", **extra) -> dict:
    files = label_files()
    o = {"train.seed": seed, "finetune.epochs": EPOCHS[size],
         "finetune.reinit": str(init == "random").lower()}
    if size == "all":
        o["finetune.train_file"], o["finetune.max_examples"] = str(files["all"]), "null"  # every row
    else:
        o["finetune.max_examples"] = size
    if dev == "heldout":
        o["finetune.dev_file"] = str(files["heldout"])
    o.update(extra)
    return o


def chosen_lr() -> dict:
    path = OUT / "hp.json"
    if not path.is_file():
        sys.exit("run `python benchmarks/gpt1_cpu.py hp` first: it chooses the learning rates")
    return json.loads(path.read_text())["chosen"]


def cmd_hp(args) -> None:
    """Learning rate for each initialisation: 1,000 labels, seed 0, accuracy on the held-out slice."""
    table = {}
    for init in ("pretrained", "random"):
        for lr in HP_LRS:
            table[f"{init} {lr:g}"] = finetune(f"hp-{init}-lr{lr:g}-s0",
                                               base(init, 1000, 0, dev="heldout", **{"finetune.lr": lr}))["final"]
    chosen = {init: max(HP_LRS, key=lambda lr: table[f"{init} {lr:g}"]) for init in ("pretrained", "random")}
    (OUT / "hp.json").write_text(json.dumps({"heldout_accuracy": table, "chosen": chosen}, indent=1))
    print(json.dumps({"heldout_accuracy": table, "chosen": chosen}, indent=1))


def cmd_hp_aux(args) -> None:
    """The auxiliary LM loss on (0.5) or off (0) for each initialisation, at its chosen learning rate,
    on the held-out slice: the setting each initialisation would pick for itself."""
    hp = json.loads((OUT / "hp.json").read_text())
    lr = chosen_lr()
    for init in ("pretrained", "random"):
        off = finetune(f"hp-{init}-lr{lr[init]:g}-aux0-s0",
                       base(init, 1000, 0, dev="heldout", **{"finetune.lr": lr[init], "finetune.lm_coef": 0}))["final"]
        hp["heldout_accuracy"][f"{init} {lr[init]:g} lm_coef 0"] = off
        on = hp["heldout_accuracy"][f"{init} {lr[init]:g}"]
        hp.setdefault("chosen_lm_coef", {})[init] = 0.5 if on >= off else 0.0
    (OUT / "hp.json").write_text(json.dumps(hp, indent=1))
    print(json.dumps(hp, indent=1))


def cmd_labels(args) -> None:
    lr = chosen_lr()
    for size in args.sizes:
        size = size if size == "all" else int(size)
        for init in ("pretrained", "random"):
            for s in args.seeds:
                finetune(f"labels-{init}-{size}-s{s}", base(init, size, s, **{"finetune.lr": lr[init]}))


def cmd_transfer(args) -> None:
    lr = chosen_lr()["pretrained"]
    n_layer = yaml.safe_load((PRETRAIN / "config.yaml").read_text())["model"]["n_layer"]
    for n in range(n_layer + 1):
        for s in args.seeds:
            extra = {"finetune.lr": lr} if n == n_layer else {"finetune.lr": lr, "finetune.transfer_layers": n}
            name = f"labels-pretrained-1000-s{s}" if n == n_layer else f"transfer{n}-s{s}"
            finetune(name, base("pretrained", 1000, s, **extra))


def cmd_aux(args) -> None:
    lr = chosen_lr()
    for init in ("pretrained", "random"):
        for s in args.seeds:
            finetune(f"aux0-{init}-s{s}", base(init, 1000, s, **{"finetune.lr": lr[init], "finetune.lm_coef": 0}))


def cmd_zeroshot(args) -> None:
    import jax

    from gpt_jax import zeroshot
    from gpt_jax.model import init_params
    from gpt_jax.runs import load_for_sampling

    steps = sorted(int(p.name) for p in (PRETRAIN / "checkpoints").iterdir() if p.name.isdigit())
    results = []
    config, _, tok = load_for_sampling(str(PRETRAIN))
    params = init_params(config, jax.random.PRNGKey(0))
    for step in [0] + steps:
        if step:
            config, params, tok = load_for_sampling(str(PRETRAIN), step=step)
        r = zeroshot.run("sst2", config, params, tok)
        results.append({"step": step, "accuracy": r["accuracy"], "positive": r["positive"], "auc": r["auc"]})
        print(f"step {step}: zero-shot SST-2 dev accuracy {r['accuracy']:.4f} (predicts positive {r['positive']:.3f}), "
              f"AUC {r['auc']:.4f}", flush=True)
    (OUT / "zeroshot.json").write_text(json.dumps(results, indent=1))


def _stats(names) -> tuple:
    vals = [json.loads((OUT / n / "result.json").read_text())["final"] for n in names
            if (OUT / n / "result.json").is_file()]
    if not vals:
        return None
    return statistics.mean(vals), min(vals), max(vals), len(vals)


def _fmt(st) -> str:
    return "—" if st is None else f"{st[0]:.4f} ({st[1]:.3f}-{st[2]:.3f}, n={st[3]})"


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(exist_ok=True)

    lines = ["| labels | pretrained | random | difference (points) |", "|---|---|---|---|"]
    curve = {"pretrained": [], "random": []}
    for size in SIZES:
        st = {init: _stats([f"labels-{init}-{size}-s{s}" for s in SEEDS]) for init in curve}
        diff = "—" if None in st.values() else f"{100 * (st['pretrained'][0] - st['random'][0]):+.1f}"
        label = "all (67,349)" if size == "all" else f"{size:,}"
        lines.append(f"| {label} | {_fmt(st['pretrained'])} | {_fmt(st['random'])} | {diff} |")
        for init in curve:
            if st[init]:
                curve[init].append((67349 if size == "all" else size, st[init]))
    print("\n".join(lines), "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init, pts in curve.items():
        if pts:
            x = [p[0] for p in pts]
            ax.errorbar(x, [p[1][0] for p in pts], yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]],
                        marker="o", capsize=3, label=init)
    ax.set_xscale("log"), ax.set_xlabel("labelled training examples"), ax.set_ylabel("SST-2 dev accuracy")
    ax.legend(), ax.grid(alpha=0.3), fig.tight_layout(), fig.savefig(FIGURES / "gpt1_cpu_label_efficiency.png", dpi=120)

    n_layer = yaml.safe_load((PRETRAIN / "config.yaml").read_text())["model"]["n_layer"]
    lines = ["| blocks transferred | dev accuracy (1,000 labels) |", "|---|---|"]
    pts = []
    for n in range(n_layer + 1):
        names = [f"labels-pretrained-1000-s{s}" if n == n_layer else f"transfer{n}-s{s}" for s in SEEDS]
        st = _stats(names)
        lines.append(f"| {n} | {_fmt(st)} |")
        if st:
            pts.append((n, st))
    print("\n".join(lines), "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts],
                    yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]], marker="o", capsize=3)
    ax.set_xlabel("pretrained blocks transferred (embeddings always)"), ax.set_ylabel("SST-2 dev accuracy")
    ax.grid(alpha=0.3), fig.tight_layout(), fig.savefig(FIGURES / "gpt1_cpu_transfer_layers.png", dpi=120)

    lines = ["| initialisation | aux LM loss (lm_coef 0.5) | no aux LM loss (lm_coef 0) |", "|---|---|---|"]
    aux = {}
    for init in ("pretrained", "random"):
        aux[init] = (_stats([f"labels-{init}-1000-s{s}" for s in SEEDS]), _stats([f"aux0-{init}-s{s}" for s in SEEDS]))
        lines.append(f"| {init} | {_fmt(aux[init][0])} | {_fmt(aux[init][1])} |")
    print("\n".join(lines), "\n")

    zs = json.loads((OUT / "zeroshot.json").read_text()) if (OUT / "zeroshot.json").is_file() else []
    if zs:
        print("| pretraining step | zero-shot SST-2 dev accuracy | share predicted positive | AUC |\n|---|---|---|---|")
        for r in zs:
            print(f"| {r['step']:,} | {r['accuracy']:.4f} | {r['positive']:.3f} | {r['auc']:.4f} |")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if zs:
        a1.plot([r["step"] for r in zs], [r["accuracy"] for r in zs], marker="o", label="accuracy")
        a1.plot([r["step"] for r in zs], [r["auc"] for r in zs], marker="s", label="AUC (threshold-free)")
        a1.axhline(0.5, color="grey", lw=0.8, ls="--"), a1.legend()
    a1.set_xlabel("pretraining step"), a1.set_ylabel("zero-shot SST-2 dev"), a1.grid(alpha=0.3)
    a1.set_title("zero-shot (' very' + positive/negative)")
    for i, init in enumerate(("pretrained", "random")):
        for j, st in enumerate(aux[init]):
            if st:
                a2.bar(i * 3 + j, st[0], yerr=[[st[0] - st[1]], [st[2] - st[0]]], capsize=3,
                       color="C0" if j == 0 else "C1", label=("aux LM loss" if j == 0 else "no aux LM loss") if i == 0 else None)
    a2.set_xticks([0.5, 3.5], ["pretrained", "random"]), a2.set_ylim(0.5, None), a2.set_ylabel("dev accuracy (1,000 labels)")
    a2.legend(), a2.set_title("aux LM loss ablation"), fig.tight_layout(), fig.savefig(FIGURES / "gpt1_cpu_zeroshot_and_aux.png", dpi=120)
    print(f"PNGs in {FIGURES}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hp")
    sub.add_parser("hp_aux")
    p = sub.add_parser("labels")
    p.add_argument("--sizes", nargs="+", default=[str(s) for s in SIZES])
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    for name in ("transfer", "aux"):
        sub.add_parser(name).add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    sub.add_parser("zeroshot")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if not (PRETRAIN / "config.yaml").is_file() and args.cmd != "report":
        sys.exit(f"{PRETRAIN} has no pretrained model: python train.py --config configs/gpt1_cpu_pretrain.yaml")
    OUT.mkdir(parents=True, exist_ok=True)
    globals()[f"cmd_{args.cmd}"](args)


if __name__ == "__main__":
    main()
