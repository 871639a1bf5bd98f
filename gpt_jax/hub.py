"""GPT-2 and GPT-1 by name: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `openai-gpt` (or their
`openai-community/...` ids), found in the local Hugging Face hub cache.

The cache is the one `transformers` and `huggingface_hub` fill: `$HF_HUB_CACHE`, else `$HF_HOME/hub`,
else `~/.cache/huggingface/hub`, holding `models--<org>--<name>/refs/main` (a revision) and
`snapshots/<revision>/` (the files). A name that is not cached is downloaded with `huggingface_hub`
when it is installed (`pip install 'gpt_jax[hub]'`) and the network answers; otherwise the error
says where it looked and how to get the files.
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt_jax.config import ConfigError

MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-gpt")}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER = ("vocab.json", "merges.txt")
_DOWNLOAD = ["config.json", "model.safetensors", *TOKENIZER]


class HubError(ConfigError):
    """A model name that is neither cached nor downloadable."""


def repo_id(name) -> str | None:
    """The hub id of a known model name (`gpt2`, `openai-community/gpt2`, ...), else None."""
    name = str(name)
    if name in MODELS:
        return MODELS[name]
    return name if name in MODELS.values() else None


def cache_dirs() -> list[Path]:
    """Where the hub cache may be, in the order huggingface_hub itself looks."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _has(snapshot: Path, what: str) -> bool:
    if what == "tokenizer":
        return all((snapshot / f).is_file() for f in TOKENIZER)
    return (snapshot / "config.json").is_file() and any((snapshot / f).is_file() for f in WEIGHTS)


def cached(repo: str, what: str = "model") -> Path | None:
    """The cached snapshot of `repo` that holds a model (config + weights) or a tokenizer, if any.
    Older downloads of the short names sit under `models--gpt2` rather than `models--openai-community--gpt2`."""
    names = [repo, repo.split("/")[-1]]
    for root in cache_dirs():
        for name in names:
            folder = root / ("models--" + name.replace("/", "--"))
            ref = folder / "refs" / "main"
            if ref.is_file():
                snapshot = folder / "snapshots" / ref.read_text().strip()
                if _has(snapshot, what):
                    return snapshot
    return None


def _download(repo: str, what: str) -> Path:
    import huggingface_hub

    files = list(TOKENIZER) if what == "tokenizer" else _DOWNLOAD
    return Path(huggingface_hub.snapshot_download(repo, allow_patterns=files))


def snapshot(name, what: str = "model") -> Path:
    """The local folder of a known model name: the cached snapshot, or a fresh download."""
    repo = repo_id(name)
    if repo is None:
        raise HubError(f"{name!r} is not a known model name; expected one of {sorted(MODELS)} or a directory")
    found = cached(repo, what)
    if found is not None:
        return found
    files = "vocab.json + merges.txt" if what == "tokenizer" else "config.json + model.safetensors"
    looked = ", ".join(str(d) for d in cache_dirs())
    try:
        folder = _download(repo, what)
    except ImportError:
        why = "huggingface_hub is not installed (pip install 'gpt_jax[hub]' downloads it on first use)"
    except Exception as e:  # network down, offline mode, no such file on the hub: all end the same way
        why = f"downloading it failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'})"
    else:
        if _has(folder, what):
            return folder
        why = f"the download in {folder} has no {files}"
    wanted = " ".join(TOKENIZER if what == "tokenizer" else _DOWNLOAD)
    raise HubError(f"{name}: no {files} in the Hugging Face cache (looked in {looked}) and {why}; get them "
                   f"with `hf download {repo} {wanted}`, or pass a directory that holds them")


def local_path(name_or_path, what: str = "model") -> Path:
    """A path as it is; a known model name that is not an existing path, as its snapshot folder."""
    path = Path(name_or_path)
    if path.exists() or repo_id(name_or_path) is None:
        return path
    return snapshot(name_or_path, what)
