"""The tokenizer's contract: every text and byte string round-trips, batch
equals one-by-one, special tokens behave as asked, files save and load, and
bad input gets a clear exception, never a crash."""
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from smedjan import _C
from smedjan.tokenizer import Tokenizer, _file_blocks
from test_tokenizer_data import stdlib_texts


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(stdlib_texts(300_000), vocab_size=1024,
                           special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(tok, text):
    ids = tok.encode(text, allowed_special=(), disallowed_special=())
    assert ids.dtype == np.int32
    assert tok.decode(ids, errors="strict") == text


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_roundtrip_arbitrary_bytes(tok, data):
    ids = tok.encode(data, allowed_special=(), disallowed_special=())
    assert tok.decode_bytes(ids) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(), st.binary()), max_size=20))
def test_encode_batch_equals_encode_one_by_one(tok, texts):
    batch = tok.encode_batch(texts)
    assert len(batch) == len(texts)
    for t, b in zip(texts, batch):
        assert b.tolist() == tok.encode(t).tolist()


def test_encode_batch_on_real_text_equals_encode(tok):
    texts = stdlib_texts(1_000_000, skip=50)
    batch = tok.encode_batch(texts)
    for t, b in zip(texts, batch):
        assert np.array_equal(b, tok.encode(t))


def test_a_lone_surrogate_is_the_same_unicode_error_one_by_one_or_batched(tok):
    with pytest.raises(UnicodeEncodeError) as one:
        tok.encode("ok \ud800")
    with pytest.raises(UnicodeEncodeError) as batch:
        tok.encode_batch(["fine", "ok \ud800"])
    assert batch.value.object == one.value.object == "ok \ud800"
    assert (batch.value.start, batch.value.end) == (one.value.start, one.value.end) == (3, 4)


def test_invalid_utf8_is_encoded_and_round_trips(tok):
    data = b"caf\xc3\xa9 \xff\xfe broken \xe2\x82 end \xed\xa0\x80 \xf4\x90\x80\x80"
    ids = tok.encode(data)
    assert tok.decode_bytes(ids) == data
    assert tok.decode(ids, errors="replace").startswith("café \ufffd")
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids, errors="strict")


def test_long_pretokens_encode_fast_and_exactly(tok):
    # one pre-token of 200k letters takes the heap path; must equal the small path's rule
    word = "abcde" * 40_000
    ids = tok.encode(word)
    assert tok.decode(ids) == word
    small = np.concatenate([tok.encode(word[i:i + 100]) for i in range(0, 300, 100)])
    assert tok.decode(small) == word[:300]
    spaces = " " * 100_000 + "x"
    assert tok.decode(tok.encode(spaces)) == spaces


def test_special_tokens_allowed_refused_or_text(tok):
    eot, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    text = "a<|endoftext|>b<|pad|>"
    ids = tok.encode(text).tolist()
    assert ids.count(eot) == 1 and ids.count(pad) == 1
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="<\\|endoftext\\|>.*byte 1"):
        tok.encode(text, allowed_special=())
    only = tok.encode(text, allowed_special={"<|pad|>"}, disallowed_special=()).tolist()
    assert eot not in only and pad in only
    plain = tok.encode(text, allowed_special=(), disallowed_special=()).tolist()
    assert eot not in plain and pad not in plain and tok.decode(plain) == text
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError):
        tok.encode_batch(["fine", text], allowed_special=())


def test_special_tokens_are_never_learned_from():
    docs = ["x<|endoftext|>y"] * 50
    t = Tokenizer.train(docs, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    assert all(b"<|" not in a + b for a, b in t.merges())
    assert t.encode("<|endoftext|>").tolist() == [t.eot_id] and t.eot_id == len(t) - 1


def test_training_is_deterministic_and_thread_count_independent():
    texts = stdlib_texts(400_000, skip=10)
    n = _C.threads()
    try:
        a = Tokenizer.train(texts, vocab_size=800, progress=False)
        _C.threads(1)
        b = Tokenizer.train(texts, vocab_size=800, progress=False)
    finally:
        _C.threads(n)
    assert a.merges() == b.merges()
    assert len(a) == 800


def test_training_from_files_equals_training_from_texts(tmp_path):
    texts = stdlib_texts(200_000, skip=30)
    paths = []
    for i, t in enumerate(texts):
        p = tmp_path / f"{i}.txt"
        p.write_text(t, encoding="utf-8")
        paths.append(p)
    a = Tokenizer.train(texts, vocab_size=600, progress=False)
    b = Tokenizer.train(files=paths, vocab_size=600, progress=False)
    assert a.merges() == b.merges()


def test_files_count_exactly_as_texts_wherever_blocks_are_cut(tmp_path):
    # Files are read in blocks, cut only where the whole file's pre-tokens
    # end. Right after a newline is not such a place when the newline ends a
    # longer run of whitespace (blank lines, CRLF, trailing spaces): "\n\ny"
    # is "\n" + "\n" + "y", but a block ending in "\n\n" counts one "\n\n".
    specials = ["<|endoftext|>", "<|a\nb|>"]
    docs = ["def f(x):\n    return x\n\n\nclass A:\n    pass\n\nx = 1\n",
            "one\r\ntwo\r\nthree\r\n",
            "trailing  \nspaces \nhere\n",
            "naïve café\n\nüber\u3000\nx\n",
            "x<|endoftext|>\ny\n\n<|endoftext|>z\nq<|a\nb|>c\nd<|a\nb|>\n\ne\n"]
    paths = []
    for i, d in enumerate(docs):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_bytes(d.encode("utf-8"))
    train = dict(vocab_size=1000, special_tokens=specials, progress=False)
    want = Tokenizer.train(docs, **train).merges()
    assert Tokenizer.train(files=paths, **train).merges() == want
    cut = _C.BpeTrainer([s.encode() for s in specials]).last_cut
    for block in (1, 2, 3, 5, 8, 13):
        blocks = [b for p in paths for b in _file_blocks(p, cut, block)]
        assert b"".join(blocks) == b"".join(p.read_bytes() for p in paths)
        assert Tokenizer.train(blocks, **train).merges() == want, f"blocks of {block}"


def test_a_big_document_counts_exactly_as_the_whole_text():
    # Documents over 1 MiB are cut into chunks for the threads. Here every
    # newline followed by text ends a run of blank lines; a cut after it would
    # count one "\n\n\n" for "\n\n" + "\n" and merge "\n\n" before "ab".
    # k copies of the piece count k times what it does, so learn the same.
    piece = " ab\n\n\ncd\n"
    want = Tokenizer.train([piece], vocab_size=300, special_tokens=[], progress=False).merges()
    n = _C.threads()
    try:
        for t in (1, 4):
            _C.threads(t)
            big = Tokenizer.train([piece * 250_000], vocab_size=300, special_tokens=[], progress=False)
            assert big.merges() == want, f"{t} threads"
    finally:
        _C.threads(n)


def test_save_load_roundtrip(tok, tmp_path):
    p = tmp_path / "tok.sjt"
    tok.save(p)
    t2 = Tokenizer.load(p)
    assert t2.merges() == tok.merges() and t2.special_tokens == tok.special_tokens
    text = "def f(x):\n    return x<|endoftext|>"
    assert np.array_equal(t2.encode(text), tok.encode(text))


def test_corrupt_truncated_and_foreign_files_raise_clear_errors(tok, tmp_path):
    p = tmp_path / "tok.sjt"
    tok.save(p)
    data = p.read_bytes()
    (tmp_path / "trunc").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="trunc.*truncated"):
        Tokenizer.load(tmp_path / "trunc")
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    (tmp_path / "flip").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="flip.*CRC"):
        Tokenizer.load(tmp_path / "flip")
    (tmp_path / "foreign").write_bytes(b"hello world, not a tokenizer")
    with pytest.raises(ValueError, match="foreign.*magic"):
        Tokenizer.load(tmp_path / "foreign")
    (tmp_path / "short").write_bytes(data[:20])
    with pytest.raises(ValueError, match="short.*truncated header"):
        Tokenizer.load(tmp_path / "short")
    newer = bytearray(data)
    newer[8] = 99
    (tmp_path / "newer").write_bytes(bytes(newer))
    with pytest.raises(ValueError, match="version 99"):
        Tokenizer.load(tmp_path / "newer")
    with pytest.raises(OSError, match="missing"):
        Tokenizer.load(tmp_path / "missing")


def write_sjt(path, tokens, merges, special=()):
    """Our file format written by hand, CRC and all (docs/tokenizer.md)."""
    payload = b"".join(struct.pack("<IB", len(t), i in special) + t for i, t in enumerate(tokens))
    payload += b"".join(struct.pack("<ii", a, b) for a, b in merges)
    path.write_bytes(b"SJBPETOK" + struct.pack("<IIIIQI", 1, 1, len(tokens), len(merges),
                                               len(payload), zlib.crc32(payload)) + payload)


def test_a_file_with_two_tokens_of_the_same_bytes_is_refused(tmp_path):
    byte_tokens = [bytes([b]) for b in range(256)]
    write_sjt(tmp_path / "fine.sjt", byte_tokens + [b"ab", b"<|eot|>"], [(97, 98)], special={257})
    assert Tokenizer.load(tmp_path / "fine.sjt").token_to_id(b"ab") == 256
    write_sjt(tmp_path / "dup.sjt", byte_tokens + [b"ab", b"ab"], [(97, 98)])
    with pytest.raises(ValueError, match=r"dup\.sjt: .*tokens 256 and 257 are both \"ab\""):
        Tokenizer.load(tmp_path / "dup.sjt")
    # a special token spelled like an ordinary one is a duplicate too
    write_sjt(tmp_path / "special.sjt", byte_tokens + [b"ab", b"ab"], [(97, 98)], special={257})
    with pytest.raises(ValueError, match=r"special\.sjt: .*tokens 256 and 257"):
        Tokenizer.load(tmp_path / "special.sjt")
    write_sjt(tmp_path / "byte.sjt", byte_tokens + [b"\n"], [], special={256})
    with pytest.raises(ValueError, match=r"byte\.sjt: .*tokens 10 and 256 are both \"\\x0a\""):
        Tokenizer.load(tmp_path / "byte.sjt")
    with pytest.raises(ValueError, match="tokens 97 and 256"):
        Tokenizer.from_vocab(byte_tokens + [b"a"], [])


def test_training_refuses_special_tokens_that_would_duplicate_a_token():
    with pytest.raises(ValueError, match="single byte 0x0a, which is already an ordinary token"):
        Tokenizer.train(["a b"], vocab_size=300, special_tokens=["\n"], progress=False)
    with pytest.raises(ValueError, match="special tokens 0 and 1 are the same"):
        _C.BpeTrainer([b"<s>", b"<s>"])


def test_every_truncation_of_a_file_raises_not_crashes(tmp_path):
    t = Tokenizer.train(["ab ab abc"] * 10, vocab_size=260, progress=False)
    p = tmp_path / "t"
    t.save(p)
    data = p.read_bytes()
    for n in list(range(0, 64)) + list(range(64, len(data), 97)):
        (tmp_path / "cut").write_bytes(data[:n])
        with pytest.raises(ValueError):
            Tokenizer.load(tmp_path / "cut")


def test_bad_arguments_raise(tok):
    with pytest.raises(TypeError):
        tok.encode(123)
    with pytest.raises(TypeError):
        tok.encode_batch("one string")
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        tok.encode_batch(["ok", 5])
    with pytest.raises(ValueError, match="not in 0"):
        tok.decode([len(tok)])
    with pytest.raises(ValueError, match="not in 0"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="not in 0"):
        tok.decode(np.array([2**40]))
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], vocab_size=100)
    with pytest.raises(TypeError):
        Tokenizer.train("a single string", vocab_size=300)
    with pytest.raises(ValueError, match="byte 0x00 has no token"):
        Tokenizer.from_vocab([bytes([b]) for b in range(1, 256)] + [b"ab"], [])
    with pytest.raises(ValueError, match="merged bytes are not in the vocabulary"):
        Tokenizer.from_vocab([bytes([b]) for b in range(256)], [(97, 98)])
    with pytest.raises(ValueError, match="not an ordinary token"):
        Tokenizer.from_vocab([bytes([b]) for b in range(256)], [(97, 9999)])
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.from_vocab([bytes([b]) for b in range(256)] + [b""], [])


def test_decode_accepts_lists_int32_int64_and_uint16(tok):
    ids = tok.encode("hello there")
    for x in (ids.tolist(), ids.astype(np.int64), ids.astype(np.uint16), ids):
        assert tok.decode(x) == "hello there"
    assert tok.decode([]) == ""


def test_cli_train_encode_info(tmp_path, capsys):
    import argparse
    from smedjan.tokenizer import add_commands
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(stdlib_texts(100_000)), encoding="utf-8")
    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers(dest="cmd"))
    out = tmp_path / "t.sjt"
    args = ap.parse_args(["tokenizer", "train", str(corpus), "-o", str(out), "--vocab-size", "400",
                          "--special", "<|endoftext|>", "--hf-json", str(tmp_path / "t.json")])
    assert args.func(args) == 0
    args = ap.parse_args(["tokenizer", "encode", str(out), "hello"])
    assert args.func(args) == 0
    ids = [int(x) for x in capsys.readouterr().out.split("\n")[-2].split()]
    assert Tokenizer.load(out).decode(ids) == "hello"
    args = ap.parse_args(["import-bpe", "--tokenizer-json", str(tmp_path / "t.json"), "-o", str(tmp_path / "u")])
    assert args.func(args) == 0
    assert Tokenizer.load(tmp_path / "u").merges() == Tokenizer.load(out).merges()
