"""train.wandb_project: the numbers of metrics.jsonl go to Weights & Biases at their steps (read back from an
offline run's own log), a resumed run continues the same W&B run, a run without it imports nothing of wandb,
and a missing package is one line naming the extra to install."""

import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import ORCHESTRATION_ENV, ROOT

NO_WANDB = 'wandb is not installed (pip install -e ".[wandb]")'
TINY = ["model.preset=gpt2-tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_positions=32",
        "train.batch_size=4", "train.eval_batches=1", "train.log_every=1", "train.eval_every=2", "train.save_every=2",
        "train.sample_tokens=0", "data.prefetch=0", "optim.warmup_steps=1",
        "optim.decay_steps=8"]  # programs that do not depend on train.steps: each run after the first finds them cached


def args(tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.is_file():
        corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    return [*TINY, f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}",
            *extra]


def history(path) -> dict[int, dict]:
    """step -> the values a W&B run file (run-ID.wandb) holds at that step. The file is a 7-byte W&B header,
    then a LevelDB log (32 KiB blocks; records of a 7-byte header: CRC, length, type, where 1 is a whole record
    and 2 / 3 / 4 the first, middle and last part of one split across blocks) of wandb_internal Records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    out, pos, part = {}, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = Record.FromString(part)
            part = b""
            if record.HasField("history"):
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)  # wandb-core: nested_key
                         for item in record.history.item}
                out.setdefault(record.history.step.num, {}).update(items)
    return out


def test_wandb_gets_every_number_of_metrics_jsonl_at_its_step_and_a_resume_continues_the_run(tmp_path, monkeypatch,
                                                                                              unoptimized):
    pytest.importorskip("wandb", reason=NO_WANDB)
    from gpt_jax.config import load_config
    from gpt_jax.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for steps in (4, 6):  # the second run resumes the first from its checkpoint at step 4
        monkeypatch.setenv("WANDB_DIR", str(tmp_path / f"wb{steps}"))  # W&B names its folders by the second
        (tmp_path / f"wb{steps}").mkdir()
        train(load_config(None, args(tmp_path, f"train.steps={steps}", "train.wandb_project=gpt-jax-test",
                                     "train.wandb_name=tiny")), verbose=False)
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    files = [f for steps in (4, 6) for f in (tmp_path / f"wb{steps}" / "wandb").glob("offline-run-*/run-*.wandb")]
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one W&B run, written in two sittings
    logged = {}
    for f in files:
        for step, values in history(f).items():
            logged.setdefault(step, {}).update(values)
    want = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        want.setdefault(r["step"], {}).update({f"{r['kind']}/{k}": v for k, v in r.items()
                                               if k not in ("step", "kind") and isinstance(v, (int, float))})
    assert sorted(want) == list(range(1, 7)) and "eval/val_loss" in want[6] and "train/mfu" in want[1]
    for step, values in want.items():
        assert {k: logged[step][k] for k in values} == values, step  # the same numbers, JSON both ways


def test_a_run_without_wandb_imports_nothing_of_it(tmp_path):
    pytest.importorskip("wandb", reason=NO_WANDB)  # installed, so only the code keeps it out
    code = ("import sys\nfrom gpt_jax.config import load_config\nfrom gpt_jax.trainer import train\n"
            f"train(load_config(None, {args(tmp_path, 'train.steps=2')!r}), verbose=False)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'wandb'))\n")
    env = {**os.environ, **ORCHESTRATION_ENV,  # compiled as the test above (unoptimized) compiles: cached programs
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]" and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "wandb_run_id").exists()


def test_a_missing_wandb_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from gpt_jax.trainer import run_training

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert run_training(None, args(tmp_path, "train.wandb_project=gpt-jax-test")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: train.wandb_project=gpt-jax-test")
    assert 'pip install -e ".[wandb]"' in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # before any data or compiling
