"""Hardware to compile for on any machine: TPU slices and NVIDIA GPUs as abstract devices.

The real compilers run without the hardware ("deviceless" ahead-of-time compilation): libtpu
(`pip install -e ".[tpu]"`) builds TPU programs from a topology name, and the CUDA plugin
(`pip install -e ".[cuda]"`) builds GPU programs from a description of the GPU (XLA's
GpuTargetConfig). `devices(target)` returns the target's abstract devices, on which a mesh is built
and a program traced, lowered and compiled as for real ones; `memory_analysis()` of the executable
is the compiler's own plan per device. What such a compile cannot tell: speed (XLA does not autotune
GPU kernels without a device, and reports no cost analysis for them), and whether cuDNN accepts its
attention graph (built only on a device). libtpu refuses a program that does not fit a chip's HBM.

A multi-host slice (`v5e-256`) compiles as the program each chip runs, with the whole slice's mesh.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os

from gpt_jax.config import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "cuda" (the platform name lowering takes)
    devices: int
    memory: int  # bytes of device memory per device (HBM)
    what: str
    topology: str = ""  # TPU topology name ("v5e:2x4") or GPU topology ("1x1x8")
    chip_config: str = "default"  # TPU: "megacore" joins a v4 / v5p chip's two TensorCores into one device
    host_bounds: tuple = (2, 2, 1)  # TPU: chips per host in each dimension
    gpu: str = ""  # the key of a GPU description in GPUS


def _tpu(name, topology, devices, gib, what, chip_config="default", host_bounds=(2, 2, 1)):
    return Target(name, "tpu", devices, gib * GIB, what, topology, chip_config, host_bounds)


def _gpu(name, gpu, devices, what):
    return Target(name, "cuda", devices, GPUS[gpu]["device_memory_size"], what, f"1x1x{devices}", gpu=gpu)


# What XLA needs to know of a GPU to compile for it (fields of GpuDeviceInfoProto). The H100's are the
# values a real H100 SXM reported (jax-ml/jax issue #28376); the H200 differs in memory and bandwidth,
# the A100 in SMs, shared memory and compute capability (NVIDIA's specifications). Device memory is
# what XLA may use: the H100 reports 80,995 MiB of its nominal 81,559 MiB (nvidia-smi); the H200 and
# A100 figures are their nominal sizes less the same 564 MiB.
_HOPPER = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
               shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132, fpus_per_core=128,
               block_dim_limit_x=2147483647, block_dim_limit_y=65535, block_dim_limit_z=65535,
               memory_bandwidth=3352320000000, l2_cache_size=52428800, clock_rate_ghz=1.98,
               device_memory_size=84929347584, shared_memory_per_block_optin=232448, cc=(9, 0),
               registers_per_core_limit=65536, registers_per_block_limit=65536, description="NVIDIA H100 80GB HBM3")
GPUS = {
    "h100": _HOPPER,
    "h200": {**_HOPPER, "memory_bandwidth": 4800000000000, "l2_cache_size": 62914560,
             "device_memory_size": (143771 - 564) * 2**20, "description": "NVIDIA H200"},
    "a100": {**_HOPPER, "core_count": 108, "fpus_per_core": 64, "shared_memory_per_core": 167936,
             "shared_memory_per_block_optin": 166912, "memory_bandwidth": 2039000000000, "l2_cache_size": 41943040,
             "clock_rate_ghz": 1.41, "device_memory_size": (81920 - 564) * 2**20, "cc": (8, 0),
             "description": "NVIDIA A100-SXM4-80GB"},
}

TARGETS = {t.name: t for t in (
    _tpu("v4-8", "v4:2x2x1", 4, 32, "TPU v4, one host (each device is a chip's two TensorCores)", "megacore"),
    _tpu("v4-32", "v4:2x2x4", 16, 32, "TPU v4 pod slice, 4 hosts", "megacore"),
    _tpu("v5e-4", "v5e:2x2", 4, 16, "TPU v5e (v5litepod-4), one host"),
    _tpu("v5e-8", "v5e:2x4", 8, 16, "TPU v5e (v5litepod-8), one host", host_bounds=(2, 4, 1)),
    _tpu("v5e-256", "v5e:16x16", 256, 16, "TPU v5e pod slice, 64 hosts"),
    _tpu("v5p-8", "v5p:2x2x1", 4, 95, "TPU v5p, one host (each device is a chip's two TensorCores)", "megacore"),
    _tpu("v5p-64", "v5p:4x4x2", 32, 95, "TPU v5p pod slice, 8 hosts", "megacore"),
    _tpu("v6e-8", "v6e:2x4", 8, 32, "TPU v6e (Trillium), one host", host_bounds=(2, 4, 1)),
    _tpu("v6e-256", "v6e:16x16", 256, 32, "TPU v6e pod slice, 64 hosts"),
    _gpu("h100", "h100", 1, "one NVIDIA H100 SXM 80GB"),
    _gpu("h100x8", "h100", 8, "eight NVIDIA H100 SXM 80GB, one host (NVLink)"),
    _gpu("h200", "h200", 1, "one NVIDIA H200 141GB"),
    _gpu("h200x8", "h200", 8, "eight NVIDIA H200 141GB, one host"),
    _gpu("a100", "a100", 1, "one NVIDIA A100 SXM 80GB"),
    _gpu("a100x8", "a100", 8, "eight NVIDIA A100 SXM 80GB, one host"),
)}
_EXTRA = {"tpu": ("libtpu", "tpu"), "cuda": ("jax_cuda12_plugin", "cuda")}
GPU_MEMORY_FRACTION = 0.75  # JAX's GPU client takes this share of the memory by default


def get(name: str) -> Target:
    """The target called `name`, or a ConfigError naming the closest one."""
    if name in TARGETS:
        return TARGETS[name]
    close = difflib.get_close_matches(name, TARGETS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown compile target {name!r}{hint} (--compile-for list names them all)")


def usable_memory(target: Target) -> tuple[int, str]:
    """(bytes a program may use per device, how that was decided)."""
    if target.platform == "tpu":
        return target.memory, f"{target.memory / GIB:.1f} GiB HBM"
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
    return int(target.memory * fraction), (f"{fraction:.0%} of {target.memory / GIB:.1f} GiB, JAX's default share "
                                           "(XLA_PYTHON_CLIENT_MEM_FRACTION)")


def listing() -> str:
    """One line per target: name, devices, memory per device, what it is."""
    return "\n".join(f"{t.name:<9} {t.devices:>4} x {t.memory / GIB:5.1f} GiB  {t.what}" for t in TARGETS.values())


def gpu_target_config(gpu: str) -> str:
    """XLA's GpuTargetConfig text proto for a GPU of GPUS."""
    spec = dict(GPUS[gpu])
    major, minor = spec.pop("cc")
    description = spec.pop("description")
    fields = "\n".join(f"  {k}: {v}" for k, v in spec.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            'platform_name: "CUDA"\ndnn_version_info { major: 9 minor: 7 }\n'
            f'runtime_version {{ major: 12 minor: 8 patch: 0 }}\ndevice_description_str: "{description}"\n')


def require_compiler(target: Target) -> None:
    """A ConfigError naming the extra to install when the target's compiler is missing."""
    module, extra = _EXTRA[target.platform]
    if importlib.util.find_spec(module) is None:
        kind = "TPU compiler (libtpu)" if target.platform == "tpu" else "CUDA compiler plugin (jax-cuda12-plugin)"
        raise ConfigError(f"--compile-for {target.name} needs the {kind}, which is not installed: "
                          f'pip install -e ".[{extra}]" (the same version as the installed jax)')


def devices(target: Target) -> list:
    """The target's abstract devices, in the order a mesh takes them."""
    require_compiler(target)
    try:
        found = _topology_devices(target)
    except (ImportError, RuntimeError) as e:  # a compiler package that is there but does not load
        if not isinstance(e, ImportError) and "not installed" not in str(e):
            raise
        module, extra = _EXTRA[target.platform]
        raise ConfigError(f"--compile-for {target.name}: {module} is installed but does not load ({e}); reinstall "
                          f'it: pip install -e ".[{extra}]" (the same version as the installed jax)') from None
    if len(found) != target.devices:  # a libtpu that lays the topology out otherwise
        raise ConfigError(f"{target.name}: the compiler describes {len(found)} devices, not {target.devices}")
    return found


def _topology_devices(target: Target) -> list:
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu looks for the TPU VM it runs on, logging errors when there is none, and lets one process
        # at a time hold the chips; this process only compiles, so it names a host and takes no lock.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.replace("v5e-", "v5litepod-"))
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                            chip_config_name=target.chip_config,
                                            chips_per_host_bounds=target.host_bounds, num_slices=1)
    else:
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target.gpu),
                                            topology=target.topology)
    return list(topo.devices)
