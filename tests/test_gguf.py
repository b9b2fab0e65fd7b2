"""GGUF files: GGML-compatible block quantisation, write/read round trips,
exports that reload bit-exactly in our loader and run in llama.cpp (recorded
by benchmarks/probes/record_llamacpp.py), and hostile files (truncated, corrupted)
that raise clear errors instead of reading out of bounds."""
import json
import os
import pathlib
import struct

import numpy as np
import pytest

from conftest import assert_n_log_n
import smedjan
from smedjan import _C
from smedjan.gguf import (F32, Q4_0, Q4_1, Q8_0, _kv, export_gguf, read_gguf, write_gguf)
from smedjan.infer import from_model, load_gguf
from infer_common import beaten_topk, np_dequant, smollm2_path

DATA = pathlib.Path(__file__).parent / "data" / "llamacpp_smollm2.json"


def np_quant_q8_0(x):
    """GGML's quantize_row_q8_0_ref, written out in NumPy."""
    b = x.reshape(-1, 32).astype(np.float32)
    d = np.abs(b).max(1) / np.float32(127)
    idn = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.round(b * idn[:, None]).astype(np.int8)
    out = np.zeros((b.shape[0], 34), np.uint8)
    out[:, :2] = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
    out[:, 2:] = q.view(np.uint8)
    return out.reshape(-1)


def test_q8_0_quantisation_is_ggml_bit_exact(rng):
    x = (rng.standard_normal(32 * 257) * rng.uniform(0.01, 10, 32 * 257)).astype(np.float32)
    ours = np.frombuffer(_C.gguf_quantize(Q8_0, x), np.uint8)
    np.testing.assert_array_equal(ours, np_quant_q8_0(x))
    back = np.frombuffer(_C.gguf_dequantize(Q8_0, ours, x.size), np.float32)
    np.testing.assert_array_equal(back, np_dequant(ours, Q8_0, (x.size,)))


def test_q4_0_quantisation_round_trip(rng):
    x = rng.standard_normal(32 * 300).astype(np.float32)
    q = np.frombuffer(_C.gguf_quantize(Q4_0, x), np.uint8)
    assert q.size == 18 * 300
    back = np.frombuffer(_C.gguf_dequantize(Q4_0, q, x.size), np.float32)
    np.testing.assert_array_equal(back, np_dequant(q, Q4_0, (x.size,)))
    d = np.abs(x.reshape(-1, 32)).max(1, keepdims=True) / 8
    assert np.all(np.abs(back - x).reshape(-1, 32) <= d * 0.5 + 1e-6 + d * 1.01)


def _tiny_file(tmp_path):
    p = tmp_path / "t.gguf"
    w = np.arange(64 * 3, dtype=np.float32).reshape(3, 64) / 7
    write_gguf(p, [_kv("general.architecture", "test"), _kv("x.count", 7), _kv("x.f", 0.5),
                   _kv("x.names", ["a", "bb", "ccc"]), _kv("x.flag", True)],
               [("w32", F32, (64, 3), w.tobytes()),
                ("w8", Q8_0, (64, 3), _C.gguf_quantize(Q8_0, w.reshape(-1)))])
    return p, w


def test_write_read_round_trip(tmp_path):
    p, w = _tiny_file(tmp_path)
    f = read_gguf(p)
    assert f.version == 3
    assert (f.kv["x.count"], f.kv["x.f"], f.kv["x.names"], f.kv["x.flag"]) == (7, 0.5, ["a", "bb", "ccc"], True)
    np.testing.assert_array_equal(f.tensors["w32"], w)
    assert f.shapes["w8"] == (3, 64) and f.types["w8"] == Q8_0
    assert np.abs(f.dequantize("w8") - w).max() < np.abs(w).max() / 100


def test_truncated_files_raise_clear_errors(tmp_path):
    p, _ = _tiny_file(tmp_path)
    data = p.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, 200)) + list(range(200, len(data) - 1, 7)):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="cut.gguf"):
            read_gguf(cut)


def test_corrupted_files_never_crash(tmp_path, rng):
    p, _ = _tiny_file(tmp_path)
    data = bytearray(p.read_bytes())
    bad = tmp_path / "bad.gguf"
    header_end = 300
    n_err = 0
    for trial in range(400):
        d = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, header_end))
            d[i] = int(rng.integers(0, 256)) if trial % 2 else d[i] ^ 0xFF
        bad.write_bytes(bytes(d))
        try:
            read_gguf(bad)
        except ValueError as e:
            assert "bad.gguf" in str(e)
            n_err += 1
    assert n_err > 100
    # a huge count, a huge string length, a data offset past the end: each named
    for off, val, what in ((8, 2**40, "implausible|truncated"), (24, 2**62, "plausible|truncated")):
        d = bytearray(data)
        d[off:off + 8] = struct.pack("<Q", val)
        bad.write_bytes(bytes(d))
        with pytest.raises(ValueError, match=what):
            read_gguf(bad)


def test_unsupported_tensor_type_is_named(tmp_path):
    p, _ = _tiny_file(tmp_path)
    d = bytearray(p.read_bytes())
    i = d.index(b"w8") + 2 + 4 + 16     # name, n_dims, 2 dims -> type
    d[i:i + 4] = struct.pack("<I", 12)  # Q4_K
    bad = tmp_path / "k.gguf"
    bad.write_bytes(bytes(d))
    with pytest.raises(ValueError, match="'w8' has type Q4_K"):
        read_gguf(bad)


def _offset_at(d, name):
    """Where tensor `name`'s u64 data offset sits in a 2-D tensor info."""
    i = d.index(struct.pack("<Q", len(name)) + name)
    return i + 8 + len(name) + 4 + 16 + 4          # name, n_dims, 2 dims, type


@pytest.mark.parametrize("at", [0, 32, 736])
def test_overlapping_tensors_are_refused_naming_both(tmp_path, at):
    p, _ = _tiny_file(tmp_path)
    d = bytearray(p.read_bytes())
    i = _offset_at(d, b"w8")
    assert struct.unpack_from("<Q", d, i)[0] == 768     # w32 holds data bytes [0, 768)
    d[i:i + 8] = struct.pack("<Q", at)                  # w8 (204 bytes) now inside w32
    bad = tmp_path / "ov.gguf"
    bad.write_bytes(bytes(d))
    with pytest.raises(ValueError, match="ov.gguf: tensors '(w32|w8)' .* and '(w8|w32)' .* overlap") as e:
        read_gguf(bad)
    assert "'w32'" in str(e.value) and "'w8'" in str(e.value)


def _vocab_file(tmp_path, name, **ids):
    p = tmp_path / name
    kvs = [_kv("general.architecture", "test"), _kv("tokenizer.ggml.model", "gpt2"),
           _kv("tokenizer.ggml.tokens", ["a", "b", "c", "d", "e"])]
    kvs += [_kv(f"tokenizer.ggml.{k}_token_id", v) for k, v in ids.items()]
    write_gguf(p, kvs, [("w", F32, (32, 1), np.zeros(32, np.float32).tobytes())])
    return p


@pytest.mark.parametrize("key,value", [("eos", 5), ("bos", 7), ("eos", 2**32 - 1)])
def test_special_token_id_outside_the_vocabulary_is_refused(tmp_path, key, value):
    p = _vocab_file(tmp_path, "v.gguf", **{key: value})
    with pytest.raises(ValueError, match=rf"v.gguf: tokenizer.ggml.{key}_token_id = {value} is not a token "
                                         r"id: the vocabulary has 5 \(tokenizer.ggml.tokens has 5 entries\)"):
        read_gguf(p)
    ok = read_gguf(_vocab_file(tmp_path, "ok.gguf", bos=0, eos=4))
    assert (ok.kv["tokenizer.ggml.bos_token_id"], ok.kv["tokenizer.ggml.eos_token_id"]) == (0, 4)


def test_special_token_id_is_checked_against_the_embedding_rows(tmp_path):
    p = tmp_path / "e.gguf"
    write_gguf(p, [_kv("tokenizer.ggml.eos_token_id", 3)],
               [("token_embd.weight", F32, (32, 3), np.zeros(96, np.float32).tobytes())])
    with pytest.raises(ValueError, match=r"eos_token_id = 3 is not a token id: the vocabulary has 3 "
                                         r"\(token_embd.weight has 3 rows\)"):
        read_gguf(p)


def test_duplicate_metadata_key_is_refused(tmp_path):
    p = tmp_path / "d.gguf"
    write_gguf(p, [_kv("x.count", 7), _kv("general.architecture", "test"), _kv("x.count", 8)],
               [("w", F32, (32, 1), np.zeros(32, np.float32).tobytes())])
    with pytest.raises(ValueError, match="d.gguf: metadata key 'x.count' appears twice"):
        read_gguf(p)


def test_many_tensors_open_in_n_log_n(tmp_path):
    """Duplicate-name and overlap checks sort; they compared all pairs, which
    took tens of seconds for 100,000 tensors (the format allows 1,048,576)."""
    n = 100_000
    row = np.zeros(8, np.float32).tobytes()

    def written(k):
        q = tmp_path / f"many{k}.gguf"
        write_gguf(q, [_kv("general.architecture", "test")], [(f"t{i}", F32, (8,), row) for i in range(k)])
        return lambda: _C.gguf_open(str(q))
    written(n)
    p = tmp_path / f"many{n}.gguf"
    owner, _, _, _, rows = _C.gguf_open(str(p))
    assert len(rows) == n and rows[-1][0] == f"t{n - 1}"
    assert_n_log_n(written, n, "GGUF open")
    d = bytearray(p.read_bytes())
    i = _offset_at(d, f"t{n - 1}".encode()) - 8         # a 1-D tensor: one dimension less
    d[i:i + 8] = struct.pack("<Q", 0)                   # the last tensor's data is the first's
    p.write_bytes(bytes(d))
    with pytest.raises(ValueError, match=f"tensors 't(0|{n - 1})' .* and 't({n - 1}|0)' .* overlap"):
        read_gguf(p)


def test_model_export_reloads_exactly(tmp_path):
    m = smedjan.Model("tiny", vocab_size=512, seed=1, max_seq_len=64)
    toks = np.arange(5, 45, dtype=np.int32)
    for typ, mode in (("f32", "fp32"), ("q8_0", "q8"), ("q4_0", "q4")):
        src = from_model(m, mode)
        p = tmp_path / f"m_{typ}.gguf"
        export_gguf(src, p, typ)
        again = load_gguf(p, mode)
        np.testing.assert_array_equal(again.forward(toks), src.forward(toks))


def test_truncated_model_file_raises(tmp_path):
    m = smedjan.Model("tiny", vocab_size=512, seed=1, max_seq_len=64)
    p = tmp_path / "m.gguf"
    export_gguf(m, p, "q8_0")
    data = p.read_bytes()
    cut = tmp_path / "m_cut.gguf"
    for n in (len(data) - 1, len(data) - 4096, len(data) // 2, 1000):
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match="m_cut.gguf.*(runs past the end|truncated)"):
            load_gguf(cut, "q8")


def test_truncated_and_corrupted_safetensors_raise(tmp_path):
    from smedjan.io import load_safetensors, save_safetensors
    p = tmp_path / "w.safetensors"
    save_safetensors(p, {"a": np.ones((4, 8), np.float32), "b": np.arange(10, dtype=np.int32)})
    data = p.read_bytes()
    for n in range(0, len(data) - 1, 5):
        (tmp_path / "c.safetensors").write_bytes(data[:n])
        with pytest.raises(ValueError):
            load_safetensors(tmp_path / "c.safetensors")
    d = bytearray(data)
    d[-3] ^= 0xFF                       # data corrupted: the CRC says so
    (tmp_path / "x.safetensors").write_bytes(bytes(d))
    with pytest.raises(ValueError, match="CRC"):
        load_safetensors(tmp_path / "x.safetensors")


@pytest.mark.parametrize("typ", ["q8_0", "q4_0"])
def test_smollm2_export_runs_in_llamacpp(tmp_path, typ):
    """Our export, loaded by us, against llama.cpp on the same exported file
    (recorded): the same next-token choices up to near-ties that rounding
    tips either way, and a small KL."""
    rec = json.loads(DATA.read_text())["exports"][typ]
    src = load_gguf(smollm2_path(), rec["mode"], max_ctx=256)
    p = tmp_path / f"smol_{typ}.gguf"
    export_gguf(src, p, typ)
    ours = load_gguf(p, rec["mode"], max_ctx=256)
    toks = np.asarray(rec["tokens"], np.int32)
    lg = ours.forward(toks).astype(np.float64)
    if typ == "q8_0":   # q8 weights export losslessly
        np.testing.assert_array_equal(lg, src.forward(toks))
    lp = lg - lg.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    top = np.asarray(rec["top_ids"])
    agree = (lp.argmax(-1) == top[:, 0]).mean()
    tlp = np.asarray(rec["top_logprobs"])
    # llama.cpp quantises the activations to 8 bits and we do not (the same
    # for our q8/q4 modes as for its): 2-4 of the 48 top-1 choices flip with
    # the summation order alone (scalar, AVX2, AVX-512 kernels; a sanitizer
    # build), and at each flip llama.cpp's top-1 led ours by at most 0.28
    # nats in its own log-probs (measured). A flip counts when it leads by
    # more than 0.35; at most one of 48 may.
    bad, gap = beaten_topk(lp, top, tlp, 0.35)
    p, q = np.exp(tlp), np.exp(np.take_along_axis(lp, top, -1))
    pr, qr = np.clip(1 - p.sum(-1), 1e-12, None), np.clip(1 - q.sum(-1), 1e-12, None)
    kl = ((p * (tlp - np.log(q))).sum(-1) + pr * (np.log(pr) - np.log(qr))).mean()
    print(f"{typ}: top-1 agreement with llama.cpp {agree:.3f}, mean KL {kl:.2e}")
    assert bad.size <= 1, f"llama.cpp's top-1 beats ours by > 0.35 nats at {bad}: {gap[bad]}"
    assert kl < 0.02, kl
    assert ours.tokenizer is not None and ours.tokenizer.encode("Hello 42").tolist() == \
        src.tokenizer.encode("Hello 42").tolist()
