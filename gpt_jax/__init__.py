"""gpt_jax: GPT-1 and GPT-2 in JAX/Flax — pretrain, fine-tune and sample on CPU, GPU and TPU.

The package in layers, top to bottom. A module imports from its own layer or the ones below it, never
from above and never in a circle, and never another module's _private names (tests/test_layers.py
reads this table and checks every import, those inside functions included):

    commands  trainer (train.py), aot, sample, predict, evaluate, bench   thin mains: parse, call, print
    tasks     pretrain, finetune, zeroshot, hellaswag  what the loop trains on; the zero-shot benchmarks
    loop      loop                      state, steps, checkpoints, resume, signals, logging: no task
    runs      runs                      a run directory's data, config, tokenizer, params and samples
    services  data, corpora, tokenizing, shards, records, optim, parallel, checkpoint, runlog, generate,
              flops, pretrained, scoring, targets
    model     model, attention                              linen modules and kernels by platform
    base      config, errors, normalize, tokenizer, hub, rundir, distributed
"""

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
