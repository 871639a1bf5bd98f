"""Checkpoints (gpt_jax.checkpoint): checksums, retention, best/, the names arrays are saved under,
and what happens to a checkpoint that cannot be restored: the owner sets it aside, a reader skips it,
and each says why in one line (with nothing of what the libraries log meanwhile: test_checkpoint_logs.py)."""

import json
import time

import numpy as np
import pytest


def test_checksums_change_with_every_single_bit():
    import jax.numpy as jnp

    from gpt_jax.checkpoint import checksums

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    base = int(checksums({"x": jnp.asarray(x)})["x"])
    bits = x.view(np.uint32)
    seen = []
    for i in range(bits.size):
        for b in range(32):
            flipped = bits.copy().reshape(-1)
            flipped[i] ^= np.uint32(1 << b)
            seen.append(int(checksums({"x": jnp.asarray(flipped.reshape(x.shape).view(np.float32))})["x"]))
    assert len(seen) == bits.size * 32 and base not in seen
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # the same values in another order
    assert int(checksums({"x": jnp.asarray(swapped)})["x"]) != base


def test_checkpoint_names_each_array_by_its_dotted_path(tmp_path):
    """The saved checksums and the mismatch messages name arrays as `params.wte.embedding`,
    `opt_state.0.mu.w` (dict keys, tuple indices, named-tuple fields joined by dots): the names a
    checkpoint written by an earlier version holds, so another spelling would fail every checksum."""
    import jax
    import jax.numpy as jnp
    import optax

    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.rundir import RunDirError

    state = {"params": {"wte": {"embedding": jnp.ones(4)}},
             "opt_state": (optax.ScaleByAdamState(jnp.zeros((), jnp.int32), {"w": jnp.ones(2)}, {"w": jnp.ones(2)}),),
             "step": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(1, state, {"config": {}})
    ckpt.wait()
    ckpt.close()
    saved = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert sorted(saved["checksums"]) == ["opt_state.0.count", "opt_state.0.mu.w", "opt_state.0.nu.w",
                                          "params.wte.embedding", "step"]
    other = {**state, "params": {"wte": {"embedding": jnp.ones(5)}}}
    ckpt = Checkpointer(tmp_path, keep=1)
    with pytest.raises(RunDirError) as e:
        ckpt.restore_latest(jax.eval_shape(lambda: other))
    ckpt.close()
    assert "params.wte.embedding: saved (4,) float32, now (5,) float32" in str(e.value)


def test_array_differences_name_an_array_found_on_one_side_only():
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import array_differences

    def tree(**shapes):
        return {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}

    assert array_differences(tree(a=(2,), b=(3,)), tree(a=(2,), c=(4,))) == [
        "1 array(s) only in the checkpoint, e.g. b", "1 array(s) only in this command's state, e.g. c"]
    assert array_differences(tree(a=(2,)), tree(a=(2,))) == []


def test_checkpointer_keeps_the_newest_and_every_kth_and_a_reader_changes_nothing(tmp_path):
    """keep (2 by default) newest plus every keep_every-th step; a writer clears a killed save's
    temporary folder; a reader (read_only) creates nothing, clears nothing and moves no damaged
    checkpoint aside: it falls back to the previous one and leaves the directory as it was."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    def saved(root, steps, **kw):
        ckpt = Checkpointer(root, **kw)
        for step in steps:
            ckpt.save(step, {"w": jnp.full((2,), float(step))}, {"config": {}})
        ckpt.wait()
        ckpt.close()
        return ckpt.steps()

    assert saved(tmp_path / "default", range(1, 5)) == [3, 4]
    assert saved(tmp_path / "every", range(1, 8), keep=2, keep_every=3) == [3, 6, 7]

    Checkpointer(tmp_path / "none", read_only=True).close()
    assert not (tmp_path / "none").exists()
    Checkpointer(tmp_path / "new").close()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["best", "checkpoints"]

    run = tmp_path / "every"
    leftover = run / "checkpoints" / "9.orbax-checkpoint-tmp-1733000000"  # a save killed mid-write
    leftover.mkdir()
    meta = run / "checkpoints" / "7" / "meta" / "metadata"
    damaged = json.loads(meta.read_text())
    damaged["checksums"]["w"] ^= 1
    meta.write_text(json.dumps(damaged))
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    reader = Checkpointer(run, read_only=True)
    state, _, step = reader.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(2)}), check=lambda m, d: None)
    reader.close()
    assert step == 6 and float(state["w"][0]) == 6.0
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    Checkpointer(run).close()
    deadline = time.time() + 10  # orbax clears it in the background
    while leftover.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert not leftover.exists()


def test_restore_params_reads_the_best_the_last_or_a_kept_step_and_changes_nothing(tmp_path):
    """What sampling, evaluation and fine-tuning's init_from read (trainer.restore_params): the best
    checkpoint by default, the newest when none is marked best or with "last", a kept step with `step=`,
    each as its parameters alone on one device. A step not kept, or a folder with no checkpoint, is one
    line naming it; a reader leaves the run directory as it was (a killed save's folder stays for its owner)."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.config import ConfigError
    from gpt_jax.runs import restore_params

    def save(run, best_step):
        ckpt = Checkpointer(run, keep=3)
        for step in (1, 2, 3):
            params = {"wte": jnp.full((3, 2), float(step)), "h": {"b": jnp.full((2,), -float(step))}}
            ckpt.save(step, {"params": params, "step": jnp.int32(step)}, {"config": {}}, best=step == best_step)
        ckpt.wait()
        ckpt.close()

    def listing(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    def which(params):
        assert jax.tree.map(jnp.shape, params) == {"wte": (3, 2), "h": {"b": (2,)}}
        assert all(x.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                   for x in jax.tree.leaves(params))
        assert float(params["h"]["b"][0]) == -float(params["wte"][0, 0])
        return float(params["wte"][0, 0])

    save(tmp_path / "run", best_step=2)
    save(tmp_path / "no-best", best_step=None)
    (tmp_path / "run" / "checkpoints" / "4.orbax-checkpoint-tmp-1733000000").mkdir()  # a save killed mid-write
    before = listing(tmp_path)
    assert which(restore_params(tmp_path / "run")) == 2.0 and which(restore_params(tmp_path / "run", "best")) == 2.0
    assert which(restore_params(tmp_path / "run", "last")) == 3.0 and which(restore_params(tmp_path / "no-best")) == 3.0
    assert [which(restore_params(tmp_path / "run", step=s)) for s in (1, 3)] == [1.0, 3.0]
    with pytest.raises(ConfigError, match=r"run has no checkpoint at step 5; its checkpoints are at steps \[1, 2, 3\] "
                                          r"\(train.keep_every keeps more\)$"):
        restore_params(tmp_path / "run", step=5)
    with pytest.raises(ConfigError, match="empty has no checkpoint that restores$"):
        restore_params(tmp_path / "empty")
    assert listing(tmp_path) == before  # nothing created, nothing cleared

    # load_run: the same choice, with the run's config (one saved before padding existed reads unpadded)
    # and tokenizer
    from gpt_jax.config import load_config, save_config
    from gpt_jax.runs import load_run

    config = load_config(None, ["model.preset=gpt2-tiny", "model.vocab_size=3"])
    save_config(config, tmp_path / "run" / "config.yaml")
    old = (tmp_path / "run" / "config.yaml").read_text().replace("  pad_vocab_multiple: 128\n", "")
    assert config.model.pad_vocab_multiple == 128 and "pad_vocab_multiple" not in old
    (tmp_path / "run" / "config.yaml").write_text(old)
    (tmp_path / "run" / "tokenizer.json").write_text(json.dumps({"kind": "char", "chars": "abc"}))
    loaded, params, tok = load_run(tmp_path / "run")
    assert loaded.model.pad_vocab_multiple == 1 and loaded.model.vocab_size == 3 and tok.decode([2, 0]) == "ca"
    assert [which(load_run(tmp_path / "run", *a, **kw)[1]) for a, kw in
            [((), {}), (("last",), {}), ((), {"step": 1})]] == [2.0, 3.0, 1.0]
    assert which(params) == 2.0


def test_best_holds_only_the_step_saved_as_best_and_a_retraced_step_replaces_the_saved_one(tmp_path):
    """best/ gets a step only when saved with best=True and keeps one; a resumed run that saves a step
    again (its step 2 after a checkpoint at 3 existed) replaces the old one rather than skipping it."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    abstract = jax.eval_shape(lambda: {"w": jnp.zeros(2)})
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, {"w": jnp.full((2,), 1.0)}, {"config": {}})
    ckpt.save(2, {"w": jnp.full((2,), 2.0)}, {"config": {}}, best=True)
    ckpt.save(3, {"w": jnp.full((2,), 3.0)}, {"config": {}}, best=True)
    ckpt.save(4, {"w": jnp.full((2,), 4.0)}, {"config": {}})
    ckpt.wait()
    assert ckpt.best.all_steps() == [3] and ckpt.steps() == [2, 3, 4]
    ckpt.close()
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(2, {"w": jnp.full((2,), 20.0)}, {"config": {}})
    ckpt.wait()
    state, _ = ckpt.restore_step(abstract, 2)
    ckpt.close()
    assert float(state["w"][0]) == 20.0


def test_why_a_checkpoint_cannot_be_restored_is_named(tmp_path, capsys):
    """Each fallback line says what is wrong with the checkpoint it skips; a checkpoint from before
    checksums restores; restore_step reads that step's own JSON part."""
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer
    from gpt_jax.rundir import RunDirError

    names = ("a", "b", "c", "d")
    abstract = jax.eval_shape(lambda: {k: jnp.zeros(2) for k in names})

    def run(name):
        ckpt = Checkpointer(tmp_path / name, keep=2)
        for step in (1, 2):
            ckpt.save(step, {k: jnp.full((2,), float(step)) for k in names}, {"config": {}, "n": step})
        ckpt.wait()
        ckpt.close()
        return tmp_path / name / "checkpoints" / "2" / "meta" / "metadata"

    def reason(name, check=lambda meta, differences: None, target=abstract):
        reader = Checkpointer(tmp_path / name, read_only=True)
        state, meta, step = reader.restore_latest(target, check=check)
        reader.close()
        line = capsys.readouterr().err.strip()
        assert step == 1 and meta["n"] == 1 and float(state["a"][0]) == 1.0, line
        assert line.startswith(f"checkpoint at step 2 in {tmp_path / name / 'checkpoints'} cannot be restored (")
        assert line.endswith("); trying the previous one") and "\n" not in line
        return line[line.index("(") + 1: -len("); trying the previous one")]

    meta = run("checksum")
    saved = json.loads(meta.read_text())
    saved["checksums"]["c"] ^= 1
    meta.write_text(json.dumps(saved))
    assert reason("checksum") == "1 array(s) do not match their checksums, e.g. c"

    meta = run("not-a-dict")
    meta.write_text("[1]")
    assert reason("not-a-dict") == "its metadata is missing"

    meta = run("not-json")
    meta.write_text("{")
    assert reason("not-json") == "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"

    run("no-arrays")
    for f in (tmp_path / "no-arrays" / "checkpoints" / "2").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.unlink()
    kind, _, text = reason("no-arrays").partition(": ")  # TensorStore's error, cut at 200 characters
    assert kind.isidentifier() and kind.endswith("Error") and len(text) == 200, (kind, text)

    run("shapes")  # arrays that a `check` accepts as the run's but that differ from the saved ones: damage
    seen = []
    wider = jax.eval_shape(lambda: {k: jnp.zeros(3) for k in names})
    reader = Checkpointer(tmp_path / "shapes", read_only=True)
    assert reader.restore_latest(wider, check=lambda meta, differences: seen.append(differences)) is None
    reader.close()
    assert seen[0] == [f"{k}: saved (2,) float32, now (3,) float32" for k in names]
    assert capsys.readouterr().err.splitlines()[0].endswith(
        "cannot be restored (its arrays disagree with its own saved config: a: saved (2,) float32, now (3,) float32; "
        "b: saved (2,) float32, now (3,) float32); trying the previous one")
    ckpt = Checkpointer(tmp_path / "shapes")
    with pytest.raises(RunDirError) as e:  # without a `check`: another run's checkpoint, three examples
        ckpt.restore_latest(wider)
    assert str(e.value).endswith("holds other arrays than its run's config.yaml describes: " + "; ".join(
        f"{k}: saved (2,) float32, now (3,) float32" for k in names[:3]))
    state, meta = ckpt.restore_step(abstract, 1)  # its own JSON part, not the newest one's
    assert meta["n"] == 1 and float(state["a"][0]) == 1.0
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checksum", read_only=True)  # the reader above left step 2 in place
    with pytest.raises(RunDirError) as e:
        ckpt.restore_step(abstract, 2)
    ckpt.close()
    assert str(e.value) == (f"the checkpoint at step 2 in {tmp_path / 'checksum' / 'checkpoints'} cannot be restored "
                            "(1 array(s) do not match their checksums, e.g. c)")

    meta = run("before-checksums")
    saved = json.loads(meta.read_text())
    del saved["checksums"]
    meta.write_text(json.dumps(saved))
    ckpt = Checkpointer(tmp_path / "before-checksums", read_only=True)
    state, meta, step = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 2 and float(state["d"][0]) == 2.0 and "checksums" not in meta


def test_the_owner_sets_aside_each_damaged_checkpoint_and_every_process_waits_for_it(tmp_path, monkeypatch, capsys):
    """Two damaged checkpoints in a row both go to corrupt/ (the folder exists for the second); one set
    aside again replaces the earlier copy under that name instead of nesting inside it; every process
    meets at a barrier named for the step (a multi-process run's processes must pass the same name)."""
    import jax
    import jax.numpy as jnp

    from gpt_jax import checkpoint
    from gpt_jax.checkpoint import Checkpointer

    waits = []
    monkeypatch.setattr(checkpoint, "barrier", waits.append)
    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((2,), float(step))}, {"config": {}})
    ckpt.wait()
    ckpt.close()
    for step in (2, 3):
        meta = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
        saved = json.loads(meta.read_text())
        saved["checksums"]["w"] ^= 1
        meta.write_text(json.dumps(saved))
    earlier = tmp_path / "corrupt" / "checkpoints-2"
    earlier.mkdir(parents=True)
    (earlier / "from-an-earlier-run").write_text("")
    ckpt = Checkpointer(tmp_path, keep=3)
    state, _, step = ckpt.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(2)}), check=lambda m, d: None)
    ckpt.close()
    assert step == 1 and float(state["w"][0]) == 1.0 and ckpt.steps() == [1]
    assert waits == ["gpt_jax: checkpoint 3 moved aside", "gpt_jax: checkpoint 2 moved aside"]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["checkpoints-2", "checkpoints-3"]
    assert sorted(p.name for p in earlier.iterdir()) == sorted(p.name for p in (tmp_path / "corrupt" / "checkpoints-3").iterdir())
    assert "meta" in {p.name for p in earlier.iterdir()}
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == (f"checkpoint at step 2 in {tmp_path / 'checkpoints'} cannot be restored (1 array(s) do not match "
                        f"their checksums, e.g. w); moved it to {earlier} and trying the previous one")


def test_checkpoint_whose_arrays_fail_their_checksum_is_set_aside(tmp_path):
    import jax
    import jax.numpy as jnp

    from gpt_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"config": {}})
    ckpt.wait()
    ckpt.close()
    meta = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["checksums"]["w"] ^= 1  # as a flipped bit in the array file would read
    meta.write_text(json.dumps(saved))
    ckpt = Checkpointer(tmp_path, keep=3)
    state, _, step = ckpt.restore_latest(jax.eval_shape(lambda: {"w": jnp.zeros(4)}), check=lambda m, d: None)
    ckpt.close()
    assert step == 1 and float(state["w"][0]) == 1.0
    assert (tmp_path / "corrupt" / "checkpoints-2").is_dir() and ckpt.steps() == [1]


def test_arrays_that_fail_to_read_name_the_error_and_the_machine_s_trouble_passes_through():
    """When orbax fails on the arrays themselves (after their metadata read), the checkpoint is unreadable for
    the reason orbax gave: its type and the first 200 characters of its text. Out of memory, a permission
    refused and XLA's own errors are the machine's trouble, not the checkpoint's, and pass through unchanged."""
    from gpt_jax.checkpoint import Checkpointer, _Unreadable

    class Manager:
        def __init__(self, error):
            self.error = error

        def restore(self, step, args):
            raise self.error

    with pytest.raises(_Unreadable) as unreadable:
        Checkpointer._read_state(Manager(ValueError("chunk 3 of h.0.attn " + "x" * 300)), 7, {})
    assert str(unreadable.value) == "ValueError: chunk 3 of h.0.attn " + "x" * (200 - len("chunk 3 of h.0.attn "))
    import jax

    for error in (MemoryError("out of memory"), PermissionError("denied"), jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED")):
        with pytest.raises(type(error)) as passed:
            Checkpointer._read_state(Manager(error), 7, {})
        assert passed.value is error
