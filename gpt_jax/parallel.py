"""Parallelism in one place: the device mesh, the logical-axis rules, and state / batch shardings.

Strategies (config `parallel.strategy`):
- `single`: one device, plain `jit`.
- `pmap`: data parallel over the local devices, parameters replicated, gradients averaged with
  `lax.pmean` (the classic JAX recipe).
- `mesh`: `jit` over a named Mesh with axes (data, fsdp, tensor). Parameters are sharded by the
  logical axis names the model gives them (see RULES); the batch is split over data x fsdp; XLA
  inserts the collectives.
"""

from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gpt_jax.config import Config, ConfigError, ParallelConfig
from gpt_jax.model import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")

# Logical parameter axis -> mesh axis. The one table that decides how parameters are sharded.
RULES = (
    ("embed", "fsdp"),     # model width: fully-sharded data parallel
    ("vocab", "tensor"),   # embedding rows / output logits
    ("qkv", "tensor"),     # fused q, k, v projection outputs
    ("heads", "tensor"),   # attention output projection inputs
    ("mlp", "tensor"),     # MLP hidden units
    ("layers", None),      # the scanned layer axis stays whole
    ("batch", ("data", "fsdp")),  # activations' batch (fused attention kernels run per shard)
)
BATCH_AXES = ("data", "fsdp")


def mesh_shape(pc: ParallelConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [pc.data, pc.fsdp, pc.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("only one of parallel.data / fsdp / tensor may be -1 (it fills the remaining devices)")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"parallel axis sizes must be positive or -1, got data={pc.data} fsdp={pc.fsdp} tensor={pc.tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"parallel.fsdp x tensor x data = {known} does not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"the mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices "
                          f"does not match the {n_devices} devices present; set one axis to -1 to fill them")
    return tuple(sizes)


def make_mesh(pc: ParallelConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(pc, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_spec(logical: P, shape, mesh, where: str = "a parameter") -> P:
    """Map a logical PartitionSpec to mesh axes. An axis that does not divide its dimension leaves it
    whole, with a warning that names the parameter (a silent fallback would hide a replicated tensor)."""
    rules = dict(RULES)
    out = []
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axis = rules.get(name) if name else None
        if axis and mesh.shape[axis] > 1 and dim % mesh.shape[axis]:
            _warn_once(f"{where}: its {name} dimension ({dim}) does not split over mesh axis {axis} "
                       f"({mesh.shape[axis]} devices), so it is kept whole on each; "
                       + ("raise model.pad_vocab_multiple" if name == "vocab" else f"pick a size divisible by {mesh.shape[axis]}"))
            axis = None
        out.append(axis)
    return P(*out)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def param_shardings(config: Config, mesh, abstract_params, specs=None):
    """NamedShardings by RULES from the logical `specs` (default: the GPT's own)."""
    specs = logical_axes(config.model) if specs is None else specs

    def sharding(path, spec, x):
        return NamedSharding(mesh, _mesh_spec(spec, x.shape, mesh, "params/" + "/".join(
            str(getattr(k, "key", k)) for k in path)))

    return jax.tree_util.tree_map_with_path(sharding, specs, abstract_params, is_leaf=lambda s: isinstance(s, P))


def _trailing_dict_keys(path) -> tuple:
    keys = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(k.key)
    return tuple(reversed(keys))


def state_shardings(config: Config, mesh, abstract_state, specs=None):
    """Shardings for a TrainState: parameters by RULES, optimizer moments like their parameters,
    everything else (step, counts, RNG) replicated."""
    params_sh = param_shardings(config, mesh, abstract_state.params, specs)
    by_path = {_trailing_dict_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sh)[0]}
    replicated = NamedSharding(mesh, P())

    def for_leaf(path, x):
        sharding = by_path.get(_trailing_dict_keys(path))
        return sharding if sharding is not None and len(sharding.spec) <= x.ndim else replicated

    return abstract_state.replace(
        step=replicated, rng=replicated, params=params_sh,
        opt_state=jax.tree_util.tree_map_with_path(for_leaf, abstract_state.opt_state))


def batch_sharding(mesh, lead: int = 1) -> NamedSharding:
    """Batches whose rows are axis `lead` ([A, b, ...], or [K, A, b, ...] for K steps at once): rows
    split over data x fsdp, every other axis whole."""
    return NamedSharding(mesh, P(*(None,) * lead, BATCH_AXES))


def check_batch(config: Config, shards: int) -> dict:
    """Batch accounting over `shards` data shards, or a clear error before anything compiles."""
    tc, oc = config.train, config.optim
    if tc.batch_size % oc.grad_accum:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by optim.grad_accum={oc.grad_accum}")
    micro = tc.batch_size // oc.grad_accum
    if micro % shards:
        raise ConfigError(f"a micro-batch of {micro} sequences (train.batch_size={tc.batch_size} / "
                          f"optim.grad_accum={oc.grad_accum}) does not split over {shards} data shards; "
                          f"make train.batch_size / optim.grad_accum a multiple of {shards}")
    return {"global_batch": tc.batch_size, "per_device_batch": micro // shards, "grad_accum": oc.grad_accum,
            "tokens_per_step": tc.batch_size * config.model.n_positions}


def replicate(tree, n: int):
    """Stack `n` copies on a new leading axis (pmap's replicated layout)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


class Single:
    """One device, plain jit."""

    name = "single"

    def __init__(self, config: Config):
        self.device = jax.local_devices()[0]
        self.n_devices, self.mesh = 1, None
        self.accounting = check_batch(config, 1)

    def describe(self) -> str:
        return f"single device ({self.device.device_kind})"

    def restore_target(self, abstract):
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)

    def place(self, state):
        return jax.device_put(state, self.device)

    def init(self, init_fn):
        return jax.jit(init_fn)()

    def for_checkpoint(self, state):
        return state

    def params(self, state):
        return state.params

    def compile_step(self, step_fn, lead: int = 1):
        """`step_fn(state, batch)` compiled with the state donated; the batch rows are axis `lead`."""
        return jax.jit(step_fn, donate_argnums=0)

    def compile_eval(self, eval_fn):
        return jax.jit(eval_fn)

    def put_batch(self, batch, lead: int = 1):
        """This process's rows (axis `lead` of every leaf) of a global batch, placed for the step."""
        return jax.device_put(batch, self.device)

    def put_eval(self, batches):
        """Evaluation batches [n, B, ...] (the same on every process), placed for `params`."""
        return jax.device_put(batches, self.device)

    def metrics(self, metrics):
        return metrics


class Pmap(Single):
    """Data parallel over the local devices: replicated state, `lax.pmean` of gradients. In a
    multi-host run every process pmaps over its own devices and the pmean spans all of them."""

    name = "pmap"
    axis_name = "batch"

    def __init__(self, config: Config):
        self.devices = jax.local_devices()
        self.n_local, self.n_devices, self.mesh = len(self.devices), jax.device_count(), None
        self.device = self.devices[0]
        self.accounting = check_batch(config, self.n_devices)
        self.replicated = NamedSharding(jax.make_mesh((self.n_devices,), ("all",), axis_types=(AxisType.Auto,)), P())

    def describe(self) -> str:
        where = f" on each of {jax.process_count()} processes" if jax.process_count() > 1 else ""
        return f"pmap over {self.n_local} local devices{where} ({self.device.device_kind})"

    def restore_target(self, abstract):
        if jax.process_count() == 1:
            return super().restore_target(abstract)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), abstract)

    def place(self, state):
        return jax.pmap(lambda x: x)(replicate(state, self.n_local))

    def init(self, init_fn):
        return self.place(jax.jit(init_fn)())

    def for_checkpoint(self, state):
        if jax.process_count() == 1:
            return unreplicate(state)

        def global_replicated(x):  # one global array over every process's devices, for orbax
            shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self.replicated, shards)

        return jax.tree.map(global_replicated, state)

    def params(self, state):
        """One copy, on the first local device (where `put_eval` places the evaluation batches)."""
        return jax.device_put(unreplicate(state.params), self.device)

    def compile_step(self, step_fn, lead: int = 1):
        return jax.pmap(step_fn, axis_name=self.axis_name, donate_argnums=0)

    def put_batch(self, batch, lead: int = 1):
        def split(x):  # rows -> [n_local, rows / n_local] with the device axis first; pmap transfers it
            shape = x.shape[:lead] + (self.n_local, x.shape[lead] // self.n_local) + x.shape[lead + 1:]
            return np.moveaxis(x.reshape(shape), lead, 0)

        return jax.tree.map(split, batch)

    def metrics(self, metrics):
        return unreplicate(metrics)


class Mesh(Single):
    """jit over a named mesh (data, fsdp, tensor); parameters sharded by RULES."""

    name = "mesh"

    def __init__(self, config: Config, abstract_state, specs=None, devices=None):
        self.mesh = make_mesh(config.parallel, devices)  # devices: e.g. a deviceless topology's, to compile for it
        self.n_devices = self.mesh.size
        self.accounting = check_batch(config, self.mesh.shape["data"] * self.mesh.shape["fsdp"])
        self.state_sh = state_shardings(config, self.mesh, abstract_state, specs)

    def describe(self) -> str:
        return f"mesh {dict(self.mesh.shape)} over {self.n_devices} devices ({self.mesh.devices.flat[0].device_kind})"

    def restore_target(self, abstract):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_sh)

    def place(self, state):
        return jax.device_put(state, self.state_sh)

    def init(self, init_fn):
        return jax.jit(init_fn, out_shardings=self.state_sh)()

    def compile_step(self, step_fn, lead: int = 1):
        return jax.jit(self.on_mesh(step_fn), in_shardings=(self.state_sh, batch_sharding(self.mesh, lead)),
                       out_shardings=(self.state_sh, NamedSharding(self.mesh, P())), donate_argnums=0)

    def compile_eval(self, eval_fn):
        return jax.jit(self.on_mesh(eval_fn))

    def on_mesh(self, fn):
        """`fn` traced with this mesh and the logical-axis rules set, for code that places work per
        shard (the Pallas attention kernels run under shard_map)."""
        @functools.wraps(fn)
        def traced(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(RULES):
                return fn(*args)

        return traced

    def put_batch(self, batch, lead: int = 1):
        sharding = batch_sharding(self.mesh, lead)
        if jax.process_count() == 1:
            return jax.device_put(batch, sharding)

        def put(x):  # this process's rows; the global batch has process_count times as many
            shape = x.shape[:lead] + (x.shape[lead] * jax.process_count(),) + x.shape[lead + 1:]
            return jax.make_array_from_process_local_data(sharding, x, shape)

        return jax.tree.map(put, batch)

    def put_eval(self, batches):
        sharding = batch_sharding(self.mesh, 1)
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]),
                            batches)


def validate(config: Config) -> None:
    """The batch and mesh checks every strategy makes, without building anything (fail fast)."""
    kind = config.parallel.strategy
    if kind == "single" and jax.process_count() > 1:
        raise ConfigError(f"parallel.strategy=single runs on one device, but this is a {jax.process_count()}-process "
                          "run; use parallel.strategy=pmap or mesh")
    if kind == "mesh":
        data, fsdp, _ = mesh_shape(config.parallel, jax.device_count())
        check_batch(config, data * fsdp)
    else:
        check_batch(config, jax.device_count() if kind == "pmap" else 1)


def make_strategy(config: Config, abstract_state, specs=None, devices=None):
    """The strategy `parallel.strategy` names; `specs` are the parameters' logical axes (default: the GPT's).
    `devices` (mesh only; default: jax.devices()) may be another platform's, e.g. a deviceless TPU or GPU
    topology's, to compile the step for that target on this host."""
    kind = config.parallel.strategy
    if kind == "pmap":
        return Pmap(config)
    if kind == "mesh":
        return Mesh(config, abstract_state, specs, devices)
    return Single(config)
