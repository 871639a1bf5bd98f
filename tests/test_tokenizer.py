import json
import sys

import pytest

from conftest import data_path
from gpt_jax import load_tokenizer
from gpt_jax.tokenizer import CharTokenizer, SentencePieceTokenizer, TokenizerError


@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_gpt2_bpe_published_vectors(layout):
    root = data_path("gpt2-bpe")
    tok = load_tokenizer("gpt2", root if layout == "openai" else root / "hf")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    vectors = json.loads((root / "test_vectors.json").read_text())
    assert len(vectors) == 54
    for v in vectors:
        assert tok.encode(v["text"], allow_special=bool(v.get("allowed_special"))) == v["ids"], v["text"]
        assert tok.decode(v["ids"]) == v["text"]


def test_gpt2_bpe_shakespeare_counts():
    tok = load_tokenizer("gpt2", data_path("gpt2-bpe"))
    counts = json.loads(data_path("tinyshakespeare", "gpt2_token_counts.json").read_text())["gpt2_bpe_encode_ordinary"]
    text = data_path("tinyshakespeare", "input.txt").read_text()
    cut = int(len(text) * 0.9)
    train = tok.encode(text[:cut])
    assert (len(train), len(tok.encode(text[cut:]))) == (counts["train_tokens"], counts["val_tokens"])
    assert train[:20] == counts["first_20_train_ids"]


def test_gpt1_bpe_published_vector():
    tok = load_tokenizer("gpt1", data_path("gpt1-bpe"))
    assert tok.vocab_size == 40478 and tok.eot_id is None
    for v in json.loads(data_path("gpt1-bpe", "test_vectors.json").read_text()):
        assert tok.encode(v["text"]) == v["ids"]


def test_gpt1_bpe_matches_transformers_on_real_text():
    transformers = pytest.importorskip("transformers", reason="transformers is the GPT-1 tokenizer reference")
    root = data_path("gpt1-bpe")
    tok = load_tokenizer(root)  # detected as GPT-1 from its files
    encoder = json.loads((root / "encoder_bpe_40000.json").read_text())
    merges = [tuple(line.split()) for line in (root / "vocab_40000.bpe").read_text().split("\n")[1:] if line]
    ref = transformers.OpenAIGPTTokenizer(vocab=encoder, merges=merges)
    lines = data_path("sst2", "train.tsv").read_text().split("\n")[1:2001]
    lines += data_path("tinyshakespeare", "input.txt").read_text().split("\n")[:2000]
    lines += ["Café naïve résumé — “quotes” 東京 İstanbul straße ﬁne \x00 tab\tsep", "DON'T stop-believing!!  42.5%"]
    mismatches = [line for line in lines if tok.encode(line) != ref(line, add_special_tokens=False)["input_ids"]]
    assert not mismatches, mismatches[:3]
    assert tok.decode(tok.encode("Hello, World!")) == "hello , world !"


def test_gpt1_bpe_last_merges_match_transformers():
    """Words spelled by the last 3,000 of the 40,000 merges (which ordinary text rarely reaches): the
    encoding equals transformers' (its BasicTokenizer path, without ftfy / spacy), most of those merges'
    tokens appear, and the very last merge makes its word a single token."""
    transformers = pytest.importorskip("transformers", reason="transformers is the GPT-1 tokenizer reference")
    root = data_path("gpt1-bpe")
    tok = load_tokenizer("gpt1", root)
    merges = [tuple(line.split()) for line in (root / "vocab_40000.bpe").read_text().split("\n")[1:] if line]
    assert len(merges) == 40000
    late = merges[-3000:]
    text = " ".join((a + b).replace("</w>", "") for a, b in late) + " Bachelorette, BACHELORETTE!"
    ref = transformers.OpenAIGPTTokenizer(vocab=json.loads((root / "encoder_bpe_40000.json").read_text()),
                                          merges=merges)
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    made = {tok.encoder[a + b] for a, b in late}
    assert len(made & set(ids)) > 0.8 * len(late)
    assert merges[-1] == ("bachel", "orette</w>") and tok.encode("bachelorette") == [tok.encoder["bachelorette</w>"]]


def test_char_tokenizer_round_trip_and_errors(tmp_path):
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab_size == 9 and tok.decode(tok.encode("low\nhe")) == "low\nhe"
    assert load_tokenizer(tok.spec()).encode("hello") == tok.encode("hello")
    (tmp_path / "tok.json").write_text(json.dumps(tok.spec()))
    assert load_tokenizer(tmp_path / "tok.json").chars == tok.chars
    with pytest.raises(TokenizerError, match="'z' .* not in this 9-character vocabulary"):
        tok.encode("zoo")
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


def test_sentencepiece_train_and_load(tmp_path):
    text = data_path("tinyshakespeare", "input.txt").read_text()
    (tmp_path / "train.txt").write_text(text[:300_000])
    tok = SentencePieceTokenizer.train(tmp_path / "train.txt", tmp_path / "sp", vocab_size=1000)
    assert tok.vocab_size == 1000
    again = load_tokenizer(tmp_path / "sp.model")
    held_out = text[-3000:]
    ids = again.encode(held_out)
    assert ids == tok.encode(held_out) and again.decode(ids) == held_out  # exact, whitespace included
    assert len(ids) < len(held_out) / 2  # it learned merges, not characters
    assert again.decode(again.encode("  indented\n\ttabs ✓")) == "  indented\n\ttabs ✓"  # byte fallback


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT_JAX_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty Hugging Face cache, and no download
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(TokenizerError, match="GPT_JAX_DATA"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="encoder.json \\+ vocab.bpe or vocab.json \\+ merges.txt"):
        load_tokenizer("gpt2", tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("sentencepiece", tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="cannot tell which tokenizer"):
        load_tokenizer(tmp_path)
