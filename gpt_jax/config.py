"""Typed run configuration: dataclasses, model presets, YAML loading, dotted overrides.

A run config is one YAML file mapped onto `Config` (sections `model`, `data`, `optim`, `train`,
`parallel`). Every key is checked: an unknown key names itself and the closest valid key, a wrong
type names the key, the expected type and the value given, and every number must lie in its range
in `RANGES`. Nothing is compiled before this passes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from gpt_jax.errors import in_range, range_text


class ConfigError(ValueError):
    """A config key, value or file is wrong; the message says which and what would be right."""


Activation = Literal["gelu_tanh", "gelu", "relu", "silu"]

# Sampling settings (gpt_jax.generate, the sample command, train.sample_*) and seeds reach compiled programs
# as int32 / float32 values (jax.random.key takes 32 bits), so they are bounded above as well.
MAX_NEW_TOKENS = 1_000_000
SAMPLING_RANGES = {"max_new_tokens": f"[1, {MAX_NEW_TOKENS}]", "temperature": "[0, 100]", "top_k": "[0, 1000000]",
                   "top_p": "(0, 1]"}
SEED_RANGE = "[0, 2147483647]"

# The valid range of every numeric setting: "[a, b)" intervals (inf for no bound), "or" for a special
# value. A section checks its own when it is built, before any cross-key check; None values are unset.
RANGES = {
    "model": {"vocab_size": "[1, inf)", "n_positions": "[1, inf)", "n_embd": "[1, inf)", "n_layer": "[1, inf)",
              "n_head": "[1, inf)", "n_inner": "[1, inf)", "layer_norm_epsilon": "(0, inf)",
              "embd_pdrop": "[0, 1)", "attn_pdrop": "[0, 1)", "resid_pdrop": "[0, 1)", "initializer_range": "[0, inf)",
              "pad_vocab_multiple": "[1, inf)"},
    "data": {"sentencepiece_vocab_size": "[1, inf)", "val_fraction": "(0, 1)", "prefetch": "[0, inf)",
             "num_proc": "[1, 1024]"},
    "optim": {"lr": "(0, inf)", "min_lr": "[0, inf)", "warmup_steps": "[0, inf)", "decay_steps": "[1, inf)",
              "weight_decay": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "eps": "(0, inf)",
              "grad_clip": "[0, inf)", "grad_accum": "[1, inf)", "warmup_fraction": "[0, 1)"},
    "train": {"seed": SEED_RANGE, "batch_size": "[1, inf)", "steps": "[1, inf)", "eval_every": "[1, inf)",
              "eval_batches": "[1, inf)", "log_every": "[1, inf)", "save_every": "[1, inf)",
              "keep_checkpoints": "[1, inf)", "keep_every": "[1, inf)", "sample_tokens": f"[0, {MAX_NEW_TOKENS}]",
              "sample_temperature": SAMPLING_RANGES["temperature"], "steps_per_call": "[1, inf)"},
    "parallel": {"data": "[1, inf) or -1", "fsdp": "[1, inf)", "tensor": "[1, inf)", "num_processes": "[1, inf)",
                 "process_id": "[0, inf)"},
    "finetune": {"max_examples": "[1, inf)", "lm_coef": "[0, inf)", "clf_pdrop": "[0, 1)", "dropout": "[0, 1)",
                 "lr": "(0, inf)", "batch_size": "[1, inf)", "epochs": "[1, inf)", "warmup_fraction": "[0, 1)",
                 "weight_decay": "[0, inf)", "max_length": "[4, inf)", "transfer_layers": "[0, inf)"},
}


def _checked(section: str, *checks):
    """Class decorator (under @dataclass): building the section checks RANGES[section], then `checks`
    (functions of the instance that raise ConfigError), then the class's own __post_init__."""
    def wrap(cls):
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self):
            for name, spec in RANGES.get(section, {}).items():
                value = getattr(self, name)
                if value is not None and not in_range(value, spec):
                    raise ConfigError(f"{section}.{name} must be {range_text(spec)}, got {value}")
            for check in checks:
                check(self)
            if own is not None:
                own(self)

        cls.__post_init__ = __post_init__
        return cls

    return wrap


@dataclass(frozen=True)
@_checked("model")
class GPTConfig:
    """Model shape and numerics. GPT-2 is pre-LN with a final LayerNorm; GPT-1 is post-LN without."""

    vocab_size: int = 50257
    n_positions: int = 1024  # context length (block size)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd
    activation: Activation = "gelu_tanh"  # the tanh GELU of the original GPT-1 / GPT-2 code
    norm: Literal["pre", "post"] = "pre"  # "pre": GPT-2, "post": GPT-1
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    initializer_range: float = 0.02
    scan_layers: bool = True  # False unrolls the layer loop (same parameters, slower compile)
    remat: Literal["none", "full", "dots"] = "none"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Attention kernel (gpt_jax/attention.py). auto: einsum on CPU, cuDNN flash on GPU (Pallas Triton
    # for float32), Pallas splash on TPU; or force xla / cudnn / pallas / reference.
    attention: Literal["auto", "xla", "cudnn", "pallas", "reference"] = "auto"
    attention_platform: Optional[Literal["cpu", "gpu", "tpu"]] = None  # the target; None: the backend that runs
    # Embedding rows padded to a multiple of this (padded logits are masked to -inf), so the vocabulary
    # shards over `tensor` and the output matmul has whole tiles. 1 keeps the exact published shapes;
    # run configs default to 128 (see config_from_dict).
    pad_vocab_multiple: int = 1

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"pick n_head among {[h for h in range(1, 65) if self.n_embd % h == 0]}"
            )
        if self.attention == "cudnn" and self.dtype == "float32":
            raise ConfigError("model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN's flash kernel "
                              "takes no float32); set model.dtype=bfloat16, or attention auto / pallas / xla")
        if self.attention == "pallas" and self.attention_platform == "cpu":
            raise ConfigError("model.attention=pallas has no CPU kernel; use attention auto or reference on CPU, "
                              "or set model.attention_platform to gpu / tpu")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding (and logits): vocab_size rounded up to pad_vocab_multiple."""
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}{_suggest(name, PRESETS)}; presets: {sorted(PRESETS)}")
        return _build(cls, {**PRESETS[name], **overrides}, "model")


_GPT1 = dict(vocab_size=40478, n_positions=512, norm="post", embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
_DROP = dict(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)

# Sizes are data: the published GPT-2 family and GPT-1, plus tiny shapes for tests and CPU runs.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **_DROP),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **_DROP),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **_DROP),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **_DROP),
    "gpt1": dict(n_layer=12, n_head=12, n_embd=768, **_GPT1),
    "gpt2-tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64),
    "gpt1-tiny": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64, norm="post"),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65, n_positions=64),  # nanoGPT's CPU baby GPT
}


def _text_field_named(d) -> None:
    if not d.text_field:
        raise ConfigError("data.text_field is empty; name the Parquet column or JSONL key that holds the text "
                          "(default text)")


@dataclass(frozen=True)
@_checked("data", _text_field_named)
class DataConfig:
    # a text file, directory, glob, URL, "python-stdlib", .parquet / .jsonl(.gz|.zst) records or llm.c .bin
    # token shards; or a list of those, read in order as one corpus (gpt_jax/corpora.py, gpt_jax/shards.py)
    source: str | list = "python-stdlib"
    tokenizer: Literal["char", "gpt2", "gpt1", "sentencepiece"] = "char"
    tokenizer_path: Optional[str] = None  # BPE files / sentencepiece model; default: $GPT_JAX_DATA
    sentencepiece_vocab_size: int = 4096
    # The text's form before tokenizing (gpt_jax/normalize.py): none as it is; sst as SST-2's sentences
    # (lowercase, <br /> removed, Penn Treebank tokens: "it 's", "does n't", "great , but", `` quotes '').
    normalize: Literal["none", "sst"] = "none"
    val_fraction: float = 0.1
    text_field: str = "text"  # the Parquet column / JSONL key that holds a record's text
    num_proc: Optional[int] = None  # processes that tokenize a corpus; None: os.cpu_count(). Tokens do not depend on it
    cache_dir: str = "data_cache"
    prefetch: int = 2  # batches a background thread prepares ahead of the step; 0 prepares them in the loop


def _min_lr_below_lr(o) -> None:
    if o.schedule != "constant" and o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}: the {o.schedule} schedule decays "
                          f"from lr to min_lr; set optim.min_lr <= {o.lr}")


@dataclass(frozen=True)
@_checked("optim", _min_lr_below_lr)
class OptimConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    warmup_fraction: Optional[float] = None  # warmup over this fraction of decay_steps instead of warmup_steps
    decay_steps: Optional[int] = None  # None: train.steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables
    grad_accum: int = 1


def _out_dir_usable(t) -> None:
    """train.out_dir is a directory or can become one: not a file, and not under one."""
    path = Path(t.out_dir)
    if not t.out_dir:
        raise ConfigError("train.out_dir is empty; name the run directory, e.g. train.out_dir=runs/NAME")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.out_dir={t.out_dir} is an existing file, not a directory; choose another train.out_dir")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"train.out_dir={t.out_dir} lies under {parent}, which is a file; choose another train.out_dir")


def _keep_every_saved(t) -> None:
    if t.keep_every is not None and t.keep_every % t.save_every:
        raise ConfigError(f"train.keep_every={t.keep_every} is not a multiple of train.save_every={t.save_every}, so "
                          f"those steps may never be saved; set keep_every to a multiple of {t.save_every}")


def _wandb_project_named(t) -> None:
    if t.wandb_project == "":
        raise ConfigError("train.wandb_project is empty; name the Weights & Biases project, or leave it unset")
    if t.wandb_name is not None and t.wandb_project is None:
        raise ConfigError("train.wandb_name names a run of a Weights & Biases project: set train.wandb_project too")


@dataclass(frozen=True)
@_checked("train", _out_dir_usable, _keep_every_saved, _wandb_project_named)
class TrainConfig:
    seed: int = 0
    batch_size: int = 12  # global batch, in sequences per optimizer step
    steps: int = 1000
    eval_every: int = 200
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = 500
    steps_per_call: int = 1  # optimizer steps per dispatch (a lax.scan over stacked batches)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    keep_every: Optional[int] = None  # and, besides them, every checkpoint whose step is a multiple of this
    out_dir: str = "runs/default"
    sample_tokens: int = 0  # >0 prints a sample of this many tokens at each eval
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    # Weights & Biases (pip install -e ".[wandb]"): the project that gets the metrics TensorBoard gets, at the
    # same steps, and the run's display name (default: W&B's). None: no W&B, and nothing of wandb is imported.
    wandb_project: Optional[str] = None
    wandb_name: Optional[str] = None


@dataclass(frozen=True)
@_checked("parallel")
class ParallelConfig:
    strategy: Literal["single", "pmap", "mesh"] = "single"
    data: int = -1  # mesh axis sizes; -1 fills the remaining devices
    fsdp: int = 1
    tensor: int = 1
    # Multi-host (jax.distributed). "auto": initialise when a coordinator address is given (here or
    # in $JAX_COORDINATOR_ADDRESS) or a multi-process SLURM / Open MPI job is detected; "on": always,
    # letting JAX detect the rest (TPU pod slices); "off": never.
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: Optional[str] = None  # host:port of process 0; env JAX_COORDINATOR_ADDRESS
    num_processes: Optional[int] = None  # env JAX_NUM_PROCESSES
    process_id: Optional[int] = None  # env JAX_PROCESS_ID


TASKS = ("classification", "entailment", "similarity", "multiple_choice")


@dataclass(frozen=True)
@_checked("finetune")
class FinetuneConfig:
    """GPT-1-style supervised fine-tuning (`mode: finetune`). Defaults follow the GPT-1 paper."""

    task: Literal["classification", "entailment", "similarity", "multiple_choice"] = "classification"
    train_file: Optional[str] = None  # TSV (with a header row) or JSONL
    dev_file: Optional[str] = None  # accuracy after every epoch; the best checkpoint is kept
    format: Literal["auto", "tsv", "jsonl"] = "auto"  # auto: by file extension
    # role -> column / key. Roles: text, text_b (entailment: premise = text, hypothesis = text_b;
    # similarity: the two texts), choices (multiple choice: a list key, or a list of columns), label.
    fields: dict = field(default_factory=lambda: {"text": "sentence", "label": "label"})
    labels: Optional[list] = None  # the label values in order; None: the sorted values in train_file
    max_examples: Optional[int] = None  # use the first N training examples
    init_from: Optional[str] = None  # a training run directory or a Hugging Face GPT-2 / GPT-1 directory
    reinit: bool = False  # the init_from model's shape and tokenizer, but random weights (a baseline)
    # GPT-1 Figure 2 (left): transfer the embeddings (token, position) and the first N blocks of init_from;
    # blocks N.. are initialised as a random model's would be (reinit, same seed), and so is the final
    # LayerNorm (pre-LN models) unless every block transfers: it normalises the top block's output. None: all.
    transfer_layers: Optional[int] = None
    lm_coef: float = 0.5  # weight of the auxiliary language-modelling loss; 0 turns it off
    clf_pdrop: float = 0.1  # dropout before the linear head
    dropout: Optional[float] = 0.1  # transformer dropout while fine-tuning; None keeps the model's
    lr: float = 6.25e-5
    batch_size: int = 32
    epochs: int = 3
    warmup_fraction: float = 0.002  # linear warmup over this fraction of the steps, then linear decay to 0
    weight_decay: float = 0.01
    max_length: Optional[int] = None  # tokens per sequence, special tokens included; None: the context

    def __post_init__(self):
        if not isinstance(self.fields, dict) or not all(isinstance(k, str) for k in self.fields):
            raise ConfigError(f"finetune.fields must map roles to column names, got {self.fields!r}")
        unknown = set(self.fields) - {"text", "text_b", "choices", "label"}
        if unknown:
            raise ConfigError(f"finetune.fields: unknown role(s) {sorted(unknown)}; roles are text, text_b, "
                              "choices, label")
        if self.transfer_layers is not None and (self.init_from is None or self.reinit):
            raise ConfigError(f"finetune.transfer_layers={self.transfer_layers} transfers blocks of a pretrained model: "
                              "set finetune.init_from (and reinit false), or leave transfer_layers unset")


@dataclass(frozen=True)
class Config:
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mode: Literal["pretrain", "finetune"] = "pretrain"

    def __post_init__(self):
        if self.model.param_dtype != "float32":
            raise ConfigError(f"model.param_dtype={self.model.param_dtype} would keep parameters and AdamW's moments in "
                              f"{self.model.param_dtype} with no float32 master copy; training keeps them in float32: set "
                              "model.param_dtype=float32 and model.dtype=bfloat16 for bf16 compute")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is list:
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}.{key}{_suggest(key, names)}; valid keys: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _section(tp, value, f"{prefix}.{key}" if prefix else key)
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def _section(cls, value, prefix: str):
    if value is None:
        value = {}
    if isinstance(value, str) and cls is GPTConfig:
        value = {"preset": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {value!r}")
    if cls is GPTConfig and "preset" in value:
        value = dict(value)
        name = value.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"{prefix}.preset: unknown preset {name!r}{_suggest(str(name), PRESETS)}; presets: {sorted(PRESETS)}")
        value = {**PRESETS[name], **value}
    return _build(cls, value, prefix)


RUN_PAD_VOCAB_MULTIPLE = 128  # a run config's model.pad_vocab_multiple unless it sets one


def config_from_dict(values: dict) -> Config:
    """A run config from nested dicts; the model's vocabulary is padded to a multiple of 128 unless
    `model.pad_vocab_multiple` says otherwise (GPTConfig itself and its presets keep exact shapes)."""
    values = dict(values or {})
    model = values.get("model")
    model = {"preset": model} if isinstance(model, str) else dict(model or {})
    model.setdefault("pad_vocab_multiple", RUN_PAD_VOCAB_MULTIPLE)
    values["model"] = model
    return _build(Config, values, "")


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. model.n_layer=6)")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if isinstance(child, str) and part == "model":  # `model: gpt2` shorthand
                child = node[part] = {"preset": child}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, saved_run: bool = False) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, validate. `saved_run`: the
    config.yaml of a run directory, where a model without `pad_vocab_multiple` predates padding (1)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; configs live in configs/*.yaml")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections, got {type(values).__name__}")
        if saved_run and isinstance(values.get("model"), dict):
            values["model"].setdefault("pad_vocab_multiple", 1)
    return config_from_dict(apply_overrides(values, list(overrides or [])))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
