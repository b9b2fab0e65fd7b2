"""py_gguf.py — smedjan.gguf.read_gguf and its tokenizer import
(tokenizer_from_gguf) on arbitrary bytes: the Python side of GGUF files
(metadata to Python values, tensors to NumPy views, tokenizer.ggml.* to a
Tokenizer). A tokenizer that imports must round-trip text when its
vocabulary has all 256 bytes (without, the bytes it lacks are dropped, as
Hugging Face's BPE without an unk token drops them)."""
import pyfuzz

import atheris

with atheris.instrument_imports(include=["smedjan"]):
    from smedjan import gguf

SAMPLE = "Hello world! 123 don't  \u00e9t\u00e9 \n\t x"


def test_one(data: bytes):
    g = gguf.read_gguf(pyfuzz.path("model.gguf", data))
    for name in list(g.tensors)[:4]:
        if g.tensors[name].size <= 65536:
            g.dequantize(name)
    if "tokenizer.ggml.model" in g.kv:
        tok = g.tokenizer()
        ids = tok.encode(SAMPLE)
        if getattr(tok, "n_model_vocab", None) is None:
            assert tok.decode_bytes(ids) == SAMPLE.encode(), "decode(encode(text)) != text"


if __name__ == "__main__":
    pyfuzz.run(test_one)
