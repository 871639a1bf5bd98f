"""Text normalisation before tokenizing a corpus (`data.normalize`), so that pretraining text has the
form of a fine-tuning task's text.

    none   the text as it is
    sst    the form of the Stanford Sentiment Treebank (SST-2) sentences: lowercase, HTML line breaks
           (`<br />`) removed, and Penn Treebank tokenisation with one space between tokens:
           clitics apart ("it 's", "does n't", "ca n't", "can not", "gon na"), punctuation apart
           ("great , but", "the end .", "( yes )", "$ 40"), double quotes as `` and '', single
           quotes as ` and ', "..." and "--" as tokens; abbreviations keep their period ("mr.",
           "u.s.", "etc."), and hyphens, slashes and apostrophes inside words stay ("sci-fi",
           "and/or", "o'fallon"). Parentheses stay ( and ), as in SST-2 (not PTB's -lrb- / -rrb-).

Normalisation works line by line (a line stays a line), so a corpus streams through it in chunks.
"""

from __future__ import annotations

import re

NORMALIZERS = ("none", "sst")

# Windows-1252 punctuation as it appears in scraped text (IMDB reviews hold the C1 code points), and
# its Unicode forms, mapped to the ASCII forms the rules below know.
_PUNCTUATION = str.maketrans({
    "\x85": "...", "\u2026": "...", "\x91": "'", "\x92": "'", "\u2018": "'", "\u2019": "'", "\u00b4": "'",
    "\x93": '"', "\x94": '"', "\u201c": '"', "\u201d": '"', "\x96": "-", "\u2013": "-",
    "\x97": " -- ", "\u2014": " -- ", "\u00a0": " ", "\t": " ",
})
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "prof", "bros", "sept"}
_RULES = [(re.compile(pattern), repl) for pattern, repl in [
    (r"<br\s*/?>", " "),                                      # HTML line breaks
    (r"(?<=[a-z])`(?=[a-z])", "'"),                           # don`t
    (r'(?:^|(?<=[\s(\[{]))"', " `` "),                        # opening double quote
    (r'"', " '' "),                                           # closing double quote
    (r"\.{2,}", " ... "),
    (r"-{2,}", " -- "),
    (r"(?<!\d)[,:]|[,:](?!\d)", r" \g<0> "),                   # not inside numbers: 10,000  10:30
    (r"[;!?()\[\]{}$#%@]|\*+", r" \g<0> "),
    (r"(?<![a-z0-9])&|&(?![a-z0-9])", " & "),                 # r&b stays
    (r"(?:^|(?<=\s))'(?=[a-z])(?!(?:s|re|ve|ll|m|d|em|til|n|cause)\b)", " ` "),  # not 's, 'em
    (r"(?<=[a-z0-9])(?<!\s'n)(?<!\bol)'(?=[\s.]|$)", " ' "),   # closing quote / plural possessive
    (r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b", lambda m: " ".join(g for g in m.groups() if g)),
    (r"(?<=\w)(n't)\b", r" \1"),
    (r"(?<=\w)('(?:s|re|ve|ll|m|d))\b", r" \1"),
]]


def _sst_period(token: str) -> str:
    """A final period split off, unless the token is an abbreviation: mr., u.s., an initial (j.)."""
    if len(token) < 2 or not token.endswith(".") or token == "...":
        return token
    word = token[:-1]
    if word in _ABBREVIATIONS or "." in word or re.fullmatch(r"[b-hj-z]", word):  # "i." and "a." end sentences
        return token
    return f"{word} ."


def sst_line(line: str) -> str:
    line = line.translate(_PUNCTUATION).lower()
    for pattern, repl in _RULES:
        line = pattern.sub(repl, line)
    return " ".join(_sst_period(token) for token in line.split())


def normalize(text: str, kind: str) -> str:
    """`text` in the form `kind` names (one of NORMALIZERS); line breaks are kept."""
    if kind == "none":
        return text
    if kind == "sst":
        return "\n".join(sst_line(line) for line in text.split("\n"))
    raise ValueError(f"unknown normalisation {kind!r}; choose one of {NORMALIZERS}")
