"""What the GPU and TPU compilers receive, checked on CPU: GPT-2 124M (configs/gpt2_124m.yaml, bf16,
T = 1024) lowered for `cuda` and `tpu` by tests/lowering_probe.py on 8 fake CPU devices.

For the train step (single, pmap, mesh fsdp 4 x tensor 2), the eval step and generate (batch 1 and 8):
the flash kernel is called (cuDNN fmha with a causal mask / the TPU Mosaic kernel), no [.., N, T, S]
score tensor exists, no program has a host callback, and under 2% of a step's dot FLOPs have a
float32 operand (none of generate's). Only cuDNN's version query is stubbed (a CPU jaxlib has no
cuDNN).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CASES = ["train_single", "train_pmap", "train_mesh", "eval", "generate_1", "generate_8"]
FLASH = {"cuda": {"__cudnn$fmhaSoftmax"}, "tpu": {"tpu_custom_call"}}
FLASH_BACKWARD = {"cuda": {"__cudnn$fmhaSoftmaxBackward"}, "tpu": {"tpu_custom_call"}}


@pytest.fixture(scope="module")
def lowered():
    """Both platforms' reports, probed in two processes side by side."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    procs = {p: subprocess.Popen([sys.executable, str(ROOT / "tests" / "lowering_probe.py"), p], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in FLASH}
    out = {}
    for platform, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        out[platform] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("platform", sorted(FLASH))
@pytest.mark.parametrize("case", CASES)
def test_flash_kernel_and_no_score_tensor(lowered, platform, case):
    r = lowered[platform][case]
    assert FLASH[platform] <= set(r["custom_calls"]), r["custom_calls"]
    if case.startswith("train"):
        assert FLASH_BACKWARD[platform] <= set(r["custom_calls"]), r["custom_calls"]
    if platform == "cuda":
        assert r["cudnn_mask_types"] == ["CAUSAL"], r["cudnn_mask_types"]  # causal skipping, no mask or bias tensor
    assert r["score_tensors"] == [], f"attention scores materialised: {r['score_tensors']}"


@pytest.mark.parametrize("platform", sorted(FLASH))
@pytest.mark.parametrize("case", CASES)
def test_bf16_step_is_bf16(lowered, platform, case):
    r = lowered[platform][case]
    assert r["host_callbacks"] == [], r["host_callbacks"]
    # generate: none at all (its one decode step weighs little beside a 512-token prefill, so a share
    # would hide an fp32 LM head there)
    limit = 0.0 if case.startswith("generate") else 0.02
    assert r["f32_dot_share"] <= limit, f"{r['f32_dot_share']:.3%} of the dot FLOPs have a float32 operand"
