"""Data / fsdp / tensor parallel runs on 8 fake CPU devices give the single-device losses and parameters."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, data_path, orchestration_env

SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    import numpy as np
    import jax
    from gpt_jax.config import load_config
    from gpt_jax.trainer import train

    corpus, out, accum = sys.argv[1], sys.argv[2], sys.argv[3]
    base = ["model.preset=gpt2-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_positions=32",
            "train.batch_size=16", "train.steps=5", "train.log_every=1", "train.eval_every=5", "train.save_every=5",
            "train.eval_batches=1", "train.sample_tokens=0", f"optim.grad_accum={accum}", "optim.warmup_steps=2",
            "optim.lr=3e-3", f"data.source={corpus}", f"data.cache_dir={out}/cache"]
    runs = {"single": ["parallel.strategy=single"], "pmap8": ["parallel.strategy=pmap"],
            "mesh_dp8": ["parallel.strategy=mesh", "parallel.data=8"],
            "mesh_fsdp4_dp2": ["parallel.strategy=mesh", "parallel.data=2", "parallel.fsdp=4"],
            "mesh_tp2_dp4": ["parallel.strategy=mesh", "parallel.data=4", "parallel.tensor=2"]}
    if accum != "1":  # data parallel over a mesh is also in the two mixed meshes
        runs.pop("mesh_dp8")
        for name in ("pmap8", "mesh_fsdp4_dp2"):  # and two steps per call: steps 1-2, 3-4, 5
            runs[name] = runs[name] + ["train.steps_per_call=2"]
    assert jax.device_count() == 8
    result, used = {}, {}
    for name, extra in runs.items():
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            r = train(load_config(None, base + extra + [f"train.out_dir={out}/{name}"]))
        used[name] = [l for l in printed.getvalue().splitlines() if l.startswith("parallel: ")]
        losses = [json.loads(l)["loss"] for l in open(f"{out}/{name}/metrics.jsonl") if '"train"' in l]
        np.savez(f"{out}/{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(r["params"])])
        result[name] = losses
    print("USED " + json.dumps(used))
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(data_path("tinyshakespeare", "input.txt").read_text()[:60_000])
    return path


def run_on_8_devices(args, tmp_path):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=orchestration_env(8),
                          cwd=tmp_path, timeout=900)


@pytest.mark.parametrize("accum", [1, 2])
def test_every_strategy_matches_single_device(tmp_path, corpus, accum):
    proc = run_on_8_devices([str(corpus), str(tmp_path), str(accum)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    used = json.loads(proc.stdout.split("USED ", 1)[1].splitlines()[0])  # each run's "parallel: ..." line
    expect = {"single": "single device", "pmap8": "pmap over 8 local devices (cpu); global batch 16, ", "mesh_dp8": "mesh {'data': 8, 'fsdp': 1, ",
              "mesh_fsdp4_dp2": "mesh {'data': 2, 'fsdp': 4, ", "mesh_tp2_dp4": "mesh {'data': 4, 'fsdp': 1, 'tensor': 2}"}
    assert {name: len(lines) for name, lines in used.items()} == {name: 1 for name in result}, used
    for name, (line,) in used.items():
        assert line.startswith(f"parallel: {expect[name]}"), (name, line)  # the strategy asked for ran
    ref = np.array(result.pop("single"))
    assert len(ref) == 5 and ref[-1] < ref[0]
    ref_params = np.load(tmp_path / "single.npz")
    for name, losses in result.items():
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=name)
        params = np.load(tmp_path / f"{name}.npz")
        # Where a gradient is ~0, Adam's m / sqrt(v) turns summation-order rounding (pmean, sharded
        # reductions) into an O(lr) step of either sign: absolute tolerance 1e-5 (lr 3e-3, 5 steps).
        for key in ref_params.files:
            np.testing.assert_allclose(params[key], ref_params[key], rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")


def test_batch_and_mesh_errors_before_compiling(tmp_path):
    script = textwrap.dedent("""
        from gpt_jax.config import load_config, ConfigError
        from gpt_jax.trainer import train
        for extra, words in [(["parallel.strategy=pmap", "train.batch_size=12"], "does not split over 8 data shards"),
                             (["parallel.strategy=mesh", "parallel.data=4", "parallel.tensor=4"], "does not match the 8 devices"),
                             (["parallel.strategy=mesh", "parallel.data=-1", "parallel.fsdp=3"], "does not divide the 8"),
                             (["parallel.strategy=mesh", "parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2",
                               "train.batch_size=6"], "does not split over 4 data shards")]:
            try:
                train(load_config(None, ["data.source=/nonexistent"] + extra), verbose=False)
            except ConfigError as e:
                assert words in str(e), (words, str(e))
                print("OK", e)
            else:
                raise SystemExit("no error for " + str(extra))
        from gpt_jax.parallel import validate
        validate(load_config(None, ["parallel.strategy=single", "train.batch_size=3"]))  # one device: any batch
        print("OK single")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("OK ") == 5 and "OK single" in proc.stdout


def test_checkpoints_move_between_strategies_and_device_counts(tmp_path, corpus):
    """pmap on 8 devices -> mesh fsdp on 4 -> single device, resuming each time: the single-device curve."""
    base = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "model.preset=gpt2-tiny", "model.n_layer=2",
            "model.n_embd=64", "model.n_head=4", "model.n_positions=32", "model.scan_layers=true",
            "train.batch_size=16", "train.log_every=1", "train.eval_every=100", "train.save_every=2",
            "train.eval_batches=1", "train.sample_tokens=0", "optim.warmup_steps=2", "optim.decay_steps=6",
            "optim.lr=3e-3", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"]

    def run(out, devices, *extra):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, f"train.out_dir={tmp_path / out}", *extra],
                              capture_output=True, text=True, env=orchestration_env(devices), cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    def losses(out):
        steps = {}
        for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "train":
                steps[r["step"]] = r["loss"]
        return [steps[s] for s in sorted(steps)]

    run("ref", 1, "train.steps=6")
    run("moved", 8, "train.steps=2", "parallel.strategy=pmap")
    assert "resuming from step 2" in run("moved", 4, "train.steps=4", "parallel.strategy=mesh", "parallel.data=1",
                                         "parallel.fsdp=4")
    assert "resuming from step 4" in run("moved", 1, "train.steps=6", "parallel.strategy=single")
    np.testing.assert_allclose(losses("moved"), losses("ref"), rtol=1e-5)
    # the step the 4-device mesh saved reads in this one-device process, on its device, as the reference's step 4
    import jax

    from gpt_jax.runs import restore_params

    moved, ref = (jax.tree.leaves(restore_params(tmp_path / out, step=4)) for out in ("moved", "ref"))
    for a, b in zip(moved, ref, strict=True):
        assert a.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_generate_with_sharded_parameters_gives_single_device_tokens(tmp_path):
    script = textwrap.dedent("""
        import jax, numpy as np
        from gpt_jax import GPTConfig, init_params, generate
        from gpt_jax.config import load_config
        from gpt_jax.parallel import make_mesh, param_shardings
        cfg = load_config(None, ["model.preset=gpt2-tiny", "model.n_head=4", "model.vocab_size=512"])
        params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, init_params(cfg.model, jax.random.key(0)))
        prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
        ref = generate(cfg.model, params, prompts, 12, greedy=True)[0]
        sampled = generate(cfg.model, params, prompts, 12, temperature=0.9, top_k=20, rng=3)[0]
        for extra in (["parallel.tensor=2", "parallel.data=4"], ["parallel.fsdp=4", "parallel.data=2"],
                      ["parallel.tensor=8", "parallel.data=1"]):
            c = load_config(None, ["model.preset=gpt2-tiny", "model.n_head=4", "model.vocab_size=512"] + extra)
            mesh = make_mesh(c.parallel)
            sharded = jax.device_put(params, param_shardings(c, mesh, params))
            assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                       for x in jax.tree.leaves(sharded))
            assert generate(cfg.model, sharded, prompts, 12, greedy=True)[0] == ref, extra
            assert generate(cfg.model, sharded, prompts, 12, temperature=0.9, top_k=20, rng=3)[0] == sampled, extra
            print("OK", extra)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=orchestration_env(8),
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("OK ") == 3


def test_dry_run_reports_per_device_memory_shrinking_with_fsdp(tmp_path):
    script = textwrap.dedent("""
        import json
        from gpt_jax.config import load_config
        from gpt_jax.trainer import dry_run
        base = ["model.preset=gpt2-tiny", "model.n_embd=128", "model.n_head=4", "train.batch_size=16",
                "parallel.strategy=mesh"]
        dp = dry_run(load_config(None, base + ["parallel.data=8"]))
        fsdp = dry_run(load_config(None, base + ["parallel.data=1", "parallel.fsdp=8"]))
        # pmap replicates like a data-only mesh over the local devices, whatever mesh axis sizes the config keeps
        pmap = dry_run(load_config(None, base[:-1] + ["parallel.strategy=pmap", "parallel.data=2", "parallel.fsdp=2",
                                                      "parallel.tensor=2"]))
        single = dry_run(load_config(None, base[:-1]))
        print("RESULT " + json.dumps([dp, fsdp, pmap, single]))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dp, fsdp, pmap, single = json.loads(proc.stdout.split("RESULT ", 1)[1])
    gib = 1024**3
    for r, line in zip((dp, fsdp, pmap, single), proc.stdout.split("RESULT ", 1)[0].split("dry run: ")[1:], strict=True):
        assert 0 < r["compile_s"] < 600 and r["temp_bytes"] > 0
        assert line.startswith(f"{r['strategy']}; global batch 16 x 64, 1 micro-batch(es); compiled in "
                               f"{r['compile_s']:.1f} s\n"), line
        assert (f"per device: parameters {r['params_bytes'] / gib:.3f} GiB, optimizer state "
                f"{r['opt_state_bytes'] / gib:.3f} GiB, activations and temporaries {r['temp_bytes'] / gib:.3f} GiB "
                f"(arguments per the executable: {r['argument_bytes'] / gib:.3f} GiB)") in line, line
    assert {k: v for k, v in pmap.items() if k != "compile_s"} == {k: v for k, v in dp.items() if k != "compile_s"}
    from gpt_jax import GPTConfig, param_count

    tiny = GPTConfig.preset("gpt2-tiny", n_embd=128, n_head=4)
    n = param_count(tiny)
    assert dp["params_bytes"] == 4 * n and dp["opt_state_bytes"] >= 8 * n  # replicated: all of it per device
    # the executable's arguments: the state (its step, an int32, and its uint32[2] RNG key besides parameters
    # and moments) and an eighth of the batch (16 x (T + 1) int32) on each device
    rest, batch = dp["argument_bytes"] - dp["params_bytes"] - dp["opt_state_bytes"], 16 * (tiny.n_positions + 1) * 4
    assert rest == 4 + 8 + batch // 8, (rest, batch)
    assert single["strategy"].startswith("single device") and single["params_bytes"] == dp["params_bytes"]
    assert single["argument_bytes"] - single["params_bytes"] - single["opt_state_bytes"] == 4 + 8 + batch
    assert fsdp["params_bytes"] < dp["params_bytes"] / 6 and fsdp["opt_state_bytes"] < dp["opt_state_bytes"] / 6


def test_a_mesh_axis_that_cannot_split_a_dimension_is_named_not_dropped_silently():
    import types
    import warnings

    from jax.sharding import PartitionSpec as P

    from gpt_jax.parallel import _mesh_spec, _warn_once

    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 2})
    _warn_once.cache_clear()  # each message warns once per process

    def spec_and_warnings(logical, shape, where):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = _mesh_spec(logical, shape, mesh, where)
        return spec, [str(w.message) for w in caught]

    assert spec_and_warnings(P("vocab", "embed"), (50304, 768), "params/wte/embedding") == (P("tensor", "fsdp"), [])
    assert spec_and_warnings(P("vocab", "embed"), (50257, 768), "params/wte/embedding") == (P(None, "fsdp"), [
        "params/wte/embedding: its vocab dimension (50257) does not split over mesh axis tensor (2 devices), so it "
        "is kept whole on each; raise model.pad_vocab_multiple"])
    assert spec_and_warnings(P("embed", "mlp"), (770, 3072), "params/h/mlp/c_fc/kernel") == (P(None, "tensor"), [
        "params/h/mlp/c_fc/kernel: its embed dimension (770) does not split over mesh axis fsdp (4 devices), so it "
        "is kept whole on each; pick a size divisible by 4"])



# Config validation (RANGES) admits -1 for parallel.data only and sizes >= 1 elsewhere.
@pytest.mark.parametrize("sizes, devices, shape", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((-1, 2, 2), 8, (2, 2, 2)), ((-1, 1, 4), 8, (2, 1, 4)), ((2, 4, 1), 8, (2, 4, 1)),
    ((-1, 1, 1), 1, (1, 1, 1))])
def test_mesh_shape_fills_the_data_axis_given_as_minus_one(sizes, devices, shape):
    from gpt_jax.config import ParallelConfig
    from gpt_jax.parallel import mesh_shape

    got = mesh_shape(ParallelConfig(strategy="mesh", data=sizes[0], fsdp=sizes[1], tensor=sizes[2]), devices)
    assert got == shape and all(type(s) is int for s in got)


@pytest.mark.parametrize("sizes, message", [
    ((-1, 3, 1), "parallel.fsdp x tensor x data = 3 does not divide the 8 devices"),
    ((1, 2, 3), "the mesh data=1 x fsdp=2 x tensor=3 = 6 devices does not match the 8 devices present; "
                "set one axis to -1 to fill them")])
def test_mesh_shape_errors_name_the_sizes_and_the_fix(sizes, message):
    from gpt_jax.config import ConfigError, ParallelConfig
    from gpt_jax.parallel import mesh_shape

    with pytest.raises(ConfigError) as e:
        mesh_shape(ParallelConfig(strategy="mesh", data=sizes[0], fsdp=sizes[1], tensor=sizes[2]), 8)
    assert str(e.value) == message


def test_param_shardings_name_the_parameter_an_axis_cannot_split():
    """The warning names the parameter by its path in the tree, and the other axes still shard."""
    import warnings

    import jax
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from gpt_jax.config import load_config
    from gpt_jax.model import init_params
    from gpt_jax.parallel import _warn_once, param_shardings

    config = load_config(None, ["model.preset=gpt2-tiny", "model.vocab_size=65", "model.pad_vocab_multiple=1"])
    abstract = jax.eval_shape(lambda: init_params(config.model, jax.random.key(0)))
    _warn_once.cache_clear()  # each message warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardings = param_shardings(config, AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor")), abstract)
    assert [str(w.message) for w in caught] == [
        "params/wte/embedding: its vocab dimension (65) does not split over mesh axis tensor (2 devices), so it is "
        "kept whole on each; raise model.pad_vocab_multiple"]
    assert shardings["wte"]["embedding"].spec == P(None, "fsdp")


def test_state_shardings_give_each_adam_moment_its_parameter_sharding():
    """mu and nu of every parameter shard like the parameter (found by its path of dict keys); the step,
    the RNG and Adam's count are replicated; a task's own `specs` replace the GPT's."""
    import jax
    from jax.sharding import AbstractMesh, PartitionSpec as P

    from gpt_jax.config import load_config
    from gpt_jax.model import logical_axes
    from gpt_jax.optim import make_optimizer
    from gpt_jax.parallel import state_shardings
    from gpt_jax.pretrain import init_state

    config = load_config(None, ["model.preset=gpt2-tiny"])
    abstract = jax.eval_shape(lambda: init_state(config, make_optimizer(config.optim, 10)))
    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))

    def specs_by_name(tree):
        return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}

    for specs in (None, jax.tree.map(lambda s: P(), logical_axes(config.model), is_leaf=lambda s: isinstance(s, P))):
        got = state_shardings(config, mesh, abstract, specs)
        params = specs_by_name(got.params)
        sharded = [name for name, spec in params.items() if any(axis is not None for axis in spec)]
        assert len(sharded) == (len(params) if specs is None else 0), sharded
        moments = 0
        for path, spec in specs_by_name(got.opt_state).items():
            param = next((k for k in params if path.endswith(".mu" + k) or path.endswith(".nu" + k)), None)
            if param is None:  # Adam's count, and the parts of the chain that hold no arrays
                assert spec == P(), path
            else:
                assert spec == params[param], path
                moments += 1
        assert moments == 2 * len(params)
        assert got.step.spec == P() and got.rng.spec == P()


def test_check_batch_splits_a_step_into_micro_batches_per_shard_or_names_the_fix():
    from gpt_jax.config import ConfigError, load_config
    from gpt_jax.parallel import check_batch

    def config(batch, accum):
        return load_config(None, ["model.preset=gpt2-tiny", f"train.batch_size={batch}", f"optim.grad_accum={accum}"])

    got = check_batch(config(48, 3), 4)
    assert got == {"global_batch": 48, "per_device_batch": 4, "grad_accum": 3, "tokens_per_step": 48 * 64}
    assert all(type(v) is int for v in got.values())
    with pytest.raises(ConfigError) as e:
        check_batch(config(48, 5), 4)
    assert str(e.value) == "train.batch_size=48 is not divisible by optim.grad_accum=5"
    with pytest.raises(ConfigError) as e:
        check_batch(config(48, 4), 8)
    assert str(e.value) == ("a micro-batch of 12 sequences (train.batch_size=48 / optim.grad_accum=4) does not split "
                            "over 8 data shards; make train.batch_size / optim.grad_accum a multiple of 8")


def test_single_device_accounting_has_one_shard():
    """An odd batch is fine on one device: every sequence of a micro-batch is on it."""
    from gpt_jax.config import load_config
    from gpt_jax.parallel import Single

    single = Single(load_config(None, ["model.preset=gpt2-tiny", "train.batch_size=3"]))
    assert single.accounting["per_device_batch"] == 3 and single.n_devices == 1


def donated(lowered_text):
    """For each argument of a lowered step's main function, whether its buffer is donated to an output."""
    main = lowered_text[lowered_text.index("func.func public @main"):].split("\n", 1)[0]
    return ["tf.aliasing_output" in arg for arg in main.split("%arg")[1:]]


def test_the_single_device_step_donates_the_state_and_only_the_state():
    """The compiled step reuses the state's buffers for the new state (one copy of params and Adam
    moments in memory, not two); the batch is not donated (the loop may still hold it)."""
    import jax.numpy as jnp

    from gpt_jax.config import load_config
    from gpt_jax.parallel import Single

    step = Single(load_config(None, ["model.preset=gpt2-tiny"])).compile_step(
        lambda state, batch: ({"w": state["w"] + batch.sum()}, batch.sum()))
    assert donated(step.lower({"w": jnp.zeros((4, 4))}, jnp.ones((2, 3))).as_text()) == [True, False]


def test_pmap_names_its_devices_and_keeps_one_copy_of_the_parameters_on_the_first():
    """In a single-process run the pmap line has no process count; `params` is one copy (no device
    axis) on the first local device, where `put_eval` puts the evaluation batches."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.config import load_config
    from gpt_jax.parallel import Pmap

    pmap = Pmap(load_config(None, ["model.preset=gpt2-tiny", "parallel.strategy=pmap"]))
    first = jax.local_devices()[0]
    assert pmap.describe() == f"pmap over {jax.local_device_count()} local devices ({first.device_kind})"
    state = pmap.place({"params": {"w": jnp.arange(6.0).reshape(2, 3)}})
    params = pmap.params(type("State", (), {"params": state["params"]}))
    assert params["w"].shape == (2, 3) and params["w"].devices() == {first}
    assert pmap.put_eval(np.zeros((2, 4), np.int32)).devices() == {first}


def test_pmap_in_one_process_restores_onto_its_first_device(monkeypatch):
    """A single-process pmap run restores one copy of the state onto the first local device (then
    `place` replicates it); the replicated global sharding is only for a multi-process run, where every
    array is restored whole onto every device of every process."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.config import load_config
    from gpt_jax.parallel import Pmap

    pmap = Pmap(load_config(None, ["model.preset=gpt2-tiny", "parallel.strategy=pmap"]))
    abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    target = pmap.restore_target(abstract)
    assert jax.tree.structure(target) == jax.tree.structure(abstract)
    for got, want in zip(jax.tree.leaves(target), jax.tree.leaves(abstract)):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert got.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # as process 0 of two
    target = pmap.restore_target(abstract)
    for got, want in zip(jax.tree.leaves(target), jax.tree.leaves(abstract), strict=True):
        assert (got.shape, got.dtype) == (want.shape, want.dtype)
        assert got.sharding.is_fully_replicated and got.sharding.device_set == set(jax.devices())


def test_the_pmap_step_donates_the_state_and_only_the_state():
    """As for one device: the pmapped step writes the new replicated state into the old one's buffers."""
    import jax.numpy as jnp

    from gpt_jax.config import load_config
    from gpt_jax.parallel import Pmap

    pmap = Pmap(load_config(None, ["model.preset=gpt2-tiny", "parallel.strategy=pmap"]))
    step = pmap.compile_step(lambda state, batch: ({"w": state["w"] + batch.sum()}, batch.sum()))
    n = pmap.n_local
    assert donated(step.lower({"w": jnp.zeros((n, 4, 4))}, jnp.ones((n, 2, 3))).as_text()) == [True, False]


MESH_PLACEMENT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gpt_jax.config import load_config
    from gpt_jax.optim import make_optimizer
    from gpt_jax.parallel import Mesh
    from gpt_jax.pretrain import init_state

    config = load_config(None, ["model.preset=gpt2-tiny", "model.n_head=4", "parallel.strategy=mesh", "parallel.data=2",
                                "parallel.fsdp=2", "parallel.tensor=2", "train.batch_size=16", "optim.grad_accum=2"])
    opt = make_optimizer(config.optim, 10)
    abstract = jax.eval_shape(lambda: init_state(config, opt))
    mesh = Mesh(config, abstract)
    assert mesh.describe() == "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices (cpu)", mesh.describe()
    # 16 sequences in 2 micro-batches of 8, split over data x fsdp = 4 shards
    assert (mesh.accounting["per_device_batch"], mesh.accounting["grad_accum"]) == (2, 2), mesh.accounting
    # devices given (as a deviceless TPU / GPU topology's are, to compile for it): the mesh is over those
    half = Mesh(load_config(None, ["model.preset=gpt2-tiny", "parallel.strategy=mesh", "parallel.data=1",
                                   "parallel.fsdp=2", "parallel.tensor=2"]), abstract, devices=jax.devices()[4:])
    assert list(half.mesh.devices.flat) == jax.devices()[4:] and half.n_devices == 4, half.mesh

    def check(got_shardings, want_shardings, shapes, what):
        got, want, shapes = jax.tree.leaves(got_shardings), jax.tree.leaves(want_shardings), jax.tree.leaves(shapes)
        assert len(got) == len(want) == len(shapes), (what, len(got), len(want), len(shapes))
        for g, w, x in zip(got, want, shapes):
            assert g.is_equivalent_to(w, len(x.shape)), (what, x.shape, g, w)

    want = mesh.state_sh
    fsdp_params = [s for s in jax.tree.leaves(want.params) if "fsdp" in jax.tree.leaves(tuple(s.spec))]
    assert fsdp_params, "some parameters are sharded over fsdp"
    state = mesh.init(lambda: init_state(config, opt))
    check([x.sharding for x in jax.tree.leaves(state)], want, abstract, "init")
    placed = mesh.place(jax.device_get(state))
    check([x.sharding for x in jax.tree.leaves(placed)], want, abstract, "place")

    rows = lambda lead: NamedSharding(mesh.mesh, P(*(None,) * lead, ("data", "fsdp")))
    for lead, shape in ((1, (2, 16, 8)), (2, (3, 2, 16, 8))):
        batch = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
        put = mesh.put_batch(batch, lead=lead)
        assert put.sharding.is_equivalent_to(rows(lead), len(shape)), (lead, put.sharding)
        np.testing.assert_array_equal(np.asarray(put), batch)
    assert mesh.put_batch(np.zeros((2, 16, 8), np.int32)).sharding.is_equivalent_to(rows(1), 3)  # default lead 1
    evals = np.arange(2 * 16 * 8, dtype=np.int32).reshape(2, 16, 8)
    assert mesh.put_eval(evals).sharding.is_equivalent_to(rows(1), 3)

    def step(s, b):
        return s.replace(step=s.step + 1), jnp.mean(b.astype(jnp.float32))

    for lead, shape in ((1, (2, 16, 8)), (2, (3, 2, 16, 8))):
        batch = jax.ShapeDtypeStruct(shape, jnp.int32)  # no sharding of their own: the step's must apply
        lowered = mesh.compile_step(step, lead=lead).lower(abstract, batch)
        compiled = lowered.compile()
        check(compiled.input_shardings[0], (want, rows(lead)), (abstract, batch), f"step inputs, lead {lead}")
        check(compiled.output_shardings, (want, NamedSharding(mesh.mesh, P())), (abstract, jnp.zeros(())),
              f"step outputs, lead {lead}")
        text = lowered.as_text()
        main = text[text.index("func.func public @main"):].split("\\n", 1)[0]
        args = main.split("%arg")[1:]
        assert all("tf.aliasing_output" in a for a in args[:-1]) and "tf.aliasing_output" not in args[-1], main
    print("OK")
""")


def test_the_mesh_strategy_places_state_batches_and_its_step_by_its_shardings(tmp_path):
    """On 8 devices (data 2, fsdp 2, tensor 2): init and place give every leaf of the state its sharding,
    batches are split by rows over data x fsdp at their `lead` axis, and the compiled step takes and
    returns those shardings whatever its inputs carry, donating the state and only the state."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MESH_PLACEMENT], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_a_one_device_mesh_names_it():
    import jax

    from gpt_jax.config import load_config
    from gpt_jax.optim import make_optimizer
    from gpt_jax.parallel import Mesh
    from gpt_jax.pretrain import init_state

    config = load_config(None, ["model.preset=gpt2-tiny", "parallel.strategy=mesh", "train.batch_size=3"])
    abstract = jax.eval_shape(lambda: init_state(config, make_optimizer(config.optim, 10)))
    n = jax.device_count()
    assert Mesh(config, abstract).describe() == (f"mesh {{'data': {n}, 'fsdp': 1, 'tensor': 1}} over {n} devices "
                                                 f"({jax.devices()[0].device_kind})")


def test_make_strategy_builds_the_strategy_the_config_names():
    import jax

    from gpt_jax.config import load_config
    from gpt_jax.optim import make_optimizer
    from gpt_jax.parallel import Mesh, Pmap, Single, make_strategy
    from gpt_jax.pretrain import init_state

    for kind, cls in (("single", Single), ("pmap", Pmap), ("mesh", Mesh)):
        config = load_config(None, ["model.preset=gpt2-tiny", f"parallel.strategy={kind}"])
        abstract = jax.eval_shape(lambda: init_state(config, make_optimizer(config.optim, 10)))
        strategy = make_strategy(config, abstract)
        assert type(strategy) is cls and strategy.accounting["global_batch"] == config.train.batch_size, kind
