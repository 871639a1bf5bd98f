"""Pretrain a GPT: python train.py [--config configs/NAME.yaml] [section.key=value ...]

Without --config it runs configs/quickstart.yaml. Running again with the same train.out_dir resumes.
"""

import argparse
import sys
from pathlib import Path

from gpt_jax.errors import ArgumentParser

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layer=6 optim.lr=3e-4")
    parser.add_argument("--dry-run", action="store_true",
                        help="compile one step, print per-device memory, train nothing")
    parser.add_argument("--compile-for", metavar="TARGET",
                        help="compile the run's programs for TARGET (v5e-8, h100x8, ...) with its real compiler, "
                             "report memory per device, train nothing; 'list' names the targets")
    args = parser.parse_args(argv)

    from gpt_jax.trainer import run_training

    return run_training(args.config, args.overrides, compile_only=args.dry_run, compile_for=args.compile_for)


if __name__ == "__main__":
    sys.exit(main())
