"""py_tokenizer_json.py — Tokenizer.from_tokenizer_json (a Hugging Face
tokenizer.json) on arbitrary bytes. A tokenizer that imports must round-trip
text through encode and decode, and export a tokenizer.json that imports
again to the same vocabulary."""
import pyfuzz

import atheris

with atheris.instrument_imports(include=["smedjan"]):
    from smedjan.tokenizer import Tokenizer

SAMPLE = "Hello world! <|endoftext|> 123 don't  \u00e9t\u00e9 \n\t x"


def test_one(data: bytes):
    tok = Tokenizer.from_tokenizer_json(pyfuzz.path("tokenizer.json", data))
    ids = tok.encode(SAMPLE)
    assert tok.decode_bytes(ids) == SAMPLE.encode(), "decode(encode(text)) != text"
    out = pyfuzz.path("export.json", b"")
    tok.save_tokenizer_json(out)
    back = Tokenizer.from_tokenizer_json(out)
    assert len(back) == len(tok), "export + import changed the vocabulary size"


if __name__ == "__main__":
    pyfuzz.run(test_one)
