"""Corpus -> token .bin files + manifest, and a deterministic, resumable, per-process batch sampler.

`prepare(data_config)` resolves the source (`gpt_jax.corpora`: text files, a directory, a glob, a URL,
the built-in `python-stdlib` corpus, Parquet and JSONL records), puts its text in the `normalize` form
(`gpt_jax.normalize`), splits it into train / val by bytes (the last `val_fraction` is val, as nanoGPT
does), tokenizes it and writes `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32)
with `manifest.json`. The result is cached under `cache_dir` by a key over the source contents, the
normalisation, the tokenizer (and `text_field` for record files), so a second run reuses it. A source
of llm.c token shards is not tokenized again: its shards are read in place (`gpt_jax.shards`).

Tokenizing (`gpt_jax.tokenizing`) runs in `data.num_proc` processes (default: every CPU) and gives the
tokens of one process; a preparation cut off half-way goes on from the last piece it wrote. Only a
folder renamed to its final name with `manifest.json` in it is ever read as a cache.

`Sampler` cuts a token stream into windows of `block_size + 1` tokens; which windows make batch k
is a function of (seed, epoch, cursor) alone, windows are drawn without replacement within an
epoch, and each process reads only its own rows of every global batch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_jax import corpora, shards, tokenizing
from gpt_jax.config import RANGES, DataConfig
from gpt_jax.corpora import DataError, TextFile, read_text, resolve_source, stdlib_files  # noqa: F401 (public here)
from gpt_jax.errors import ArgumentParser, entry_point, number
from gpt_jax.normalize import NORMALIZERS
from gpt_jax.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer

FORMAT_VERSION = 1


def _build_tokenizer(cfg: DataConfig, files: list[Path], out: Path):
    if cfg.tokenizer == "char":
        chars: set[str] = set()
        for f in files:
            for chunk in corpora.text_chunks(f):
                chars.update(chunk)
        tok = CharTokenizer(chars)
        (out / "tokenizer.json").write_text(json.dumps(tok.spec()))
        return tok
    if cfg.tokenizer == "sentencepiece" and cfg.tokenizer_path is None:  # trained on the source files
        return SentencePieceTokenizer.train(files, out / "tokenizer", vocab_size=cfg.sentencepiece_vocab_size)
    return load_tokenizer(cfg.tokenizer, cfg.tokenizer_path)


@dataclass
class PreparedData:
    dir: Path
    tokenizer: object
    manifest: dict

    def tokens(self, split: str):
        """The split's tokens, read in place: a read-only memory map of train.bin / val.bin, or for llm.c
        shards a `shards.TokenStream` over theirs."""
        if self.manifest.get("format") == "llmc":
            return shards.split_tokens(self.manifest["splits"][split])
        return np.memmap(self.dir / f"{split}.bin", dtype=self.manifest["dtype"], mode="r")


def _cache_key(cfg: DataConfig, files: list[Path], hashes: list[str]) -> str:
    spec = {"version": FORMAT_VERSION, "tokenizer": cfg.tokenizer, "tokenizer_path": cfg.tokenizer_path,
            "sp_vocab": cfg.sentencepiece_vocab_size if cfg.tokenizer == "sentencepiece" else None,
            "normalize": cfg.normalize,
            "val_fraction": cfg.val_fraction, "files": [[f.name, h] for f, h in zip(files, hashes)]}
    if any(corpora.is_records(f) for f in files):  # a key of its own only here: text corpora keep their old keys
        spec["text_field"] = cfg.text_field
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_shards(cfg: DataConfig, files: list[Path]) -> PreparedData:
    """llm.c shards as they are: headers checked each time, the token range once while they are unchanged."""
    if cfg.tokenizer != "gpt2":
        raise DataError(f"data.source {cfg.source!r} holds llm.c token shards, which are GPT-2 tokens; set "
                        "data.tokenizer=gpt2")
    tok = load_tokenizer("gpt2", cfg.tokenizer_path)
    found = [shards.read_header(f) for f in files]
    spec = {"version": FORMAT_VERSION, "format": "llmc", "val_fraction": cfg.val_fraction,
            "tokenizer": tok.spec(), "shards": shards.fingerprint(found)}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    out = Path(cfg.cache_dir) / f"{re.sub(r'_(train|val)(_.*)?$', '', files[0].stem)}-llmc-{key}"
    if (out / "manifest.json").is_file():
        return PreparedData(out, tok, json.loads((out / "manifest.json").read_text()))
    shards.check_gpt2_range(found, tok.vocab_size)
    splits = shards.splits(found, cfg.val_fraction)
    manifest = {**spec, "source": cfg.source, "vocab_size": tok.vocab_size,
                "dtype": np.result_type(*(shards.DTYPES[s.version] for s in found)).name, "splits": splits,
                **{f"{s}_tokens": splits[s]["stop"] - splits[s]["start"] for s in ("train", "val")}}
    out.mkdir(parents=True, exist_ok=True)
    tokenizing.write_json(out / "manifest.json", manifest)
    return PreparedData(out, tok, manifest)


def _texts(cfg: DataConfig, files: list[Path], tmp: Path, state: dict, verbose: bool) -> list[TextFile]:
    if not state.get("texts"):
        shutil.rmtree(tmp / "texts", ignore_errors=True)  # copies cut off half-way
    texts = corpora.text_files(files, cfg.normalize, cfg.text_field, tmp / "texts", verbose,
                               made=state.get("texts", False))
    state["texts"] = True
    tokenizing.save_state(tmp, state)
    return texts


def _tokenizer(cfg: DataConfig, texts: list[TextFile], tmp: Path, state: dict):
    if "tokenizer" in state:
        return load_tokenizer(state["tokenizer"])
    tok = _build_tokenizer(cfg, [t.path for t in texts], tmp)
    state["tokenizer"] = tok.spec()
    tokenizing.save_state(tmp, state)
    return tok


def prepare(cfg: DataConfig, verbose: bool = True) -> PreparedData:
    """Tokenize `cfg.source` into cached train.bin / val.bin (+ manifest.json); reuse a matching cache,
    and go on with an unfinished one."""
    cache_dir = Path(cfg.cache_dir)
    files = resolve_source(cfg.source, cache_dir)
    if shards.is_shard_source(files):
        return _prepare_shards(cfg, files)
    hashes = [corpora.file_sha256(f) for f in files]
    name = "python-stdlib" if cfg.source == "python-stdlib" else Path(files[0]).stem
    out = cache_dir / f"{name}-{cfg.tokenizer}-{_cache_key(cfg, files, hashes)}"
    if (out / "manifest.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        tok = load_tokenizer(manifest["tokenizer"])
        return PreparedData(out, tok, manifest)

    tmp = out.with_name(out.name + ".tmp")
    state = tokenizing.resume_state(tmp, verbose)
    try:
        texts = _texts(cfg, files, tmp, state, verbose)
        tok = _tokenizer(cfg, texts, tmp, state)
        counts = tokenizing.tokenize(texts, tok, cfg.val_fraction, cfg.num_proc, tmp, state, f"tokenizing {name}",
                                     verbose)
    except DataError as e:
        if not isinstance(e, tokenizing.ProcessesLost):  # the same input would fail again: nothing is worth keeping
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp / "texts", ignore_errors=True)
    for record in (tokenizing.PROGRESS, tokenizing.DONE):
        (tmp / record).unlink(missing_ok=True)
    if counts["train"] == 0 or counts["val"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"data.source {cfg.source!r} gave {counts['train']} train and {counts['val']} val tokens; "
                        "it needs text in both splits (use more text or another data.val_fraction)")
    if tok.kind == "sentencepiece" and cfg.tokenizer_path is None:
        spec = {"kind": "sentencepiece", "path": str((out / "tokenizer.model").resolve())}
    else:
        spec = tok.spec()
    manifest = {"version": FORMAT_VERSION, "source": cfg.source, "normalize": cfg.normalize, "tokenizer": spec,
                "vocab_size": tok.vocab_size,
                "dtype": tokenizing.dtype_for(tok).name, "train_tokens": counts["train"], "val_tokens": counts["val"],
                "files": [{"path": str(f), "sha256": h, "bytes": f.stat().st_size} for f, h in zip(files, hashes)]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if spec["kind"] == "sentencepiece" and cfg.tokenizer_path is None:
        tok = load_tokenizer(spec)
    return PreparedData(out, tok, manifest)


def _whole_windows(n_tokens: int, block_size: int) -> int:
    """Windows of `block_size + 1` tokens that `n_tokens` hold from every epoch offset (the sampler
    starts each epoch 0 to `block_size` tokens in; `block_size` in is the fewest)."""
    return (n_tokens - block_size) // (block_size + 1)


def check_windows(tokens: np.ndarray, block_size: int, batch_size: int, split: str = "train") -> None:
    """A DataError unless `tokens` make one batch of windows of `block_size + 1` tokens from any
    epoch offset."""
    if _whole_windows(len(tokens), block_size) < batch_size:
        fix = "raise data.val_fraction" if split == "val" else "use more text"
        raise DataError(f"the {split} split ({len(tokens):,} tokens) is smaller than one batch of {batch_size} windows "
                        f"of {block_size + 1} tokens; {fix}, or lower train.batch_size or model.n_positions")


def check_batches(data: PreparedData, block_size: int, batch_size: int) -> None:
    """Both splits of `data` hold a batch (checked before a run directory is touched)."""
    for split in ("train", "val"):
        check_windows(data.tokens(split), block_size, batch_size, split)


class Sampler:
    """Deterministic batches of windows; the state is (epoch, cursor), saved in checkpoints.

    The stream is cut into windows of `block_size + 1` tokens at an offset drawn per epoch; each
    epoch visits every window once in an order drawn from (seed, epoch). Global batch k holds the
    windows at positions [cursor, cursor + batch_size) of that order; process p of P reads rows
    [p * batch_size / P, (p + 1) * batch_size / P) of it.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, epoch: int = 0, cursor: int = 0):
        if batch_size % process_count:
            raise DataError(f"global batch {batch_size} does not divide across {process_count} processes")
        self.tokens, self.T, self.B, self.seed = tokens, block_size, batch_size, seed
        self.rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)
        check_windows(tokens, block_size, batch_size)
        self.epoch, self.cursor = epoch, cursor
        self._order_epoch, self._order, self._offset = None, None, 0

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._offset = int(rng.integers(0, self.T + 1))
            n = (len(self.tokens) - self._offset) // (self.T + 1)  # whole windows of T + 1 tokens
            self._order, self._order_epoch = rng.permutation(n), self.epoch
        return self._order

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def next(self) -> np.ndarray:
        """This process's rows of the next global batch: int32 [B_local, block_size + 1]."""
        order = self._epoch_order()
        if self.cursor + self.B > len(order):
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._epoch_order()
        starts = self._offset + order[self.cursor: self.cursor + self.B][self.rows] * (self.T + 1)
        self.cursor += self.B
        return np.stack([self.tokens[s: s + self.T + 1] for s in starts]).astype(np.int32)


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int = 1234,
                 process_index: int = 0, process_count: int = 1) -> list[np.ndarray]:
    """A fixed set of validation batches (the same every evaluation and every run): `n_batches`, or
    as many as one epoch holds, so no token is read twice."""
    check_windows(tokens, block_size, batch_size, "val")
    sampler = Sampler(tokens, block_size, batch_size, seed, process_index, process_count)
    return [sampler.next() for _ in range(min(n_batches, _whole_windows(len(tokens), block_size) // batch_size))]


def _write_llmc(prepared: PreparedData, out_dir: str | None) -> list[Path]:
    if prepared.manifest["tokenizer"]["kind"] != "gpt2":
        raise DataError("--format llmc writes GPT-2 tokens, which llm.c trains on; prepare with --tokenizer gpt2")
    name = re.sub(r"-gpt2-[0-9a-f]{16}$", "", prepared.dir.name)
    target = Path(out_dir) if out_dir else prepared.dir.with_name(prepared.dir.name + "-llmc")
    return shards.write_shards({s: prepared.tokens(s) for s in ("train", "val")}, target, name)


@entry_point
def main(argv=None) -> int:
    """python -m gpt_jax.data SOURCE [--tokenizer KIND] [--tokenizer-path P] [--normalize none|sst] [--cache-dir D]
    [--text-field F] [--num-proc N] [--format bin|llmc] [--out-dir D]"""
    parser = ArgumentParser(description="Tokenize a corpus into cached train.bin / val.bin files.")
    parser.add_argument("source", help="text file, directory, glob, URL, python-stdlib, .parquet / .jsonl(.gz|.zst) "
                                       "records, or llm.c .bin shards")
    parser.add_argument("--tokenizer", default="char", choices=["char", "gpt2", "gpt1", "sentencepiece"])
    parser.add_argument("--tokenizer-path", default=None)
    parser.add_argument("--normalize", default="none", choices=NORMALIZERS, help="the text's form (gpt_jax.normalize)")
    parser.add_argument("--val-fraction", type=number(RANGES["data"]["val_fraction"], float), default=0.1)
    parser.add_argument("--text-field", default="text", help="the Parquet column / JSONL key of the text")
    parser.add_argument("--num-proc", type=number(RANGES["data"]["num_proc"]), default=None, help="processes that tokenize (default: every CPU)")
    parser.add_argument("--cache-dir", default="data_cache")
    parser.add_argument("--format", default="bin", choices=["bin", "llmc"],
                        help="llmc: also write llm.c shards of the tokens (GPT-2 tokens only)")
    parser.add_argument("--out-dir", default=None, help="where --format llmc writes (default: beside the cache entry)")
    args = parser.parse_args(argv)
    prepared = prepare(DataConfig(source=args.source, tokenizer=args.tokenizer, tokenizer_path=args.tokenizer_path,
                                  normalize=args.normalize, val_fraction=args.val_fraction, text_field=args.text_field,
                                  num_proc=args.num_proc, cache_dir=args.cache_dir))
    m = prepared.manifest
    print(f"{m['train_tokens']:,} train / {m['val_tokens']:,} val tokens ({m['dtype']}) in {prepared.dir}")
    if args.format == "llmc":
        written = _write_llmc(prepared, args.out_dir)
        print(f"{len(written)} llm.c shard(s) in {written[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
