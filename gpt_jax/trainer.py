"""Training from a config: `train(config)` runs (or resumes) the run it describes with the task its
`mode` names, `dry_run(config)` compiles one step and reports memory, and `run_training` is the
command train.py calls.

The loop (`gpt_jax.loop`) knows no task; this is the one place that picks the task for a config.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import jax
import jax.numpy as jnp

from gpt_jax import aot
from gpt_jax.config import Config, ConfigError, load_config
from gpt_jax.distributed import initialize
from gpt_jax.errors import entry_point
from gpt_jax.finetune import FinetuneTask
from gpt_jax.loop import run
from gpt_jax.optim import make_optimizer, make_schedule
from gpt_jax.parallel import batch_sharding, make_strategy
from gpt_jax.pretrain import PretrainTask, init_state, make_train_step
from gpt_jax.runlog import require_wandb
from gpt_jax.runs import sample_text


def train(config: Config, verbose: bool = True) -> dict:
    """Run (or resume) the run `config` describes: pretraining, or fine-tuning (`mode: finetune`).
    Returns a summary dict."""
    require_wandb(config.train)  # a missing package before any data is prepared
    if config.mode == "finetune":
        return run(FinetuneTask(config, verbose), verbose)
    return run(PretrainTask(config, verbose), verbose)


def dry_run(config: Config) -> dict:
    """Compile one train step from abstract (sharded) inputs, allocate nothing, and report memory per
    device: parameters and optimizer state from their shardings, temporaries from the executable.
    The vocabulary is the config's (no data is read)."""
    if config.mode == "finetune":
        raise ConfigError("--dry-run compiles the pretraining step from the config alone; a mode: finetune run "
                          "needs its base model and task files, so run it without --dry-run")
    optimizer = make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda: init_state(config, optimizer))
    if config.parallel.strategy == "pmap":  # replicated parameters: the same layout as a data-only mesh
        config = dataclasses.replace(config, parallel=dataclasses.replace(
            config.parallel, strategy="mesh", data=jax.local_device_count(), fsdp=1, tensor=1))
    strategy = make_strategy(config, abstract)
    target = strategy.restore_target(abstract)
    T, A = config.model.n_positions, config.optim.grad_accum
    batch = jax.ShapeDtypeStruct((A, config.train.batch_size // A, T + 1), jnp.int32,
                                 sharding=batch_sharding(strategy.mesh) if strategy.mesh is not None else None)
    step = strategy.compile_step(make_train_step(config, optimizer, make_schedule(config.optim, config.train.steps)))
    t = time.time()
    compiled = step.lower(target, batch).compile()

    analysis = compiled.memory_analysis()
    report = {"strategy": strategy.describe(), "compile_s": time.time() - t,
              "params_bytes": aot.per_device_bytes(target.params),
              "opt_state_bytes": aot.per_device_bytes(target.opt_state),
              "temp_bytes": int(getattr(analysis, "temp_size_in_bytes", 0) or 0),
              "argument_bytes": int(getattr(analysis, "argument_size_in_bytes", 0) or 0)}
    gib = 2**30
    print(f"dry run: {report['strategy']}; global batch {config.train.batch_size} x {T}, {A} micro-batch(es); "
          f"compiled in {report['compile_s']:.1f} s")
    print(f"per device: parameters {report['params_bytes'] / gib:.3f} GiB, optimizer state "
          f"{report['opt_state_bytes'] / gib:.3f} GiB, activations and temporaries {report['temp_bytes'] / gib:.3f} GiB "
          f"(arguments per the executable: {report['argument_bytes'] / gib:.3f} GiB)")
    return report


@entry_point
def run_training(config_path, overrides, compile_only: bool = False, compile_for: str | None = None) -> int:
    """What train.py calls: load the config, train (or fine-tune), report; `compile_only`: --dry-run;
    `compile_for`: compile for that target (`gpt_jax.aot`), or list the targets."""
    if compile_for is not None:
        aot.check_name(compile_for)  # an unknown target before the config is read
        if compile_for == "list":
            aot.compile_for(None, "list")
            return 0
        aot.compile_for(load_config(config_path, overrides), compile_for)
        return 0
    config = load_config(config_path, overrides)
    initialize(config.parallel)  # multi-host: before anything touches a device
    if compile_only:
        dry_run(config)
        return 0
    result = train(config)
    if result["interrupted"]:
        return 128 + signal.Signals[result["interrupted"]].value
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
