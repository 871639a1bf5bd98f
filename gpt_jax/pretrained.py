"""Import and export Hugging Face GPT-2 / OpenAI-GPT checkpoint directories.

A directory holds `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`,
or a PyTorch `pytorch_model.bin`). Our parameter names are OpenAI's, so import is a rename table
plus stacking the per-layer tensors on a leading layer axis. HF's Conv1D stores kernels as
[in, out], which is flax's Dense layout, so no transposes are needed. Neither torch nor
transformers is needed: `.bin` files are read with a small unpickler over the zip archive, which
accepts tensors and nothing else and checks every view against its storage before making it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
from flax.core import meta
from safetensors.numpy import load_file, save_file

from gpt_jax.config import ConfigError, GPTConfig
from gpt_jax.hub import local_path

# HF activation names <-> ours, per model type. For gpt2, gelu_new / gelu_pytorch_tanh are the tanh
# approximation and "gelu" is the exact erf form. OpenAI-GPT's `afn` table (modeling_openai.ACT_FNS)
# maps "gelu" to gelu_new, the tanh form the original GPT-1 code used, and has no exact GELU.
_ACT_FROM_HF = {
    "gpt2": {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
             "silu": "silu", "swish": "silu"},
    "openai-gpt": {"gelu": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"},
}
_ACT_TO_HF = {
    "gpt2": {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"},
    "openai-gpt": {"gelu_tanh": "gelu", "relu": "relu", "silu": "silu"},
}

_TOP = {  # model_type -> {HF name: our path}
    "gpt2": {"wte.weight": ("wte", "embedding"), "wpe.weight": ("wpe", "embedding"),
             "ln_f.weight": ("ln_f", "scale"), "ln_f.bias": ("ln_f", "bias")},
    "openai-gpt": {"tokens_embed.weight": ("wte", "embedding"), "positions_embed.weight": ("wpe", "embedding")},
}
_LAYER = {  # the same in both families
    "ln_1.weight": ("ln_1", "scale"), "ln_1.bias": ("ln_1", "bias"),
    "attn.c_attn.weight": ("attn", "c_attn", "kernel"), "attn.c_attn.bias": ("attn", "c_attn", "bias"),
    "attn.c_proj.weight": ("attn", "c_proj", "kernel"), "attn.c_proj.bias": ("attn", "c_proj", "bias"),
    "ln_2.weight": ("ln_2", "scale"), "ln_2.bias": ("ln_2", "bias"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "kernel"), "mlp.c_fc.bias": ("mlp", "c_fc", "bias"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "kernel"), "mlp.c_proj.bias": ("mlp", "c_proj", "bias"),
}
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias", "lm_head.weight")  # causal-mask buffers; tied head


def config_from_hf(hf: dict) -> GPTConfig:
    """Map a transformers config.json (gpt2 or openai-gpt) onto GPTConfig."""
    kind = hf.get("model_type")
    if kind not in _TOP:
        raise ConfigError(f"model_type {kind!r} is not supported; expected 'gpt2' or 'openai-gpt'")
    act_key = "activation_function" if kind == "gpt2" else "afn"
    act = hf.get(act_key, "gelu_new" if kind == "gpt2" else "gelu")
    if act not in _ACT_FROM_HF[kind]:
        raise ConfigError(f"config.json {act_key}={act!r} is not supported; expected one of {sorted(_ACT_FROM_HF[kind])}")
    if kind == "gpt2":
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                        ("scale_attn_weights", True)):
            if hf.get(key, ok) != ok:
                raise ConfigError(f"config.json {key}={hf[key]!r} is not supported (only {ok})")
    return GPTConfig(
        vocab_size=hf["vocab_size"], n_positions=hf["n_positions"], n_embd=hf["n_embd"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_inner=hf.get("n_inner") if kind == "gpt2" else None, activation=_ACT_FROM_HF[kind][act],
        norm="pre" if kind == "gpt2" else "post", layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        embd_pdrop=hf.get("embd_pdrop", 0.1), attn_pdrop=hf.get("attn_pdrop", 0.1),
        resid_pdrop=hf.get("resid_pdrop", 0.1), initializer_range=hf.get("initializer_range", 0.02),
    )


def config_to_hf(config: GPTConfig) -> dict:
    common = dict(vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
                  n_layer=config.n_layer, n_head=config.n_head, layer_norm_epsilon=config.layer_norm_epsilon,
                  embd_pdrop=config.embd_pdrop, attn_pdrop=config.attn_pdrop, resid_pdrop=config.resid_pdrop,
                  initializer_range=config.initializer_range, tie_word_embeddings=True, torch_dtype="float32")
    if config.norm == "pre":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_inner=config.n_inner,
                    activation_function=_ACT_TO_HF["gpt2"][config.activation], n_ctx=config.n_positions, **common)
    if config.n_inner not in (None, 4 * config.n_embd):
        raise ConfigError("a post-LN (GPT-1) model exports as openai-gpt, which has no n_inner; use n_inner=None")
    if config.activation not in _ACT_TO_HF["openai-gpt"]:
        raise ConfigError(f"a post-LN (GPT-1) model exports as openai-gpt, which has no {config.activation!r} "
                          f"activation; use one of {sorted(_ACT_TO_HF['openai-gpt'])}")
    return dict(model_type="openai-gpt", architectures=["OpenAIGPTLMHeadModel"],
                afn=_ACT_TO_HF["openai-gpt"][config.activation], **common)


# --- reading PyTorch .bin files without torch --------------------------------------------------


class WeightsError(ValueError):
    """A weights file is malformed, truncated or unsafe to load; the message says which and why."""


_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


def _ints(values) -> bool:
    return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """The tensor that views `storage` from `offset` with `size` and `stride` (in elements), once the
    view is known to stay inside the storage: as_strided itself would read past its end."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise WeightsError(f"a tensor is built on {type(storage).__name__}, not on a storage")
    if type(offset) is not int or offset < 0 or not _ints(size) or not _ints(stride) or len(size) != len(stride):
        raise WeightsError(f"a tensor has a malformed view: offset {offset!r}, size {size!r}, stride {stride!r}")
    numel = math.prod(size)
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else 0
    if end > storage.size or numel > storage.size:
        raise WeightsError(f"a tensor of shape {size} (offset {offset}, stride {stride}) needs {max(end, numel)} "
                           f"elements of a storage that holds {storage.size}")
    itemsize = storage.dtype.itemsize
    if numel == 0:
        return np.zeros(size, storage.dtype)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * itemsize for s in stride)).copy()


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, *_: tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise WeightsError(f"refused {module}.{name}: a state dict holds tensors only, and this file names other "
                           "code to run (it may be malicious); nothing was executed")

    def persistent_load(self, pid):
        """A storage record ('storage', dtype, key, location, numel): its bytes, as `dtype`."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise WeightsError(f"unexpected persistent record {str(pid)[:80]}")
        _, dtype, key, _location, numel = pid
        if dtype not in _STORAGE_DTYPES.values() or not isinstance(key, str) or type(numel) is not int:
            raise WeightsError(f"a storage record has an unsupported type or layout: {str(pid)[:80]}")
        if key in self.storages:  # tensors that share a storage (tied weights) share one read of it
            return self.storages[key]
        name, nbytes = f"{self.prefix}/data/{key}", numel * np.dtype(dtype).itemsize
        try:
            size = self.archive.getinfo(name).file_size
        except KeyError:
            size = None
        if size != nbytes:  # checked before reading: a declared size cannot make us allocate more
            raise WeightsError(f"storage {key} declares {numel} {np.dtype(dtype).name} values ({nbytes} bytes) "
                               f"but the archive holds {'no such file' if size is None else f'{size} bytes'}")
        self.storages[key] = np.frombuffer(self.archive.read(name), dtype=np.dtype(dtype))
        return self.storages[key]


def load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict; anything else in the file is refused (WeightsError)."""
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{path} is not a PyTorch zip checkpoint (truncated, or the legacy pre-1.6 format, "
                           "which is not supported)")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                raise WeightsError(f"{path} has no data.pkl; it is not a PyTorch state dict")
            if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
                raise WeightsError(f"{path} has compressed members, which torch.save never writes")
            with archive.open(pkl) as f:
                tensors = _TorchUnpickler(f, archive, pkl[: -len("/data.pkl")]).load()
    except (OSError, WeightsError):
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle or archive fails in many ways
        raise WeightsError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {str(e)[:200]})") from None
    if not (isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                                for k, v in tensors.items())):
        raise WeightsError(f"{path} does not hold a state dict (names -> tensors)")
    return dict(tensors)


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (OSError, WeightsError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise WeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    if (path / "model.safetensors").is_file():
        return _load_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        try:
            shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{path / 'model.safetensors.index.json'} is not a shard index ({type(e).__name__}: "
                               f"{str(e)[:120]})") from None
        tensors = {}
        for shard in shards:
            tensors.update(_load_safetensors(path / shard))
        return tensors
    if (path / "pytorch_model.bin").is_file():
        return load_torch_bin(path / "pytorch_model.bin")
    raise ConfigError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_pretrained(path, pad_vocab_multiple: int = 1) -> tuple[GPTConfig, dict]:
    """Read a Hugging Face GPT-2 or OpenAI-GPT directory, or a model name (`gpt2`, `gpt2-medium`,
    `gpt2-large`, `gpt2-xl`, `openai-gpt`) from the Hugging Face cache, into (GPTConfig, params).

    pad_vocab_multiple > 1 adds zero embedding rows up to a multiple of it (GPTConfig.pad_vocab_multiple;
    their logits are masked), e.g. 128 to train with a vocabulary that shards over `tensor`."""
    path = local_path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a checkpoint directory: {path / 'config.json'} is missing")
    try:
        hf = json.loads((path / "config.json").read_text())
        config = config_from_hf(hf)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path / 'config.json'} is not a GPT-2 / OpenAI-GPT config ({type(e).__name__}: "
                          f"{str(e)[:120]}); restore the file that came with the weights") from None
    tensors = {k.removeprefix("transformer."): v for k, v in _read_weights(path).items()}
    top, L = _TOP[hf["model_type"]], config.n_layer
    params: dict = {}

    def put(tree_path, value):
        node = params
        for part in tree_path[:-1]:
            node = node.setdefault(part, {})
        node[tree_path[-1]] = value

    for name, tree_path in top.items():
        if name not in tensors:
            raise ConfigError(f"{path}: tensor {name!r} is missing from the checkpoint")
        put(tree_path, np.asarray(tensors.pop(name), np.float32))
    for name, tree_path in _LAYER.items():
        missing = [i for i in range(L) if f"h.{i}.{name}" not in tensors]
        if missing:
            raise ConfigError(f"{path}: tensor h.{missing[0]}.{name} is missing from the checkpoint")
        put(("h", *tree_path), np.stack([np.asarray(tensors.pop(f"h.{i}.{name}"), np.float32) for i in range(L)]))
    leftover = [k for k in tensors if not k.endswith(_IGNORED_SUFFIXES)]
    if leftover:
        raise ConfigError(f"{path}: unexpected tensors {leftover[:5]}; is config.json's n_layer right?")
    _check_shapes(config, params, str(path))
    if pad_vocab_multiple > 1:
        config = dataclasses.replace(config, pad_vocab_multiple=pad_vocab_multiple)
        wte = params["wte"]["embedding"]
        params["wte"]["embedding"] = np.pad(wte, ((0, config.padded_vocab_size - wte.shape[0]), (0, 0)))
    return config, params


def _check_shapes(config: GPTConfig, params: dict, where: str):
    import jax

    from gpt_jax.model import init_params

    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for key, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        if key not in flat_e:
            raise ConfigError(f"{where}: unexpected parameter {jax.tree_util.keystr(key)}")
        if tuple(value.shape) != tuple(flat_e[key].shape):
            raise ConfigError(f"{where}: {jax.tree_util.keystr(key)} has shape {tuple(value.shape)}, "
                              f"config.json implies {tuple(flat_e[key].shape)}")


def save_pretrained(config: GPTConfig, params: dict, path) -> None:
    """Write config.json + model.safetensors that transformers' GPT2/OpenAIGPT LMHeadModel loads
    (`params` as plain arrays or as the boxes that `GPT(config).init` returns)."""
    params = meta.unbox(params)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(config)
    tensors = {}

    def get(tree_path):
        node = params
        for part in tree_path:
            node = node[part]
        return np.asarray(node, np.float32)

    for name, tree_path in _TOP[hf["model_type"]].items():
        tensors[f"transformer.{name}"] = get(tree_path)
    wte_name = next(name for name, tree_path in _TOP[hf["model_type"]].items() if tree_path[0] == "wte")
    tensors[f"transformer.{wte_name}"] = tensors[f"transformer.{wte_name}"][: config.vocab_size]  # padded rows off
    for name, tree_path in _LAYER.items():
        stacked = get(("h", *tree_path))
        for i in range(config.n_layer):
            tensors[f"transformer.h.{i}.{name}"] = np.ascontiguousarray(stacked[i])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf, indent=2))
