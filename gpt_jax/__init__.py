"""gpt_jax: GPT-1 and GPT-2 in JAX/Flax — pretrain, fine-tune and sample on CPU, GPU and TPU."""

from gpt_jax.config import Config, ConfigError, GPTConfig, load_config
from gpt_jax.generate import GenerateError, clear_decode_cache, generate
from gpt_jax.model import GPT, GPTOutput, init_cache, init_params, lm_loss, param_count
from gpt_jax.pretrained import load_pretrained, save_pretrained
from gpt_jax.tokenizer import load_tokenizer

__all__ = [
    "Config", "ConfigError", "GPT", "GPTConfig", "GPTOutput", "GenerateError", "clear_decode_cache",
    "generate", "init_cache", "init_params", "lm_loss",
    "load_config", "load_pretrained", "load_tokenizer", "param_count", "save_pretrained",
]
