"""GPT-1's Figure 2 at CPU scale, both panels, on the 8 x 256 model of configs/gpt1_fig2_pretrain.yaml.

    python train.py --config configs/gpt1_fig2_pretrain.yaml   # stage 1; rerun to resume where it stopped
    python benchmarks/gpt1_fig2.py zeroshot    # right: every heuristic on every kept checkpoint not yet scored
    python benchmarks/gpt1_fig2.py hp          # left: the learning rates, on held-out training phrases
    python benchmarks/gpt1_fig2.py transfer    # left: 0 ... n_layer blocks transferred, seeds 0, 1, 2
    python benchmarks/gpt1_fig2.py report      # tables and rank correlations; PNGs in benchmarks/figures/

`zeroshot` can run while the pretraining does (it scores the kept checkpoints that exist). Every fine-tuning
run is `train.py --config configs/gpt1_fig2_sst2.yaml` with dotted overrides, one run directory each under
runs/gpt1_fig2/; a finished run is read back, not repeated, so each command can stop and start again.
`report` also writes benchmarks/gpt1_fig2_results.json, the numbers behind BENCHMARKS.md.

Protocol, fixed before the first checkpoint of the run was scored (nothing is chosen on SST-2 dev):
- Right panel. Each dev sentence, then a prompt; the prediction compares two continuations (HEURISTICS).
  "paper" is GPT-1's (" very", then " positive" / " negative"). The other two use the words the pretraining
  text pairs most often with sentiment, counted (case-insensitive, whole words) in the raw source files:
  "very good" 2,766 and "very bad" 584 times, against "very positive" 23 and "very negative" 13; "was great"
  781 and "was terrible" 287. PRIMARY ("very good/bad") is the heuristic the claim rests on. Scores: accuracy
  and the AUC of the log-likelihood margin (which does not depend on the model's balance between the two
  words), at step 0 (the run's initialisation) and every kept step. The trend is shown when Spearman's rank
  correlation of PRIMARY's AUC with the step is at least 0.5 with a one-sided p below 0.01.
- Left panel. Labels: the first 10,000 phrases of sst2/train.tsv, one epoch, batch 32, the auxiliary LM
  loss (lm_coef 0.5). `finetune.transfer_layers=N` keeps the pretrained embeddings and the first N blocks.
  Learning rates are chosen on sst2/train_heldout.tsv (6,735 phrases, not in train.tsv), seed 0, separately
  for embeddings-only (N = 0) and all blocks, from 2.5e-4, 5e-4, 1e-3 (widened by 2x while the best is at an
  edge); blocks 1 ... n_layer - 1 use the all-blocks rate. Reported: dev accuracy after the epoch, mean and
  min-max of seeds 0, 1, 2. The trend is shown when all blocks beat embeddings-only by more than the seed
  spread (the all-blocks minimum above the embeddings-only maximum).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import yaml
from gpt1_cpu import (  # the run-or-read-back helper of the 6 x 128 experiments
    FIGURES,
    ROOT,
    SST2,
    finetune,
)

PRETRAIN = ROOT / "runs" / "gpt1_fig2_pretrain"
OUT = ROOT / "runs" / "gpt1_fig2"
CONFIG = ROOT / "configs" / "gpt1_fig2_sst2.yaml"
RESULTS = ROOT / "benchmarks" / "gpt1_fig2_results.json"
SEEDS = (0, 1, 2)
HP_LRS = (2.5e-4, 5e-4, 1e-3)
HEURISTICS = {
    "paper": {"template": "{text} very", "candidates": [" negative", " positive"]},
    "very good/bad": {"template": "{text} very", "candidates": [" bad", " good"]},
    "it was great/terrible": {"template": "{text} it was", "candidates": [" terrible", " great"]},
}
PRIMARY = "very good/bad"
MIN_RHO, MAX_P = 0.5, 0.01


def n_layer() -> int:
    return yaml.safe_load((PRETRAIN / "config.yaml").read_text())["model"]["n_layer"]


def kept_steps() -> list[int]:
    d = PRETRAIN / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def cmd_zeroshot(args) -> None:
    import jax

    from gpt_jax import zeroshot
    from gpt_jax.model import init_params
    from gpt_jax.runs import load_for_sampling

    path = OUT / "zeroshot.jsonl"
    done = {r["step"] for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else set()
    kept = kept_steps()
    todo = [s for s in [0] + kept if s not in done] if kept else []
    seed = yaml.safe_load((PRETRAIN / "config.yaml").read_text())["train"].get("seed", 0)
    for step in todo:
        config, params, tok = load_for_sampling(str(PRETRAIN), step=step or kept[0])
        if step == 0:  # the run's own initialisation (gpt_jax.pretrain: init_params with fold_in(key, 0))
            params = init_params(config, jax.random.fold_in(jax.random.key(seed), 0))
        rec = {"step": step}
        for name, prompt in HEURISTICS.items():
            r = zeroshot.sst2(config, params, tok, SST2 / "dev.tsv", prompt)
            rec[name] = {"accuracy": r["accuracy"], "positive": r["positive"], "auc": r["auc"]}
        with path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"step {step}: " + "; ".join(f"{n} accuracy {v['accuracy']:.3f} AUC {v['auc']:.3f}"
                                          for n, v in rec.items() if n != "step"), flush=True)


def base(seed: int, lr: float, blocks: int | None, dev: str = "dev") -> dict:
    o = {"train.seed": seed, "finetune.lr": lr}
    if blocks is not None:
        o["finetune.transfer_layers"] = blocks
    if dev == "heldout":
        o["finetune.dev_file"] = str(SST2 / "train_heldout.tsv")
    return o


def cmd_hp(args) -> None:
    """Learning rate for embeddings-only and for all blocks: seed 0, accuracy on the held-out phrases."""
    table, chosen = {}, {}
    for setting, blocks in (("embeddings", 0), ("all", None)):
        lrs = list(HP_LRS)
        while True:
            for lr in lrs:
                if f"{setting} {lr:g}" not in table:
                    r = finetune(f"hp-{setting}-lr{lr:g}-s0", base(0, lr, blocks, dev="heldout"), OUT, CONFIG)
                    table[f"{setting} {lr:g}"] = r["final"]
            best = max(lrs, key=lambda lr: table[f"{setting} {lr:g}"])
            if best == lrs[0] and len(lrs) < 5:
                lrs.insert(0, lrs[0] / 2)
            elif best == lrs[-1] and len(lrs) < 5:
                lrs.append(lrs[-1] * 2)
            else:
                break
        chosen[setting] = best
    (OUT / "hp.json").write_text(json.dumps({"heldout_accuracy": table, "chosen": chosen}, indent=1))
    print(json.dumps({"heldout_accuracy": table, "chosen": chosen}, indent=1))


def chosen_lr() -> dict:
    path = OUT / "hp.json"
    if not path.is_file():
        sys.exit("run `python benchmarks/gpt1_fig2.py hp` first: it chooses the learning rates")
    return json.loads(path.read_text())["chosen"]


def run_name(blocks: int, seed: int) -> str:
    return f"transfer{blocks}-s{seed}"


def cmd_transfer(args) -> None:
    lr, n = chosen_lr(), n_layer()
    order = [0, n] + [b for b in range(1, n)] if args.blocks is None else args.blocks  # the two ends first
    for seed in args.seeds:
        for blocks in order:
            finetune(run_name(blocks, seed), base(seed, lr["embeddings" if blocks == 0 else "all"],
                                                  None if blocks == n else blocks), OUT, CONFIG)


def _stats(vals) -> dict | None:
    return {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "n": len(vals), "values": vals} \
        if vals else None


def collect() -> dict:
    from scipy.stats import spearmanr

    res = {"heuristics": HEURISTICS, "primary": PRIMARY}
    zs = OUT / "zeroshot.jsonl"
    rows = sorted(map(json.loads, zs.read_text().splitlines()), key=lambda r: r["step"]) if zs.is_file() else []
    res["zeroshot"] = rows
    res["rank_correlation"] = {}
    for name in HEURISTICS:
        for metric in ("auc", "accuracy"):
            if len(rows) >= 3:
                rho, p = spearmanr([r["step"] for r in rows], [r[name][metric] for r in rows], alternative="greater")
                res["rank_correlation"][f"{name} {metric}"] = {"rho": float(rho), "p_one_sided": float(p), "n": len(rows)}
    if (OUT / "hp.json").is_file():
        res["hp"] = json.loads((OUT / "hp.json").read_text())
    transfer = {}
    if (PRETRAIN / "config.yaml").is_file():
        for blocks in range(n_layer() + 1):
            vals = [json.loads(p.read_text())["final"] for s in SEEDS
                    if (p := OUT / run_name(blocks, s) / "result.json").is_file()]
            if vals:
                transfer[blocks] = _stats(vals)
    res["transfer"] = transfer
    n = n_layer() if transfer else None
    if transfer and 0 in transfer and n in transfer:  # the criterion fixed beforehand: all-blocks min > embeddings max
        emb, full = transfer[0], transfer[n]
        res["left_panel"] = {"gap": full["mean"] - emb["mean"], "trend_shown": full["min"] > emb["max"],
                             "seed_spread": max(emb["max"] - emb["min"], full["max"] - full["min"])}
    return res


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    res = collect()
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    rows = res["zeroshot"]
    if rows:
        head = " | ".join(f"{n}: acc / AUC" for n in HEURISTICS)
        print(f"| step | {head} |\n|---:|" + "---:|" * len(HEURISTICS))
        for r in rows:
            print(f"| {r['step']:,} | " + " | ".join(f"{r[n]['accuracy']:.3f} / {r[n]['auc']:.3f}" for n in HEURISTICS) + " |")
        print()
        for k, v in res["rank_correlation"].items():
            print(f"Spearman {k} vs step: rho {v['rho']:+.3f}, one-sided p {v['p_one_sided']:.2g} (n={v['n']})")
    if res["transfer"]:
        print("\n| blocks transferred | dev accuracy, mean (min-max, n) |\n|---:|---|")
        for b, st in res["transfer"].items():
            print(f"| {b} | {st['mean']:.4f} ({st['min']:.3f}-{st['max']:.3f}, n={st['n']}) |")
        pts = sorted(res["transfer"].items())
        if len(pts) >= 2:
            slope = np.polyfit([b for b, _ in pts], [st["mean"] for _, st in pts], 1)[0]
            print(f"\nleast-squares slope: {100 * slope:+.2f} points per block")
        if lp := res.get("left_panel"):
            print(f"all {n_layer()} blocks vs embeddings only: {100 * lp['gap']:+.2f} points (largest seed range "
                  f"{100 * lp['seed_spread']:.2f} points); every all-blocks seed above every embeddings-only seed: "
                  f"{'yes' if lp['trend_shown'] else 'no'}")
    FIGURES.mkdir(exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for b, st in sorted(res["transfer"].items()):
        a1.errorbar([b], [st["mean"]], yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], fmt="o", color="C0",
                    capsize=3)
    if not res["transfer"]:
        a1.text(0.5, 0.5, "not run yet: python benchmarks/gpt1_fig2.py hp, then transfer", ha="center",
                transform=a1.transAxes, fontsize=9)
    a1.set_xlabel("pretrained blocks transferred (embeddings always)"), a1.set_ylabel("SST-2 dev accuracy")
    a1.set_title("10,000 labels, 1 epoch, 3 seeds (min-max)"), a1.grid(alpha=0.3)
    for i, name in enumerate(HEURISTICS):
        a2.plot([r["step"] for r in rows], [r[name]["auc"] for r in rows], marker="o", color=f"C{i}", label=f"{name} AUC")
        a2.plot([r["step"] for r in rows], [r[name]["accuracy"] for r in rows], ls=":", color=f"C{i}")
    a2.axhline(0.5, color="grey", lw=0.8, ls="--"), a2.set_xlabel("pretraining step")
    a2.set_ylabel("zero-shot SST-2 dev (AUC; dotted: accuracy)"), a2.grid(alpha=0.3)
    if rows:
        a2.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(FIGURES / "gpt1_fig2.png", dpi=120)
    print(f"\n{RESULTS.relative_to(ROOT)}; {(FIGURES / 'gpt1_fig2.png').relative_to(ROOT)}")


COMMANDS = {"zeroshot": cmd_zeroshot, "hp": cmd_hp, "transfer": cmd_transfer, "report": cmd_report}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cmd", choices=list(COMMANDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="transfer: these seeds")
    parser.add_argument("--blocks", nargs="+", type=int,
                        help="transfer: these block counts only (default: 0 and all first, then the rest)")
    args = parser.parse_args(argv)
    if args.cmd != "report" and not (PRETRAIN / "config.yaml").is_file():
        sys.exit(f"{PRETRAIN} has no pretrained model: python train.py --config configs/gpt1_fig2_pretrain.yaml")
    OUT.mkdir(parents=True, exist_ok=True)
    COMMANDS[args.cmd](args)


if __name__ == "__main__":
    main()
