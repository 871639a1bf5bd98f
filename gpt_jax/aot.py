"""Compile a run for hardware this machine does not have: `python train.py --config C --compile-for TARGET`.

The run's programs are built by the target's real compiler from shapes alone (`gpt_jax.targets`):
the train step under the config's parallel layout, on the target's devices; the evaluation step;
and `generate` of one sequence at the config's context on one device. Nothing is trained and no
corpus is read for pretraining (the vocabulary is the config's); a fine-tuning config reads its task
files and base model, whose shapes its programs take. For each program: per-device memory from the
compiler's plan against the device's (FITS / DOES NOT FIT, with the margin), the attention kernel
in the compiled program, the collectives in its text (a loop body counts once) and the compile time.

`pmap` compiles as the mesh it equals (data parallel over every device, parameters replicated), and
`single` on one device of the target.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt_jax import attention, targets
from gpt_jax.config import Config, ConfigError
from gpt_jax.finetune import FinetuneTask
from gpt_jax.generate import trace as trace_generate
from gpt_jax.loop import make_step
from gpt_jax.parallel import batch_sharding, make_strategy
from gpt_jax.pretrain import PretrainTask

GIB = 2**30
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
KERNELS = {  # what each attention kernel leaves in a compiled program's text
    "cuDNN flash attention": r'custom_call_target="__cudnn\$fmha',
    "Pallas Triton flash attention": r'custom_call_target="__gpu\$xla\.gpu\.triton"',
    "Pallas splash attention (Mosaic)": r'custom_call_target="tpu_custom_call"',
}


class DoesNotFit(Exception):
    """The target's compiler refused a program for want of device memory."""


def for_target(config: Config, target: targets.Target) -> Config:
    """The config as it compiles for `target`: attention for its platform, `pmap` as a data-only mesh,
    `single` as a one-device mesh."""
    m, pc = config.model, config.parallel
    platform = "tpu" if target.platform == "tpu" else "gpu"
    if m.attention == "cudnn" and platform == "tpu":
        raise ConfigError(f"model.attention=cudnn is NVIDIA's kernel; {target.name} is a TPU: use model.attention=auto "
                          "(the splash kernel there) or pallas")
    model = dataclasses.replace(m, attention_platform=platform)
    if pc.strategy == "pmap":
        pc = dataclasses.replace(pc, strategy="mesh", data=target.devices, fsdp=1, tensor=1)
    elif pc.strategy == "single":
        pc = dataclasses.replace(pc, strategy="mesh", data=1, fsdp=1, tensor=1)
    return dataclasses.replace(config, model=model, parallel=pc)


def analyse(compiled, text: str) -> dict:
    """Memory per device (bytes), attention kernel, collectives and host callbacks of an executable."""
    mem = compiled.memory_analysis()
    sizes = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp")}
    kernels = [name for name, pattern in KERNELS.items() if re.search(pattern, text)]
    return {**sizes, "total": sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"],
            "kernel": ", ".join(kernels) or "XLA (no fused attention kernel)",
            "collectives": {c: n for c in COLLECTIVES
                            if (n := len(re.findall(rf"\s{c}(?:-start)?\(", text)))},
            "host_callbacks": sorted(set(re.findall(r'custom_call_target="([^"]*callback[^"]*)"', text)))}


def compile_traced(traced, platform: str) -> tuple[object, str, float]:
    """(executable, its HLO text, seconds) of a traced program; DoesNotFit when the target's compiler
    reports it out of memory (libtpu refuses such a program)."""
    t = time.perf_counter()
    try:
        compiled = traced.lower(lowering_platforms=(platform,)).compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED ... Ran out of memory in memory space hbm
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise DoesNotFit(_first_line(str(e))) from None
        raise
    return compiled, compiled.as_text(), time.perf_counter() - t


def _first_line(message: str) -> str:
    found = re.search(r"(Ran out of memory[^\n]*|Used [^\n]* of [^\n]*hbm[^\n]*)", message)
    return found.group(1) if found else message.strip().splitlines()[0][:300]


def per_device_bytes(tree) -> int:
    """Bytes of a tree of sharded shapes on one device."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _placed(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def build_task(config: Config, target: targets.Target):
    """The task whose programs the run compiles, set for `target`: pretraining from the config alone, or
    fine-tuning from its task files and base model (read on this host; the layout is the target's)."""
    if config.mode != "finetune":
        return PretrainTask(for_target(config, target), read_data=False)
    single = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, strategy="single"))
    task = FinetuneTask(single, verbose=False)  # its model is the base model's, with the special tokens
    task.config = for_target(dataclasses.replace(task.config, parallel=config.parallel), target)
    task.model = task.config.model  # what its loss and evaluation trace with
    return task


def compile_programs(config: Config, target: targets.Target, devices, programs=("train", "eval", "generate"),
                     generate_batches=(1,)) -> dict:
    """Compile the run's train step, evaluation step and `generate` (one sequence per batch row, prompt and
    new tokens half the context each) for `target`. Returns {"strategy", "accounting", "config",
    "params_bytes", "opt_state_bytes", and per program ("train", "eval", "generate" or "generate_B")}
    analyse()'s dict with "seconds", "text", "jaxpr" and "held" (bytes of the run's state that stay on a
    device while the program runs, counted in "total"), or {"error": ...} when it does not fit."""
    if config.parallel.strategy == "single":
        devices = devices[:1]
    task = build_task(config, target)
    config = task.config
    abstract = task.abstract_state()
    strategy = make_strategy(config, abstract, task.param_specs, devices=devices)
    state = strategy.restore_target(abstract)
    out = {"strategy": strategy.describe(), "accounting": strategy.accounting, "config": config,
           "params_bytes": per_device_bytes(state.params), "opt_state_bytes": per_device_bytes(state.opt_state)}
    traced = {}
    if "train" in programs:
        step = strategy.compile_step(make_step(task.loss, task.optimizer, task.schedule))
        traced["train"] = lambda: step.trace(state, task.batch_shapes())
    if "eval" in programs and task.eval_data is not None:
        eval_fn = strategy.compile_eval(task.evaluate)
        eval_data = _placed(jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), task.eval_data),
                            batch_sharding(strategy.mesh, 1))
        traced["eval"] = lambda: eval_fn.trace(state.params, eval_data)
    if "generate" in programs:  # sampling runs on one device
        one = NamedSharding(jax.sharding.Mesh(devices[:1], ("one",)), P())
        half = config.model.n_positions // 2
        gpt_params = state.params["gpt"] if config.mode == "finetune" else state.params
        for b in generate_batches:
            traced["generate" if generate_batches == (1,) else f"generate_{b}"] = (
                lambda b=b: trace_generate(config.model, gpt_params, b, half, half, one))
    for name, make in traced.items():
        program = make()
        try:
            compiled, text, seconds = compile_traced(program, target.platform)
            out[name] = {**analyse(compiled, text), "seconds": seconds, "text": text, "jaxpr": program.jaxpr}
        except DoesNotFit as e:
            out[name] = {"error": str(e)}
            continue
        # A run evaluates and samples with its training state still on the devices: what the program does
        # not take as an argument counts against the device as well: the optimizer state, and for generate
        # on a mesh of several devices (which samples from a one-device copy) the run's own parameters.
        copy = out["params_bytes"] if strategy.n_devices > 1 else 0
        held = {"train": 0, "eval": out["opt_state_bytes"]}.get(name, out["opt_state_bytes"] + copy)
        out[name].update(held=held, total=out[name]["total"] + held)
    return out


def _verdict(entry: dict, usable: int) -> str:
    if "error" in entry:
        return f"DOES NOT FIT: the compiler refused it ({entry['error']})"
    margin = usable - entry["total"]
    word = "FITS" if margin >= 0 else "DOES NOT FIT"
    return f"{word}, {abs(margin) / GIB:.2f} GiB {'to spare' if margin >= 0 else 'over'}"


def report_lines(result: dict, target: targets.Target) -> list[str]:
    usable, basis = targets.usable_memory(target)
    acct, config = result["accounting"], result["config"]
    lines = [f"target: {target.name}, {target.what}: {target.devices} device(s), {basis} usable per device",
             f"layout: {result['strategy']}; global batch {acct['global_batch']}, per-device batch "
             f"{acct['per_device_batch']}, {acct['grad_accum']} accumulation step(s), {acct['tokens_per_step']:,} "
             f"tokens/step; {attention.describe(config.model)}"]
    for name in ("train", "eval", "generate"):
        entry = result.get(name)
        if entry is None:
            continue
        if "error" in entry:
            lines.append(f"{name}: {_verdict(entry, usable)}")
            continue
        memory = (f"parameters {result['params_bytes'] / GIB:.2f} GiB, optimizer state "
                  f"{result['opt_state_bytes'] / GIB:.2f} GiB, " if name == "train" else
                  f"arguments {entry['argument'] / GIB:.2f} GiB, the run's state held meanwhile "
                  f"{entry['held'] / GIB:.2f} GiB, ")
        collectives = ", ".join(f"{n} {c}" for c, n in entry["collectives"].items()) or "none"
        lines.append(f"{name}: {memory}temporaries {entry['temp'] / GIB:.2f} GiB, total {entry['total'] / GIB:.2f} "
                     f"GiB per device: {_verdict(entry, usable)}; attention: {entry['kernel']}; collectives: "
                     f"{collectives}; compiled in {entry['seconds']:.1f} s")
    return lines


def compile_for(config: Config, name: str, verbose: bool = True) -> dict:
    """Compile `config`'s programs for the target `name` and print the report; returns it. A program that
    does not fit the device is a ConfigError (after the report) that says what to change."""
    if name == "list":
        print(targets.listing())
        return {}
    target = targets.get(name)
    devices = targets.devices(target)
    result = compile_programs(config, target, devices)
    if verbose:
        print("\n".join(report_lines(result, target)), flush=True)
    usable = targets.usable_memory(target)[0]
    over = [k for k in ("train", "eval", "generate") if k in result
            and ("error" in result[k] or result[k]["total"] > usable)]
    if over:
        what = " and ".join([", ".join(over[:-1]), over[-1]] if len(over) > 1 else over)
        raise ConfigError(f"{what} {'do' if len(over) > 1 else 'does'} not fit {target.name}: lower the per-device batch (raise "
                          "optim.grad_accum or parallel.data / fsdp), shard the parameters over more devices "
                          "(parallel.fsdp), or recompute activations (model.remat=dots or full)")
    return result


def check_name(name: str) -> None:
    """A ConfigError for an unknown target, or one whose compiler is not installed, before anything else runs."""
    if name != "list":
        targets.require_compiler(targets.get(name))
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # this process only compiles: no local accelerator is needed
