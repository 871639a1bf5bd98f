"""Orbax checkpoints of the whole training state, saved asynchronously; the last N and the best kept.

A checkpoint holds the train state (params, optimizer state, step, RNG) and a JSON part (sampler
state, resolved config, best validation loss). Orbax writes each step to a temporary folder and
renames it when complete, so a run killed mid-save leaves no half checkpoint under a step name.
A finished checkpoint whose files were damaged fails to restore; `restore_latest` reports it and
falls back to the previous one, moving the damaged one to `corrupt/` in the run directory.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from gpt_jax.distributed import barrier


class Checkpointer:
    def __init__(self, run_dir, keep: int = 2):
        run_dir = Path(run_dir).resolve()

        def manager(name, keep_n):
            options = ocp.CheckpointManagerOptions(max_to_keep=keep_n, create=True, cleanup_tmp_directories=True,
                                                   enable_async_checkpointing=True,
                                                   # two managers save the same step at once: distinct barriers
                                                   multiprocessing_options=ocp.options.MultiprocessingOptions(
                                                       barrier_sync_key_prefix=name))
            return ocp.CheckpointManager(run_dir / name, options=options)

        self.last, self.best = manager("checkpoints", keep), manager("best", 1)

    @staticmethod
    def _args(state, meta):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state, meta: dict, best: bool = False) -> None:
        """Start an asynchronous save of `state` at `step` (and as the best one if `best`)."""
        managers = [self.last, self.best] if best else [self.last]
        for manager in managers:
            if step in manager.all_steps():  # a resumed run retraces steps a later checkpoint had reached
                manager.wait_until_finished()
                manager.delete(step)
            manager.save(step, args=self._args(state, meta), force=True)

    def steps(self) -> list[int]:
        return sorted(self.last.all_steps())

    def restore_latest(self, abstract_state, manager=None):
        """(state, meta, step) of the newest checkpoint that restores, or None when there is none."""
        manager = manager or self.last
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return restored["state"], restored["meta"], step
            except Exception as e:  # a damaged or partial checkpoint: say so, move it aside, use the one before
                aside = Path(manager.directory).parent / "corrupt" / f"{Path(manager.directory).name}-{step}"
                if jax.process_index() == 0:  # one process moves it; the others wait and see it gone
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    shutil.rmtree(aside, ignore_errors=True)
                    shutil.move(str(Path(manager.directory) / str(step)), aside)
                barrier(f"gpt_jax: checkpoint {step} moved aside")
                manager.reload()
                print(f"checkpoint at step {step} in {manager.directory} cannot be restored "
                      f"({type(e).__name__}: {str(e)[:200]}); moved it to {aside} and trying the previous one",
                      file=sys.stderr)
        return None

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()
