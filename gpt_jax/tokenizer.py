"""One tokenizer interface over char-level, GPT-2 byte-level BPE, GPT-1 BPE and sentencepiece.

Every tokenizer has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `eot_id`
(the end-of-text id, or None where the vocabulary has none) and `spec()`, a small dict that
`load_tokenizer(spec)` turns back into the same tokenizer (saved with each run).

BPE files are read from local paths, or from a model's snapshot in the Hugging Face cache when a
model name is given (`gpt_jax.hub`; it downloads only a model that is not cached). GPT-2 BPE runs
on tiktoken built from OpenAI's `encoder.json` + `vocab.bpe` (or HF's identical `vocab.json` +
`merges.txt`).
GPT-1 BPE is written here: it reproduces `transformers`' OpenAIGPTTokenizer as it behaves without
ftfy/spaCy (BERT normalisation + BERT pre-tokenisation + BPE with `</w>` word ends).
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

from gpt_jax.hub import HubError, local_path, snapshot

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or text cannot be encoded."""


def data_dir() -> Optional[Path]:
    """The reference data folder from $GPT_JAX_DATA (e.g. ../shared/data), if set."""
    value = os.environ.get("GPT_JAX_DATA")
    return Path(value) if value else None


class CharTokenizer:
    """One id per distinct character, in sorted order (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        self.chars = sorted(set(chars))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_id = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise TokenizerError("cannot build a char vocabulary from empty text")
        return cls(set(text))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise TokenizerError(f"character {c!r} (U+{ord(c):04X}) is not in this {self.vocab_size}-character "
                                 "vocabulary; use text made of the training corpus's characters") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def spec(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in encoder.json / vocab.bpe."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _find_files(path: Path, pairs: list[tuple[str, str]], what: str) -> tuple[Path, Path]:
    for a, b in pairs:
        if (path / a).is_file() and (path / b).is_file():
            return path / a, path / b
    names = " or ".join(f"{a} + {b}" for a, b in pairs)
    raise TokenizerError(f"{what} files not found in {path}: expected {names}")


class GPT2Tokenizer:
    """OpenAI's GPT-2 byte-level BPE (50,257 ids; <|endoftext|> = 50256), via tiktoken."""

    kind = "gpt2"

    def __init__(self, path):
        import tiktoken

        self.path = Path(path)
        enc_file, merges_file = _find_files(self.path, [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")],
                                            "GPT-2 BPE")
        encoder = json.loads(enc_file.read_text(encoding="utf-8"))
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        try:
            ranks = {bytes(byte_of[c] for c in token): i for token, i in encoder.items() if token != EOT_TEXT}
        except KeyError:
            raise TokenizerError(f"{enc_file} is not a byte-level BPE vocabulary") from None
        merges = [line for line in merges_file.read_text(encoding="utf-8").split("\n")[1:] if line]
        if len(ranks) != 256 + len(merges):
            raise TokenizerError(f"{enc_file} ({len(ranks)} tokens) does not match {merges_file} ({len(merges)} merges)")
        eot = encoder.get(EOT_TEXT, len(ranks))
        self._enc = tiktoken.Encoding(name=f"gpt2:{self.path}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={EOT_TEXT: eot})
        self.vocab_size = self._enc.n_vocab
        self.eot_id = eot

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Encode text; `<|endoftext|>` in the text becomes the special id only with allow_special."""
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"kind": "gpt2", "path": str(self.path.resolve())}


def _is_bert_punct(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def bert_pretokenize(text: str) -> list[str]:
    """BERT's basic tokenisation: clean, split CJK, strip accents, lowercase, split on spaces and punctuation."""
    out = []
    for c in text:
        cp = ord(c)
        if c in " \t\n\r" or unicodedata.category(c) == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(c).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {c} ")
        else:
            out.append(c)
    text = unicodedata.normalize("NFD", "".join(out))
    text = "".join(c for c in text if unicodedata.category(c) != "Mn").lower()
    words = []
    for chunk in text.split():
        word = ""
        for c in chunk:
            if _is_bert_punct(c):
                if word:
                    words.append(word)
                words.append(c)
                word = ""
            else:
                word += c
        if word:
            words.append(word)
    return words


class GPT1Tokenizer:
    """GPT-1's 40k lower-cased BPE with `</w>` word ends (40,478 ids, no end-of-text token)."""

    kind = "gpt1"

    def __init__(self, path):
        self.path = Path(path)
        enc_file, merges_file = _find_files(self.path, [("encoder_bpe_40000.json", "vocab_40000.bpe"),
                                                        ("vocab.json", "merges.txt")], "GPT-1 BPE")
        self.encoder = json.loads(enc_file.read_text(encoding="utf-8"))
        self.decoder = {i: t for t, i in self.encoder.items()}
        merges = [tuple(line.split()) for line in merges_file.read_text(encoding="utf-8").split("\n")[1:] if line]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.eot_id = None
        self.unk_id = self.encoder.get("<unk>")
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_word)

    def _bpe_word(self, word: str) -> tuple[str, ...]:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str) -> list[int]:
        # Symbols outside the vocabulary map to <unk> (id 0 in GPT-1's file), as transformers does.
        ids = (self.encoder.get(s, self.unk_id) for w in bert_pretokenize(text) for s in self._bpe(w))
        return [i for i in ids if i is not None]

    def decode(self, ids) -> str:
        return "".join(self.decoder[int(i)] for i in ids).replace("</w>", " ").rstrip()

    def spec(self) -> dict:
        return {"kind": "gpt1", "path": str(self.path.resolve())}


class SentencePieceTokenizer:
    """A sentencepiece model (BPE by default), trained on a text file with `train` or loaded."""

    kind = "sentencepiece"

    def __init__(self, model_file):
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise TokenizerError(f"sentencepiece model {self.path} does not exist; train one with "
                                 "SentencePieceTokenizer.train(text_file, model_prefix, vocab_size)")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.eot_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    @classmethod
    def train(cls, text_files, model_prefix, vocab_size: int = 4096, model_type: str = "bpe") -> "SentencePieceTokenizer":
        """Train on a text file (or a list of them); whitespace and newlines are kept, byte fallback
        covers any character, and at most 2M lines are sampled."""
        import sentencepiece as spm

        files = [text_files] if isinstance(text_files, (str, Path)) else list(text_files)
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in files), model_prefix=str(model_prefix), vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2,
        )
        return cls(f"{model_prefix}.model")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "path": str(self.path.resolve())}


_DEFAULT_DIRS = {"gpt2": "gpt2-bpe", "gpt1": "gpt1-bpe"}
_HUB_MODELS = {"gpt2": "gpt2", "gpt1": "openai-gpt"}


def _default_files(kind: str) -> Path:
    """$GPT_JAX_DATA/gpt2-bpe (or gpt1-bpe), else the tokenizer of gpt2 (or openai-gpt) from the
    Hugging Face cache."""
    if data_dir() is not None and (data_dir() / _DEFAULT_DIRS[kind]).exists():
        return data_dir() / _DEFAULT_DIRS[kind]
    try:
        return snapshot(_HUB_MODELS[kind], "tokenizer")
    except HubError as e:
        raise TokenizerError(f"the {kind} tokenizer needs its files: pass a path (data.tokenizer_path in a config), "
                             f"or set GPT_JAX_DATA to the folder that holds {_DEFAULT_DIRS[kind]}/; {e}") from None


def load_tokenizer(spec, path=None):
    """Load a tokenizer from a kind plus path, a `spec()` dict, or a path alone.

    load_tokenizer("gpt2", "../shared/data/gpt2-bpe")   # encoder.json + vocab.bpe, or vocab.json + merges.txt
    load_tokenizer("gpt1", "../shared/data/gpt1-bpe")
    load_tokenizer("sentencepiece", "run/tokenizer.model")
    load_tokenizer({"kind": "char", "chars": "abc"})
    load_tokenizer("../shared/data/gpt2-bpe")           # detected from the files present
    load_tokenizer("gpt2-medium")                       # a model's tokenizer from the Hugging Face cache
    Without a path, gpt2 / gpt1 look in $GPT_JAX_DATA/gpt2-bpe and $GPT_JAX_DATA/gpt1-bpe, then take
    the tokenizer of gpt2 / openai-gpt from the Hugging Face cache (gpt_jax.hub).
    """
    if isinstance(spec, dict):
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if kind == "char":
            return CharTokenizer(spec["chars"])
        return load_tokenizer(kind, spec.get("path"))
    kind = str(spec)
    if kind not in ("char", "gpt2", "gpt1", "sentencepiece"):
        try:
            return _detect(local_path(kind, "tokenizer"))  # a path, or a model name from the Hugging Face cache
        except HubError as e:
            raise TokenizerError(str(e)) from None
    if kind == "char":
        if path is None:
            raise TokenizerError("a char tokenizer is built from text: CharTokenizer.from_text(text)")
        return CharTokenizer(json.loads(Path(path).read_text())["chars"])
    if path is None and kind in _DEFAULT_DIRS:
        path = _default_files(kind)
    if path is None:
        raise TokenizerError(f"the {kind} tokenizer needs its model file: pass a path (data.tokenizer_path in a config)")
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer path {path} does not exist")
    return {"gpt2": GPT2Tokenizer, "gpt1": GPT1Tokenizer, "sentencepiece": SentencePieceTokenizer}[kind](path)


def _detect(path: Path):
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_file() and path.suffix == ".json":
        return load_tokenizer(json.loads(path.read_text()))
    if path.is_dir():
        if (path / "encoder_bpe_40000.json").is_file():
            return GPT1Tokenizer(path)
        if (path / "encoder.json").is_file() or (path / "vocab.json").is_file():
            merges = path / "vocab.bpe" if (path / "vocab.bpe").is_file() else path / "merges.txt"
            if merges.is_file() and "</w>" in merges.read_text(encoding="utf-8")[:4096]:
                return GPT1Tokenizer(path)
            return GPT2Tokenizer(path)
    raise TokenizerError(f"cannot tell which tokenizer {path} holds: expected a 'char', 'gpt2', 'gpt1' or "
                         "'sentencepiece' kind, a BPE folder, a .model file or a tokenizer .json spec")
