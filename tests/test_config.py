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
