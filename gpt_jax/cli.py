"""What train.py calls: load the config, train, turn known errors into one clear line."""

from __future__ import annotations

import signal
import sys

from gpt_jax.config import ConfigError, load_config
from gpt_jax.data import DataError
from gpt_jax.tokenizer import TokenizerError


def run_training(config_path, overrides, dry_run: bool = False) -> int:
    try:
        config = load_config(config_path, overrides)
        from gpt_jax.distributed import initialize

        initialize(config.parallel)  # multi-host: before anything touches a device
        from gpt_jax.trainer import dry_run as compile_only, sample_text, train

        if dry_run:
            compile_only(config)
            return 0
        result = train(config)
    except (ConfigError, DataError, TokenizerError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, FloatingPointError) else 3
    if result["interrupted"]:
        return 128 + signal.Signals[result["interrupted"]].value
    import jax

    if jax.process_index() != 0:  # process 0 reports for a multi-host run
        return 0
    tc = result["config"].train
    if config.mode == "finetune":
        best = result["best_dev_accuracy"]
        print(f"done: step {result['step']} of {tc.steps} ({tc.steps // tc.eval_every} epochs), "
              f"{result['seconds']:.0f} s" + (f", best dev accuracy {best:.4f}" if best is not None else "")
              + f"; run in {result['run_dir']}")
        return 0
    print(f"done: step {result['step']}, train loss {result.get('loss', float('nan')):.4f}, "
          f"val loss {result.get('val_loss', float('nan')):.4f}, {result['seconds']:.0f} s; run in {tc.out_dir}")
    if tc.sample_tokens > 0 and (jax.process_count() == 1 or result["config"].parallel.strategy != "mesh"):
        print("sample:\n" + sample_text(result["config"], result["params"], result["tokenizer"], tc.sample_prompt,
                                        tc.sample_tokens, seed=tc.seed, temperature=tc.sample_temperature))
    return 0
