import dataclasses
import pytest
import yaml

from gpt_jax.config import PRESETS, ConfigError, GPTConfig, load_config, save_config
from gpt_jax.model import param_count

# Published parameter counts (tied embeddings): GPT-2 paper / HF model cards; GPT-1 from OpenAI's checkpoint.
PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
             "gpt2-xl": 1_557_611_200, "gpt1": 116_534_784}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    assert param_count(GPTConfig.preset(name)) == PUBLISHED[name]


def test_preset_overrides_and_replace():
    cfg = GPTConfig.preset("gpt2", n_layer=6, dtype="bfloat16")
    assert (cfg.n_layer, cfg.n_embd, cfg.dtype) == (6, 768, "bfloat16")
    assert dataclasses.replace(cfg, n_head=8).head_dim == 96
    assert GPTConfig.preset("gpt1").norm == "post" and GPTConfig.preset("gpt1").n_positions == 512
    assert set(PRESETS) >= {"gpt1", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny"}


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_with_preset_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: gpt2-tiny\n  n_layer: 3\noptim:\n  lr: 3e-4\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["model.n_layer=6", "optim.lr=1e-3", "train.out_dir=runs/x", "model.dtype=bfloat16"])
    assert cfg.model.n_layer == 6 and cfg.model.n_embd == 64 and cfg.model.dtype == "bfloat16"
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.train.out_dir == "runs/x"
    # "3e-4" is a string to YAML; float fields accept it.
    assert load_config(path).optim.lr == 3e-4
    # The resolved config round-trips through YAML.
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_model_shorthand_and_override_on_it(tmp_path):
    cfg = load_config(write(tmp_path, "model: gpt2-tiny\n"), ["model.n_head=2"])
    assert cfg.model.n_head == 2 and cfg.model.n_embd == 64


@pytest.mark.parametrize("overrides, words", [
    (["model.n_layr=3"], ["model.n_layr", "did you mean 'n_layer'"]),
    (["optim.learning_rate=1e-3"], ["optim.learning_rate", "valid keys"]),
    (["trian.steps=3"], ["trian", "did you mean 'train'"]),
    (["model.n_layer=six"], ["model.n_layer", "expected int", "'six'"]),
    (["model.n_layer=2.5"], ["model.n_layer", "expected int", "2.5"]),
    (["train.steps=true"], ["train.steps", "expected int", "True"]),
    (["model.scan_layers=1"], ["model.scan_layers", "expected bool"]),
    (["model.norm=middle"], ["model.norm", "one of 'pre', 'post'", "'middle'"]),
    (["model.preset=gpt3"], ["unknown preset 'gpt3'", "gpt2"]),
    (["model.n_embd=100", "model.n_head=3"], ["not divisible", "n_head"]),
    (["model.resid_pdrop=1.5"], ["resid_pdrop", "[0, 1)"]),
    (["model.n_layer"], ["section.key=value"]),
    (["train.wandb=gpt"], ["unknown config key train.wandb", "did you mean 'wandb_name'"]),
    (["train.wandb_project=[a]"], ["train.wandb_project", "expected str or null", "['a']"]),
    (["train.wandb_project=''"], ["train.wandb_project is empty"]),
    (["train.wandb_name=first"], ["train.wandb_name", "set train.wandb_project too"]),
])
def test_bad_config_errors_name_the_problem(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model: gpt2-tiny\n"), overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))



def test_shipped_configs_load():
    from conftest import ROOT

    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"quickstart.yaml", "shakespeare_char_cpu.yaml", "shakespeare_char.yaml",
                                       "gpt2_124m.yaml"}
    for path in paths:
        head = path.read_text().split("\n", 2)
        assert head[0].startswith("#") and "python train.py --config" in path.read_text()[:400] or \
            path.name == "quickstart.yaml", f"{path.name} must open with the command that runs it"
        load_config(path)


@pytest.mark.parametrize("override, words", [
    ("train.steps=0", ["train.steps must be >= 1, got 0"]),
    ("train.steps=-5", ["train.steps must be >= 1, got -5"]),
    ("train.batch_size=0", ["train.batch_size must be >= 1"]),
    ("train.eval_every=0", ["train.eval_every must be >= 1"]),
    ("train.save_every=0", ["train.save_every must be >= 1"]),
    ("train.log_every=0", ["train.log_every must be >= 1"]),
    ("train.keep_checkpoints=0", ["train.keep_checkpoints must be >= 1"]),
    ("optim.grad_accum=0", ["optim.grad_accum must be >= 1"]),
    ("optim.lr=-1e-3", ["optim.lr must be > 0, got -0.001"]),
    ("optim.lr=0", ["optim.lr must be > 0"]),
    ("optim.beta2=1.0", ["optim.beta2 must be in [0, 1), got 1.0"]),
    ("optim.min_lr=0.1", ["optim.min_lr=0.1 is above optim.lr", "optim.min_lr <="]),
    ("model.attn_pdrop=-0.1", ["model.attn_pdrop must be in [0, 1)"]),
    ("model.layer_norm_epsilon=0", ["model.layer_norm_epsilon must be > 0"]),
    ("data.val_fraction=0", ["data.val_fraction must be in (0, 1), got 0"]),
    ("data.num_proc=0", ["data.num_proc must be in [1, 1024], got 0"]),
    ("data.num_proc=100000", ["data.num_proc must be in [1, 1024], got 100000"]),
    ("data.text_field=", ["data.text_field is empty; name the Parquet column or JSONL key that holds the text"]),
    ("data.text_field=3", ["data.text_field: expected str, got 3 (int)"]),
    ("parallel.data=0", ["parallel.data must be >= 1 (or -1), got 0"]),
    ("finetune.epochs=0", ["finetune.epochs must be >= 1"]),
    ("finetune.warmup_fraction=1", ["finetune.warmup_fraction must be in [0, 1)"]),
    ("train.seed=2147483648", ["train.seed must be in [0, 2147483647]"]),  # jax.random.key's 32 bits
    ("train.sample_tokens=1099511627776", ["train.sample_tokens must be in [0, 1000000]"]),  # generate's int32
    ("train.sample_temperature=.nan", ["train.sample_temperature must be in [0, 100], got nan"]),
])
def test_out_of_range_settings_name_key_value_and_range(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_range_edges_are_accepted():
    cfg = load_config(None, ["train.steps=1", "optim.warmup_steps=0", "optim.grad_clip=0", "parallel.data=-1",
                             "model.resid_pdrop=0", "train.sample_tokens=0", "optim.schedule=constant", "optim.lr=1e-6"])
    assert (cfg.train.steps, cfg.parallel.data, cfg.optim.lr) == (1, -1, 1e-6)
    assert (cfg.data.num_proc, cfg.data.text_field) == (None, "text")  # None: every CPU
    assert load_config(None, ["data.num_proc=1", "data.text_field=content"]).data.num_proc == 1


def test_every_numeric_setting_has_a_range():
    """A new int or float setting must get an entry in RANGES (so it is checked at load)."""
    import typing

    from gpt_jax.config import RANGES, Config

    missing = []
    for section, cls in typing.get_type_hints(Config).items():
        if not dataclasses.is_dataclass(cls):
            continue
        for name, tp in typing.get_type_hints(cls).items():
            if {int, float} & {tp, *typing.get_args(tp)} and name not in RANGES.get(section, {}):
                missing.append(f"{section}.{name}")
    assert not missing, f"settings without a range in config.RANGES: {missing}"


def test_out_dir_must_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        load_config(None, [f"train.out_dir={tmp_path / 'file'}"])
    with pytest.raises(ConfigError, match="which is a file"):
        load_config(None, [f"train.out_dir={tmp_path / 'file' / 'run'}"])
    assert load_config(None, [f"train.out_dir={tmp_path / 'new' / 'run'}"]).train.out_dir.endswith("run")


def test_saved_run_config_without_vocab_padding_loads_unpadded(tmp_path):
    """A run directory written before `pad_vocab_multiple` existed holds unpadded parameters."""
    values = load_config(overrides=["model.preset=gpt2-tiny"]).to_dict()
    del values["model"]["pad_vocab_multiple"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    assert load_config(path, saved_run=True).model.pad_vocab_multiple == 1
    assert load_config(path).model.pad_vocab_multiple == 128  # a new run's default
    values["model"]["pad_vocab_multiple"] = 64
    path.write_text(yaml.safe_dump(values))
    assert load_config(path, saved_run=True).model.pad_vocab_multiple == 64


def test_the_tokenizer_sets_or_bounds_the_model_vocabulary():
    """A vocabulary built from the corpus (char, sentencepiece) sets model.vocab_size; a fixed one (GPT-2,
    GPT-1 BPE) must fit in it, equal or padded larger, or the run stops with a line naming the fix."""
    from types import SimpleNamespace

    from gpt_jax.runs import resolve_vocab

    def vocab(kind, size, model_size):
        config = load_config(None, ["model.preset=gpt2-tiny", f"model.vocab_size={model_size}"])
        return resolve_vocab(config, SimpleNamespace(kind=kind, vocab_size=size)).model.vocab_size

    assert vocab("char", 40, 50257) == 40 and vocab("sentencepiece", 300, 256) == 300 and vocab("char", 40, 40) == 40
    assert vocab("gpt2", 50257, 50304) == 50304 and vocab("gpt2", 50257, 50257) == 50257
    with pytest.raises(ConfigError, match=r"model.vocab_size=1000 is smaller than the gpt2 tokenizer's 50257 ids; "
                                          r"set model.vocab_size >= 50257"):
        vocab("gpt2", 50257, 1000)
