"""A run directory's contents for the code that uses them: its data, its config, tokenizer and
parameters, and samples from them.

`prepare_data` tokenizes a run's corpus (process 0 first, the others then find it in the cache);
`resolve_vocab` sizes the model's vocabulary to the tokenizer; `restore_params` / `load_run` read a
run's best, last or kept checkpoint on one device, whatever strategy saved it; `load_for_sampling`
takes a run directory, a Hugging Face directory or a model name; `sample_text` is the sample a run
prints at each evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from gpt_jax.checkpoint import Checkpointer
from gpt_jax.config import Config, ConfigError, load_config
from gpt_jax.data import prepare
from gpt_jax.distributed import barrier
from gpt_jax.generate import clear_decode_cache, generate
from gpt_jax.hub import local_path
from gpt_jax.pretrained import load_pretrained
from gpt_jax.tokenizer import load_tokenizer


def resolve_vocab(config: Config, tokenizer) -> Config:
    m = config.model
    if tokenizer.kind in ("char", "sentencepiece") and m.vocab_size != tokenizer.vocab_size:
        # A vocabulary built from the corpus sets the model's size.
        return dataclasses.replace(config, model=dataclasses.replace(m, vocab_size=tokenizer.vocab_size))
    if m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the {tokenizer.kind} tokenizer's "
                          f"{tokenizer.vocab_size} ids; set model.vocab_size >= {tokenizer.vocab_size}")
    return config


def prepare_data(config: Config, verbose: bool = True):
    """Process 0 prepares the token files; the others then find them in a shared cache (or prepare
    their own copy)."""
    main = jax.process_index() == 0
    if main:
        data = prepare(config.data, verbose=verbose)
    barrier("gpt_jax: data prepared")
    return data if main else prepare(config.data, verbose=False)


def restore_params(run_dir, which: str = "best", step: int | None = None):
    """The parameters of a run's best (or last, or given `step`'s) checkpoint on one device, whatever
    strategy saved them: the shapes come from the checkpoint's own metadata, so no optimizer is rebuilt."""
    ckpt = Checkpointer(run_dir, read_only=True)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(manager, at):
        tree = ocp.StandardCheckpointHandler().metadata(manager.directory / str(at) / "state")
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), dict(tree))

    try:
        if step is not None:
            if step not in ckpt.steps():
                raise ConfigError(f"{run_dir} has no checkpoint at step {step}; its checkpoints are at steps "
                                  f"{ckpt.steps()} (train.keep_every keeps more)")
            return ckpt.restore_step(abstract(ckpt.last, step), step)[0]["params"]
        for manager in (ckpt.best, ckpt.last) if which == "best" else (ckpt.last,):
            if not manager.all_steps():
                continue
            restored = ckpt.restore_latest(abstract(manager, max(manager.all_steps())), manager)
            if restored is not None:
                return restored[0]["params"]
    finally:
        ckpt.close()
    raise ConfigError(f"{run_dir} has no checkpoint that restores")


def load_run(run_dir, which: str = "best", step: int | None = None):
    """(Config, params, tokenizer) of a training run directory: the best checkpoint, the last, or the
    one at `step`. For a fine-tuning run, the language model (with its 3 special-token rows) without
    the head."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "tokenizer.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a training run: {name} is missing")
    config = load_config(run_dir / "config.yaml", saved_run=True)
    tokenizer = load_tokenizer(json.loads((run_dir / "tokenizer.json").read_text()))
    params = restore_params(run_dir, which, step)
    return config, params["gpt"] if config.mode == "finetune" else params, tokenizer


def sample_text(config: Config, params, tokenizer, prompt: str, n_tokens: int, seed: int = 0,
                temperature: float = 0.8, top_k: int | None = 200) -> str:
    """A sample continuation of `prompt` from the current parameters."""
    ids = tokenizer.encode(prompt) or ([tokenizer.eot_id] if tokenizer.eot_id is not None else [0])
    n_tokens = min(n_tokens, config.model.n_positions - len(ids))
    try:
        out, _ = generate(config.model, params, [ids], n_tokens, temperature=temperature,
                          top_k=min(top_k or 0, config.model.vocab_size), rng=seed)
    finally:
        clear_decode_cache()  # the next step replaces these params: free generate's copy of them now
    return prompt + tokenizer.decode(out[0])


def load_for_sampling(checkpoint: str, tokenizer_path: str | None = None, step: int | None = None):
    """(GPTConfig, params, tokenizer) from a run directory (its best checkpoint, or the one at `step`),
    a Hugging Face checkpoint directory, or a model name from the Hugging Face cache (`gpt_jax.hub`)."""
    path = local_path(checkpoint)
    if (path / "config.json").is_file():
        if step is not None:
            raise ConfigError(f"--step picks a checkpoint of a training run directory; {checkpoint} is a Hugging "
                              "Face checkpoint with one set of weights")
        config, params = load_pretrained(path)
        if tokenizer_path:
            tok = load_tokenizer(tokenizer_path)
        elif (path / "vocab.json").is_file() or (path / "encoder.json").is_file():
            tok = load_tokenizer(path)
        else:
            tok = load_tokenizer("gpt2" if config.norm == "pre" else "gpt1")
        return config, params, tok
    config, params, tok = load_run(path, step=step)
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
    return config.model, params, tok
