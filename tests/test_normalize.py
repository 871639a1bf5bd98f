"""Text normalisation (`data.normalize`): hand-written cases in SST-2's form, SST-2's own sentences
unchanged by it, raw IMDB reviews brought to SST-2's characters and tokens, and its place in the
data cache key."""

import collections
import itertools
import re

import pytest

from conftest import data_path
from gpt_jax.config import DataConfig
from gpt_jax.data import prepare
from gpt_jax.normalize import normalize, sst_line

CASES = [
    ("It's great, isn't it?", "it 's great , is n't it ?"),
    ("I can't believe Mr. Smith said \"wow.\"", "i ca n't believe mr. smith said `` wow . ''"),
    ("The U.S. cut (1999) cost $40... meh--really.", "the u.s. cut ( 1999 ) cost $ 40 ... meh -- really ."),
    ("You're gonna love 'Solaris'. I cannot; they'd won't.",
     "you 're gon na love ` solaris ' . i can not ; they 'd wo n't ."),
    ("Great!<br /><br />The critics' darling, 10,000 times: 8/10.<br/>End",
     "great ! the critics ' darling , 10,000 times : 8/10 . end"),
    ("A sci-fi, rock 'n' roll B-movie from the '70s; get 'em, J. K. Rowling & co.",
     "a sci-fi , rock 'n' roll b-movie from the '70s ; get 'em , j. k. rowling & co ."),
    ("R&B ***stars*** \u201cquoted\u201d \u2014 it\u2019s fine\u2026 don`t", "r&b *** stars *** `` quoted '' -- it 's fine ... do n't"),
    ("  two   lines \n\nkept  apart ", "two lines\n\nkept apart"),
]


@pytest.mark.parametrize("raw, sst", CASES)
def test_hand_written_text_comes_out_in_sst_form(raw, sst):
    assert normalize(raw, "sst") == sst
    assert normalize(sst, "sst") == sst  # the form is a fixed point
    assert normalize(raw, "none") == raw


def sst2_sentences(*names):
    return [line.split("\t")[0].strip() for name in names
            for line in data_path("sst2", name).read_text().splitlines()[1:]]


def test_sst2_sentences_are_already_in_the_form():
    sentences = sst2_sentences("train_heldout.tsv", "dev.tsv")
    changed = [s for s in sentences if sst_line(s) != s]
    assert len(changed) <= len(sentences) // 1000, changed[:5]  # a few abbreviations ("wash.") are not known


def test_imdb_reviews_come_out_with_sst2_characters_and_tokens():
    sst = sst2_sentences("train.tsv", "train_heldout.tsv", "dev.tsv")
    sst_chars, sst_tokens = set("".join(sst)), {t for s in sst for t in s.split()}
    with open(data_path("imdb-unsup", "unsup.00.txt"), encoding="utf-8") as f:
        raw = [line.rstrip("\n") for line in itertools.islice(f, 200)]
    assert sum("<br />" in line for line in raw) > 100 and sum(c.isupper() for c in "".join(raw)) > 1000
    out = [sst_line(line) for line in raw]
    text = "\n".join(out)
    assert "<br" not in text and '"' not in text and "  " not in text and text == text.lower()
    assert all(line == line.strip() for line in out)
    strange = [c for c in text if c not in sst_chars and c != "\n"]
    assert len(strange) < len(text) / 10_000, collections.Counter(strange)
    tokens = collections.Counter(t for line in out for t in line.split())
    marks = [t for t, _ in tokens.most_common() if not re.fullmatch(r"[a-z0-9]+", t)][:30]
    assert {",", ".", "'s", "n't", "``", "''", "(", ")", "...", "--"} <= set(marks)
    assert [t for t in marks if t not in sst_tokens] == []  # the punctuation and clitics are SST-2's
    assert not [t for t in tokens if re.search(r"[a-z][,;!?()]|[,;!?()][a-z]", t)]  # punctuation stands apart


def test_normalize_is_part_of_the_cache_key(tmp_path):
    src = tmp_path / "reviews.txt"
    src.write_text("It's GOOD, isn't it?<br /><br />Yes!\n" * 100)

    def prepared(kind):
        return prepare(DataConfig(source=str(src), cache_dir=str(tmp_path / "cache"), normalize=kind), verbose=False)

    raw, sst = prepared("none"), prepared("sst")
    assert raw.dir != sst.dir and prepared("sst").dir == sst.dir
    assert sst.manifest["normalize"] == "sst" and not (sst.dir / "normalized").exists()
    decoded = "".join(sst.tokenizer.decode(sst.tokens(split)) for split in ("train", "val"))
    assert decoded == "it 's good , is n't it ? yes !\n" * 100
    assert raw.tokenizer.decode(raw.tokens("train"))[:20] == "It's GOOD, isn't it?"
