"""Untrusted weight files: hostile PyTorch `.bin` archives and broken safetensors are refused with
one clear error, without a crash and without running any code they name.

The archives are written here opcode-compatibly with torch.save (a zip of data.pkl and one file per
storage), so no torch is needed; a benign one built the same way must load exactly.
"""

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from conftest import ROOT
from gpt_jax.pretrained import WeightsError, load_pretrained, load_torch_bin


# Stand-ins pickled under this module's name, then renamed to torch's globals in the bytes (protocol 2
# writes a global as "c<module>\n<name>\n", so the rename is exact).
def _rebuild_tensor_v2(*args):
    raise AssertionError("never called")


class FloatStorage:
    pass


class DoubleStorage:
    pass


class Storage:
    def __init__(self, key, cls, numel):
        self.key, self.cls, self.numel = key, cls, numel


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return _rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", obj.cls, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None


def write_bin(path, state, storages: dict[str, bytes]):
    """A torch.save-style zip: archive/data.pkl (pickle of `state`) and archive/data/<key> per storage."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    pkl = buf.getvalue().replace(f"c{__name__}\n_rebuild_tensor_v2\n".encode(), b"ctorch._utils\n_rebuild_tensor_v2\n")
    for cls in ("FloatStorage", "DoubleStorage"):
        pkl = pkl.replace(f"c{__name__}\n{cls}\n".encode(), f"ctorch\n{cls}\n".encode())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def floats(n):
    return np.arange(n, dtype=np.float32).tobytes()


def test_benign_archive_loads_views_and_shared_storage(tmp_path):
    s = Storage("0", FloatStorage, 12)
    state = OrderedDict(a=Tensor(s, 0, (3, 4), (4, 1)), t=Tensor(s, 1, (2, 3), (1, 4)))  # a transposed view
    out = load_torch_bin(write_bin(tmp_path / "w.bin", state, {"0": floats(12)}))
    full = np.arange(12, dtype=np.float32)
    np.testing.assert_array_equal(out["a"], full.reshape(3, 4))
    np.testing.assert_array_equal(out["t"], np.lib.stride_tricks.as_strided(full[1:], (2, 3), (4, 16)))


@pytest.mark.parametrize("state, storages, words", [
    # a view far past its 16-byte storage (as_strided would read unowned memory: a segfault)
    ({"w": Tensor(Storage("0", FloatStorage, 4), 0, (8192, 8192), (8192, 1))}, {"0": floats(4)},
     ["shape (8192, 8192)", "storage that holds 4"]),
    ({"w": Tensor(Storage("0", FloatStorage, 4), 1, (4,), (1,))}, {"0": floats(4)}, ["offset 1", "holds 4"]),
    ({"w": Tensor(Storage("0", FloatStorage, 4), 0, (2,), (-1,))}, {"0": floats(4)}, ["malformed view"]),
    ({"w": Tensor(Storage("0", FloatStorage, 4), -3, (2,), (1,))}, {"0": floats(4)}, ["malformed view"]),
    # a storage whose declared size or dtype disagrees with its bytes, or that is missing
    ({"w": Tensor(Storage("0", DoubleStorage, 4), 0, (4,), (1,))}, {"0": floats(4)}, ["32 bytes", "16 bytes"]),
    ({"w": Tensor(Storage("0", FloatStorage, 10 ** 12), 0, (4,), (1,))}, {"0": floats(4)}, ["declares", "16 bytes"]),
    ({"w": Tensor(Storage("9", FloatStorage, 4), 0, (4,), (1,))}, {"0": floats(4)}, ["no such file"]),
    ({"w": Tensor(Storage("0", OrderedDict, 4), 0, (4,), (1,))}, {"0": floats(4)}, ["unsupported type"]),
    # not a state dict of tensors
    ([1, 2, 3], {}, ["does not hold a state dict"]),
    ({"w": 7}, {}, ["does not hold a state dict"]),
])
def test_hostile_views_and_storages_are_refused(tmp_path, state, storages, words):
    with pytest.raises(WeightsError) as err:
        load_torch_bin(write_bin(tmp_path / "w.bin", state, storages))
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_forbidden_global_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "executed"
    with pytest.raises(WeightsError, match=r"refused posix\.system.*nothing was executed"):
        load_torch_bin(write_bin(tmp_path / "w.bin", {"w": _RunsCode(marker)}, {}))
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_RunsCode(marker))) == 0 and marker.exists()  # the payload does run when unpickled


def test_truncated_archive_and_garbage_are_refused(tmp_path):
    good = write_bin(tmp_path / "good.bin", {"w": Tensor(Storage("0", FloatStorage, 256), 0, (256,), (1,))},
                     {"0": floats(256)})
    raw = good.read_bytes()
    for name, data in [("half.bin", raw[: len(raw) // 2]), ("tail.bin", raw[:-30]), ("empty.bin", b""),
                       ("text.bin", b"not a zip\n" * 50)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match="not a PyTorch zip checkpoint|not a readable PyTorch state dict"):
            load_torch_bin(tmp_path / name)
    flipped = bytearray(raw)
    flipped[raw.index(floats(256)) + 100] ^= 1  # storage bytes: the archive's CRC catches it
    (tmp_path / "flip.bin").write_bytes(bytes(flipped))
    with pytest.raises(WeightsError, match="not a readable PyTorch state dict"):
        load_torch_bin(tmp_path / "flip.bin")


TINY_HF = {"model_type": "gpt2", "vocab_size": 16, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2}


def test_load_pretrained_refuses_broken_safetensors_and_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)  # a header length far past the file
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    from gpt_jax.config import ConfigError

    with pytest.raises(ConfigError, match="is not a GPT-2 / OpenAI-GPT config"):
        load_pretrained(tmp_path)


def test_sample_command_gives_one_line_for_hostile_weights(tmp_path):
    """The command line: exit code 6 and one `error:` line, no traceback, nothing executed."""
    marker = tmp_path / "executed"
    (tmp_path / "config.json").write_text(json.dumps(TINY_HF))
    write_bin(tmp_path / "pytorch_model.bin", {"w": _RunsCode(marker)}, {})
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.sample", "--checkpoint", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "refused posix.system" in proc.stderr
    assert not marker.exists()


def test_safetensors_is_read_before_a_bin(tmp_path):
    import jax

    from gpt_jax.config import GPTConfig
    from gpt_jax.model import init_params
    from gpt_jax.pretrained import save_pretrained

    config = GPTConfig.preset("gpt2-tiny", vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    params = init_params(config, jax.random.key(0))
    save_pretrained(config, params, tmp_path)
    marker = tmp_path / "executed"
    write_bin(tmp_path / "pytorch_model.bin", {"w": _RunsCode(marker)}, {})
    _, loaded = load_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded["wte"]["embedding"], params["wte"]["embedding"])
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="refused posix.system"):
        load_pretrained(tmp_path)
    assert not marker.exists()
