"""FLOP accounting and device peaks for MFU.

MFU uses 6N + 12·L·H·Q·T FLOPs per token (nanoGPT; PaLM appendix B), where N is the parameter count
without position embeddings (the tied token embedding counts once, as the output layer), L layers,
H heads, Q head dim, T sequence length. llm.c counts 6N + 6·L·D·T; both are reported by the benchmark.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from gpt_jax.config import GPTConfig
from gpt_jax.model import param_count

# Dense peak FLOP/s per chip from vendor data sheets, keyed by the exact `jax.Device.device_kind`
# string: (bf16, fp32). GPU fp32 is the plain (non-tensor-core) rate; the TPU vendors publish no fp32
# matmul peak, so it is None there and MFU is measured against a timed fp32 matmul instead.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": (989e12, 67e12),   # H100 SXM
    "NVIDIA H100 PCIe": (756e12, 51e12),
    "NVIDIA H100 NVL": (835e12, 60e12),
    "NVIDIA H200": (989e12, 67e12),             # H200 SXM
    "NVIDIA GH200 480GB": (989e12, 67e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12), "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 19.5e12), "NVIDIA A100 80GB PCIe": (312e12, 19.5e12),
    "TPU v4": (275e12, None),
    "TPU v5 lite": (197e12, None),  # v5e
    "TPU v5": (459e12, None),       # v5p, as JAX names it
    "TPU v6 lite": (918e12, None),  # v6e (Trillium)
}


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), the nanoGPT / PaLM count."""
    T = seq_len or config.n_positions
    n = param_count(config) - config.n_positions * config.n_embd
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_dim * T


def flops_per_token_llmc(config: GPTConfig, seq_len: int | None = None) -> float:
    """llm.c's count: 6N + 6·L·D·T."""
    T = seq_len or config.n_positions
    n = param_count(config) - config.n_positions * config.n_embd
    return 6 * n + 6 * config.n_layer * config.n_embd * T


def lookup_peak(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s for an exact device kind string (jax.Device.device_kind), or None if unknown."""
    peaks = PEAK_FLOPS.get(device_kind.strip())
    if peaks is None:
        return None
    return peaks[0] if dtype in ("bfloat16", "float16") else peaks[1]


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(n: int = 1024, dtype: str = "float32") -> float:
    """FLOP/s of an n x n matmul on the default device, the best of several runs (the CPU 'peak')."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(dtype: str = "float32", device=None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure came from)."""
    device = device or jax.devices()[0]
    peak = lookup_peak(device.device_kind, dtype)
    if peak is not None:
        return peak, f"table: {device.device_kind} {dtype}"
    return measured_matmul_flops(dtype=dtype), f"measured {dtype} matmul on {device.device_kind}"
