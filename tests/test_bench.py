import subprocess
import sys

import pytest

from conftest import ROOT
from gpt_jax import GPTConfig
from gpt_jax.flops import flops_per_token, flops_per_token_llmc, lookup_peak


def test_flop_counts_of_gpt2_small():
    cfg = GPTConfig.preset("gpt2")
    n = 124_439_808 - 1024 * 768  # parameters without position embeddings
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024 == 855_166_464
    assert flops_per_token_llmc(cfg, 1024) == 6 * n + 6 * 12 * 768 * 1024
    # nanoGPT's MFU example: GPT-2 124M at T=1024 is ~0.86 GFLOP per token forward + backward
    assert abs(flops_per_token(cfg) / 1e9 - 0.855) < 1e-3


# The device_kind strings JAX reports for each chip, with the vendors' dense bf16 (and GPU fp32) peaks.
@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 80GB HBM3", "float32", 67e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),  # not the SXM figure: "H100" is inside "H100 PCIe"
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", "bfloat16", 312e12), ("NVIDIA A100-SXM4-80GB", "float32", 19.5e12),
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v4", "float32", None), ("TPU v5", "float32", None),  # no vendor fp32 figure: measured instead
    ("cpu", "float32", None), ("NVIDIA GeForce RTX 4090", "bfloat16", None),
])
def test_peak_table_lookup(kind, dtype, peak):
    assert lookup_peak(kind, dtype) == peak


def test_bench_command_reports_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.bench", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                           "model.n_layer=2", "model.n_embd=64", "model.n_positions=32", "model.vocab_size=100",
                           "train.batch_size=4", "--steps", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for word in ("compile", "tokens/s", "MFU", "6N+6LDT", "memory:", "prefill", "decode", "attention: einsum reference for cpu"):
        assert word in proc.stdout, (word, proc.stdout)
    import json

    r = json.loads(out.read_text())
    assert 0 < r["train"]["mfu"] < 1 and r["train"]["tokens_per_s"] > 0 and r["generate"]["decode_tok_s"] > 0
    assert r["train"]["mfu_llmc"] < r["train"]["mfu"]  # 6LDT < 12LHQT at the same T
