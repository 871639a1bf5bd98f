"""The real TPU and GPU compilers build gpt_jax's hot paths on this CPU machine (deviceless, `gpt_jax.aot`).

For TPU v5e (8 chips) and H100 (8 GPUs): GPT-2 124M as configs/gpt2_124m.yaml has it (bf16, T = 1024,
fp32 parameters and AdamW) — the single-device train step at batch 8 and the evaluation step, and, with
two layers, generate at batch 1 and 8 (512-token prompts, 512 new tokens) — and a step on a mesh of
fsdp 4 x tensor 2 whose 25 heads (gpt2-xl's width, two layers) do not divide the tensor axis. Two layers
where what is checked does not depend on depth: decoding unrolls its layers, so compile time grows with
them. From each executable: the flash kernel is in it (the Mosaic splash kernel; cuDNN flash
attention with a causal mask), no [.., N, T, S] score buffer is, the per-device plan fits the device,
no host callback runs in a step, and under 2% of a step's matmul FLOPs have a float32 operand (none of
generate's). Needs the compilers: `pip install -e ".[tpu,cuda]"` (the test extras install both).
"""

import math
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import pytest

from conftest import ROOT
from gpt_jax import aot, targets
from gpt_jax.config import ConfigError, load_config

TARGETS = {"tpu": "v5e-8", "cuda": "h100x8"}
FLASH = {"tpu": "Pallas splash attention (Mosaic)", "cuda": "cuDNN flash attention"}
COMPILER = {"tpu": "libtpu", "cuda": "jax_cuda12_plugin"}
SINGLE = ["train", "eval", "generate_1", "generate_8"]


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


def score_buffers(text: str, heads: int) -> list[str]:
    """Buffers shaped [.., N or a share of N, T, S] with T and S sequence lengths (512, 1024)."""
    shapes = re.findall(r"\b(?:bf16|f32|f16|pred)\[([0-9,]+)\]", text)
    return sorted({s for s in shapes if len(dims := s.split(",")) >= 3 and heads % int(dims[-3]) == 0
                   and int(dims[-3]) > 1 and all(d in ("512", "1024") for d in dims[-2:])})


@pytest.fixture(scope="module", params=sorted(TARGETS))
def compiled(request):
    platform = request.param
    pytest.importorskip(COMPILER[platform], reason=f"the {platform} compiler is not installed "
                        f"(pip install -e \".[{'tpu' if platform == 'tpu' else 'cuda'}]\")")
    target = targets.get(TARGETS[platform])
    devices = targets.devices(target)
    base = ["train.batch_size=8", "optim.grad_accum=1", "train.eval_batches=2"]
    config = load_config(ROOT / "configs" / "gpt2_124m.yaml", base)
    single = aot.compile_programs(config, target, devices, programs=("train", "eval"))
    two_layers = load_config(ROOT / "configs" / "gpt2_124m.yaml", base + ["model.n_layer=2"])
    single.update({k: v for k, v in aot.compile_programs(two_layers, target, devices, programs=("generate",),
                                                       generate_batches=(1, 8)).items() if k.startswith("generate")})
    mesh = aot.compile_programs(load_config(ROOT / "configs" / "gpt2_124m.yaml", base + [
        "model.preset=gpt2-xl", "model.n_layer=2", "parallel.strategy=mesh", "parallel.data=1", "parallel.fsdp=4",
        "parallel.tensor=2"]), target, devices, programs=("train",))
    return platform, target, {**single, "mesh_train": mesh["train"]}, {"single": single, "mesh": mesh}


@pytest.mark.parametrize("case", SINGLE + ["mesh_train"])
def test_compiles_with_the_flash_kernel_and_no_score_buffer(compiled, case):
    platform, target, programs, _ = compiled
    entry = programs[case]
    assert "error" not in entry, entry.get("error")
    assert FLASH[platform] in entry["kernel"], entry["kernel"]
    if platform == "cuda":  # causal block skipping, no mask or bias tensor
        assert set(re.findall(r'"mask_type":\s*"(\w+)"', entry["text"])) == {"CAUSAL"}
    heads = 25 if case == "mesh_train" else 12
    assert score_buffers(entry["text"], heads) == [], "attention scores materialised"


@pytest.mark.parametrize("case", SINGLE + ["mesh_train"])
def test_fits_the_device_with_no_host_callback_and_bf16_matmuls(compiled, case):
    platform, target, programs, _ = compiled
    entry = programs[case]
    usable, _ = targets.usable_memory(target)
    assert 0 < entry["total"] <= usable, f"{entry['total'] / 2**30:.2f} GiB planned per device"
    assert entry["host_callbacks"] == [], entry["host_callbacks"]
    flops = dot_flops(entry["jaxpr"].jaxpr)
    limit = 0.0 if case.startswith("generate") else 0.02  # generate: none (its decode step weighs little)
    assert flops["f32"] / flops["all"] <= limit, f"{flops['f32'] / flops['all']:.3%} of the dot FLOPs are fp32"


def test_the_mesh_step_is_sharded_as_the_layout_says(compiled):
    """fsdp 4 x tensor 2 on 8 devices: parameters and AdamW moments per device are an eighth of the whole
    (up to vectors sharded over one axis), gradients meet in collectives, and the report names the layout."""
    platform, target, programs, results = compiled
    mesh, single = results["mesh"], results["single"]
    assert mesh["strategy"].startswith("mesh {'data': 1, 'fsdp': 4, 'tensor': 2} over 8 devices")
    assert single["strategy"].startswith("mesh {'data': 1, 'fsdp': 1, 'tensor': 1} over 1 devices")
    model = mesh["config"].model
    whole = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(jax.eval_shape(
        lambda: __import__("gpt_jax").init_params(model, jax.random.key(0)))))
    # an eighth, but for the vectors that split over one axis (LayerNorms and biases: fsdp or tensor alone)
    assert whole / 8 < mesh["params_bytes"] < whole / 8 * 1.02
    assert 2 * whole / 8 < mesh["opt_state_bytes"] < 2 * whole / 8 * 1.02
    assert mesh["train"]["collectives"] and single["train"]["collectives"] == {}
    lines = aot.report_lines(mesh, target)
    assert lines[0].startswith(f"target: {target.name}, ") and "FITS" in lines[2] and FLASH[platform] in lines[2]


def test_compile_for_list_unknown_target_and_missing_compiler(monkeypatch, capsys):
    """`--compile-for list` names every target with its devices and memory; an unknown name, or a target whose
    compiler is not installed, is one error line naming the fix, before any config is read; so is a kernel
    the target does not have."""
    import importlib.util

    from gpt_jax.trainer import run_training

    assert run_training(None, [], compile_for="list") == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(targets.TARGETS)
    assert "v5e-8        8 x  16.0 GiB  TPU v5e" in listed[3] and "h100x8       8 x  79.1 GiB" in listed[10]
    assert run_training("no/such/config.yaml", [], compile_for="v5e8") == 2
    assert capsys.readouterr().err == ("error: unknown compile target 'v5e8'; did you mean v5e-8? "
                                       "(--compile-for list names them all)\n")
    with pytest.raises(ConfigError) as refused:  # checked before the target's devices are asked for
        aot.for_target(load_config(None, ["model.attention=cudnn", "model.dtype=bfloat16"]), targets.get("v5e-8"))
    assert str(refused.value) == ("model.attention=cudnn is NVIDIA's kernel; v5e-8 is a TPU: use "
                                  "model.attention=auto (the splash kernel there) or pallas")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert run_training("no/such/config.yaml", [], compile_for="v4-8") == 2
    assert capsys.readouterr().err == ("error: --compile-for v4-8 needs the TPU compiler (libtpu), which is not "
                                       'installed: pip install -e ".[tpu]" (the same version as the installed jax)\n')


def test_train_py_compile_for_reports_and_refuses_what_does_not_fit(tmp_path):
    """`python train.py --compile-for h100`: the report's lines, then, with JAX given a sliver of the GPU's
    memory (XLA_PYTHON_CLIENT_MEM_FRACTION), DOES NOT FIT for every program and one error line, exit 2."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax_cuda12_plugin", reason='the CUDA compiler is not installed (pip install -e ".[cuda]")')
    args = [sys.executable, "train.py", "--compile-for", "h100", "model.n_layer=1", "model.n_positions=64",
            "train.batch_size=4", f"train.out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.000001"})
    out = proc.stdout.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert out[0] == ("target: h100, one NVIDIA H100 SXM 80GB: 1 device(s), 0% of 79.1 GiB, JAX's default share "
                      "(XLA_PYTHON_CLIENT_MEM_FRACTION) usable per device")
    assert out[1].startswith("layout: mesh {'data': 1, 'fsdp': 1, 'tensor': 1} over 1 devices (NVIDIA H100 80GB "
                             "HBM3); global batch 4, per-device batch 4, 1 accumulation step(s), 256 tokens/step; "
                             "attention: Pallas Triton flash for gpu")
    assert [line.split(":")[0] for line in out[2:]] == ["train", "eval", "generate"]
    assert all(" GiB over; attention: Pallas Triton flash attention; collectives: none; compiled in " in line
               and ": DOES NOT FIT, " in line for line in out[2:]), out
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: train, eval and generate do not fit h100: lower the per-device batch (raise optim.grad_accum "
        "or parallel.data / fsdp), shard the parameters over more devices (parallel.fsdp), or recompute "
        "activations (model.remat=dots or full)")
    assert not (tmp_path / "run").exists()  # nothing trained, no run directory


def test_a_fine_tuning_config_compiles_for_a_target(tmp_path, capsys):
    """mode: finetune compiles its own step (the head, the special-token rows, its batches of Figure 1
    sequences) and its dev evaluation from its task files, on the target's layout; nothing is trained."""
    from gpt_jax.trainer import run_training

    pytest.importorskip("jax_cuda12_plugin", reason='the CUDA compiler is not installed (pip install -e ".[cuda]")')
    (tmp_path / "corpus.txt").write_text("a bad cafe had a bead " * 50 + "\n")
    (tmp_path / "task.tsv").write_text("s\ty\n" + "".join(f"{'bad cafe' if i % 2 else 'a bead'}\t{i % 2}\n"
                                                          for i in range(16)))
    code = run_training(None, [
        "mode=finetune", "model.preset=gpt1-tiny", "model.n_layer=1", "model.n_positions=32",
        f"data.source={tmp_path / 'corpus.txt'}", f"data.cache_dir={tmp_path / 'cache'}",
        "finetune.fields={text: s, label: y}", f"finetune.train_file={tmp_path / 'task.tsv'}",
        f"finetune.dev_file={tmp_path / 'task.tsv'}", "finetune.batch_size=8", "parallel.strategy=mesh",
        "parallel.data=2", "parallel.fsdp=4", f"train.out_dir={tmp_path / 'run'}"], compile_for="h100x8")
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    report = out[out.index(next(line for line in out if line.startswith("target: "))):]
    assert report[1].startswith("layout: mesh {'data': 2, 'fsdp': 4, 'tensor': 1} over 8 devices (NVIDIA H100 "
                                "80GB HBM3); global batch 8, per-device batch 1, 1 accumulation step(s)")
    assert [line.split(":")[0] for line in report[2:]] == ["train", "eval", "generate"]
    assert all(": FITS, " in line for line in report[2:]), report
    assert "all-reduce" in report[2] or "reduce-scatter" in report[2]  # fsdp gradients meet across devices
    assert not (tmp_path / "run").exists()
