"""py_bpe_files.py — Tokenizer.from_bpe_files (GPT-2 / HF vocab.json +
merges.txt) on arbitrary bytes: the input is vocab.json, the separator
make_seeds.SEP, then merges.txt. A tokenizer that imports must round-trip
text through encode and decode."""
import pyfuzz

import atheris

with atheris.instrument_imports(include=["smedjan"]):
    from smedjan.tokenizer import Tokenizer

SEP = b"\n\x00--8<--\x00\n"
SAMPLE = "Hello world! <|endoftext|> 123 don't  \u00e9t\u00e9 \n\t x"


def test_one(data: bytes):
    vocab, _, merges = data.partition(SEP)
    tok = Tokenizer.from_bpe_files(pyfuzz.path("vocab.json", vocab), pyfuzz.path("merges.txt", merges))
    ids = tok.encode(SAMPLE)
    assert tok.decode_bytes(ids) == SAMPLE.encode(), "decode(encode(text)) != text"


if __name__ == "__main__":
    pyfuzz.run(test_one)
