"""Lower gpt_jax's hot paths for another platform on this (CPU) machine and report what its compiler gets.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lowering_probe.py cuda|tpu

GPT-2 124M from configs/gpt2_124m.yaml (bf16, T = 1024, attention auto), batch 8: the train step under
single / pmap / mesh (fsdp 4 x tensor 2), the eval step, and generate at batch 1 and 8 (512-token
prompts, 512 new tokens). Prints one JSON object: for each case, the custom-call targets, the cuDNN
mask types, whether any [.., N, T, T] tensor exists, host callbacks, and the dot FLOPs with a float32
operand as a share of all dot FLOPs (counted on the jaxpr, scanned bodies times their length).

The cuDNN attention asks the installed cuDNN for its version while tracing; a CPU-only jaxlib has none,
so only that version check is stubbed (to cuDNN 9.10) for a cuda lowering.
"""

import json
import math
import re
import sys
import unittest.mock
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
from jax._src import stages

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_jax.config import load_config  # noqa: E402
from gpt_jax.generate import _generate, split_layers  # noqa: E402
from gpt_jax.model import init_params  # noqa: E402
from gpt_jax.optim import make_optimizer, make_schedule  # noqa: E402
from gpt_jax.parallel import make_strategy  # noqa: E402
from gpt_jax.pretrain import init_state, make_eval_step, make_train_step  # noqa: E402

T, N, BATCH = 1024, 12, 8


def dot_flops(jaxpr, mult=1.0, acc=None):
    """{'f32': FLOPs of dots with a float32 operand, 'all': all dot FLOPs} over a jaxpr and its sub-jaxprs."""
    acc = acc if acc is not None else {"f32": 0.0, "all": 0.0}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval for v in eqn.invars)
            flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc) * mult
            acc["all"] += flops
            if jnp.float32 in (lhs.dtype, rhs.dtype):
                acc["f32"] += flops
        if eqn.primitive.name == "pallas_call":
            continue  # a kernel's body is not XLA's dots
        inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax.extend.core.Jaxpr):
                    dot_flops(sub, inner, acc)
    return acc


def lower(fn, args, platform):
    """(jaxpr, StableHLO text) of `fn` (a jit, or a pmap, whose lower() takes no platform) for `platform`."""
    if hasattr(fn, "trace"):
        traced = fn.trace(*args)
        return traced.jaxpr.jaxpr, traced.lower(lowering_platforms=(platform,)).as_text()
    original = stages.Traced.lower
    with unittest.mock.patch.object(stages.Traced, "lower",
                                    lambda self, **kw: original(self, **{**kw, "lowering_platforms": (platform,)})):
        text = fn.lower(*args).as_text()
    return jax.make_jaxpr(fn)(*args).jaxpr, text


def report(jaxpr, text):
    shapes = re.findall(r"tensor<([0-9x]+)x(?:bf16|f32|f16|i1)>", text)
    flops = dot_flops(jaxpr) if jaxpr is not None else None
    return {
        "custom_calls": sorted(set(re.findall(r"custom_call @([\w$.]+)", text))),
        "cudnn_mask_types": sorted(set(re.findall(r'mask_type\\22: \\22(\w+)', text))),
        # [.., N, T, S] attention scores: N heads, then two sequence lengths (prompt 512, context 1024)
        "score_tensors": sorted({s for s in shapes if len(s.split("x")) >= 3 and s.split("x")[-3] == str(N)
                                 and all(d in ("512", "1024") for d in s.split("x")[-2:])}),
        "host_callbacks": sorted(set(re.findall(r"custom_call @(\w*callback\w*)", text))),
        "f32_dot_share": flops["f32"] / flops["all"] if flops else None,
    }


def main(platform):
    if platform == "cuda":
        import jax._src.cudnn.fused_attention_stablehlo as fused

        fused.check_cudnn_version = lambda: 91000  # no cuDNN on a CPU machine: the one stub
    target = "gpu" if platform == "cuda" else platform
    out = {}
    for name, overrides in {"single": [], "pmap": ["parallel.strategy=pmap"],
                            "mesh": ["parallel.strategy=mesh", "parallel.data=1", "parallel.fsdp=4",
                                     "parallel.tensor=2"]}.items():
        config = load_config(ROOT / "configs" / "gpt2_124m.yaml", [
            f"model.attention_platform={target}", f"train.batch_size={BATCH}", "optim.grad_accum=1", *overrides])
        optimizer = make_optimizer(config.optim, 10)
        abstract = jax.eval_shape(lambda: init_state(config, optimizer))
        strategy = make_strategy(config, abstract)
        step = strategy.compile_step(make_train_step(config, optimizer, make_schedule(config.optim, 10),
                                                     "batch" if name == "pmap" else None))
        if name == "pmap":
            n = jax.local_device_count()
            state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), abstract)
            batch = jax.ShapeDtypeStruct((n, 1, BATCH // n, T + 1), jnp.int32)
        else:
            state = strategy.restore_target(abstract)
            batch = jax.ShapeDtypeStruct((1, BATCH, T + 1), jnp.int32, sharding=getattr(strategy, "batch_sh", None))
        out[f"train_{name}"] = report(*lower(step, (state, batch), platform))
        if name == "single":
            eval_step = strategy.compile_eval(make_eval_step(config))
            out["eval"] = report(*lower(eval_step, (state.params, jax.ShapeDtypeStruct((BATCH, T + 1), jnp.int32)),
                                        platform))
            params = jax.eval_shape(lambda: init_params(config.model, jax.random.key(0)))
            layers = jax.eval_shape(split_layers, params)
            for b in (1, 8):
                args = (params, layers, jax.ShapeDtypeStruct((b, 512), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
                        jnp.int32(512), jax.eval_shape(lambda: jax.random.key(0)), jnp.float32(1.0), jnp.int32(50),
                        jnp.float32(1.0), jax.ShapeDtypeStruct((1,), jnp.int32))
                traced = _generate.trace(*args, config=config.model, max_new_bucket=512, greedy=False)
                out[f"generate_{b}"] = report(traced.jaxpr.jaxpr, traced.lower(lowering_platforms=(platform,)).as_text())
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
