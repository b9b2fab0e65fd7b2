"""The safetensors container: round trips, compatibility both ways with the
reference implementation (pip `safetensors`), and failure behaviour — every
corrupt, truncated or malformed file is refused with a message naming the
file (and tensor), and a failed write never touches the file already there."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import safetensors.numpy as stn
from safetensors import safe_open
from smedjan import _C
from conftest import assert_n_log_n
from smedjan.io import (bf16_to_f32, f32_to_bf16, from_gguf_name, from_hf_name,
                        load_safetensors, save_safetensors, to_gguf_name, to_hf_name)


def sample(rng):
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "h": rng.standard_normal(7).astype(np.float16),
        "i": rng.integers(-5, 5, (2, 2, 2)).astype(np.int32),
        "ids": rng.integers(0, 60000, 9).astype(np.uint16),
        "bytes": rng.integers(0, 255, 3).astype(np.uint8),
        "big": rng.integers(-2**40, 2**40, 4).astype(np.int64),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(2.5, np.float64),
    }


def write_raw(path, header: dict, data: bytes, pad=True):
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def test_crc32_matches_zlib_at_every_alignment_and_chains():
    data = os.urandom(1000)
    for off in range(9):
        for n in (0, 1, 7, 8, 9, 63, 500):
            assert _C.crc32(data[off:off + n]) == zlib.crc32(data[off:off + n])
    assert _C.crc32(data[300:], _C.crc32(data[:300])) == zlib.crc32(data)


def test_round_trip_every_dtype(tmp_path, rng):
    t = sample(rng)
    p = tmp_path / "x.safetensors"
    save_safetensors(p, t, {"note": "hello"})
    back, meta = load_safetensors(p)
    assert meta["note"] == "hello"
    assert set(back) == set(t)
    for k, v in t.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)


def test_crc_entries_are_zlib_crc32_of_each_tensor(tmp_path, rng):
    t = sample(rng)
    p = tmp_path / "x.safetensors"
    save_safetensors(p, t)
    _, meta = load_safetensors(p)
    for k, v in t.items():
        assert meta[f"crc32:{k}"] == f"{zlib.crc32(np.ascontiguousarray(v).tobytes()):08x}"


def test_reference_reader_opens_our_files(tmp_path, rng):
    t = sample(rng)
    p = str(tmp_path / "x.safetensors")
    save_safetensors(p, t, {"format": "pt"})
    ref = stn.load_file(p)
    for k, v in t.items():
        np.testing.assert_array_equal(ref[k], v)
    with safe_open(p, "np") as f:
        assert f.metadata()["format"] == "pt"
        assert f.metadata()[f"crc32:w"]


def test_metadata_is_covered_by_the_header_crc(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"a": np.ones(2, np.float32)}, {"step": "1200"})
    b = p.read_bytes()
    p.write_bytes(b.replace(b'"1200"', b'"1300"'))
    with pytest.raises(ValueError, match="x.safetensors: header CRC mismatch"):
        load_safetensors(p)


def test_reference_rewrite_of_our_file_still_verifies(tmp_path, rng):
    """The header CRC leaves out offsets, so a re-layout by another writer
    (same tensors, same metadata) keeps the file valid."""
    p, q = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
    t = {k: v for k, v in sample(rng).items() if k != "scalar"}
    save_safetensors(p, t, {"k": "v"})
    with safe_open(p, "np") as f:
        meta = f.metadata()
    stn.save_file(stn.load_file(p), q, metadata=meta)
    back, m = load_safetensors(q)
    assert m == meta
    for k, v in t.items():
        np.testing.assert_array_equal(back[k], v)


def test_we_open_reference_files_without_crc_entries(tmp_path, rng):
    t = {k: v for k, v in sample(rng).items() if k != "scalar"}
    p = str(tmp_path / "ref.safetensors")
    stn.save_file(t, p, metadata={"a": "b"})
    back, meta = load_safetensors(p)
    assert meta == {"a": "b"}
    for k, v in t.items():
        np.testing.assert_array_equal(back[k], v)


def test_bf16_travels_as_uint16_bits_with_its_dtype_name(tmp_path, rng):
    x = rng.standard_normal(33).astype(np.float32)
    bits = f32_to_bf16(x)
    p = str(tmp_path / "b.safetensors")
    save_safetensors(p, {"b": bits}, dtypes={"b": "BF16"})
    back, _ = load_safetensors(p)
    assert back.dtypes["b"] == "BF16" and back["b"].dtype == np.uint16
    np.testing.assert_array_equal(back["b"], bits)
    import torch
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_f32(back["b"]), ref)   # round-to-nearest-even as torch
    with safe_open(p, "pt") as f:
        np.testing.assert_array_equal(f.get_tensor("b").float().numpy(), ref)


def test_loaded_arrays_are_copy_on_write_and_keep_the_mapping_alive(tmp_path):
    p = tmp_path / "x.safetensors"
    save_safetensors(p, {"a": np.arange(6, dtype=np.float32)})
    before = p.read_bytes()
    t, _ = load_safetensors(p)
    a = t["a"]
    del t
    import gc
    gc.collect()
    a[0] = 42.0                      # writable, private
    assert a[0] == 42.0 and p.read_bytes() == before
    np.testing.assert_array_equal(load_safetensors(p)[0]["a"], np.arange(6, dtype=np.float32))


def test_names_and_metadata_with_escapes_round_trip_both_ways(tmp_path):
    names = ['q"uote', "back\\slash", "new\nline", "tab\t", "ünï", "emoji 🚀", "ctl\x01"]
    t = {n: np.full(2, i, np.float32) for i, n in enumerate(names)}
    meta = {"k\"ey": "v\\al\n", "ü": "🚀"}
    p = str(tmp_path / "x.safetensors")
    save_safetensors(p, t, meta)
    back, m = load_safetensors(p)
    assert set(back) == set(names) and m["k\"ey"] == "v\\al\n" and m["ü"] == "🚀"
    ref = stn.load_file(p)
    assert set(ref) == set(names)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(OSError, match="nope"):
        _C.safetensors_load(str(tmp_path / "nope"))


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1, -9])
def test_truncated_file_is_refused_with_its_name(tmp_path, rng, keep):
    p = tmp_path / "ckpt.safetensors"
    save_safetensors(p, sample(rng))
    b = p.read_bytes()
    p.write_bytes(b[:keep] if keep >= 0 else b[:len(b) + keep])
    with pytest.raises(ValueError, match="ckpt.safetensors"):
        load_safetensors(p)


def test_flipped_data_bit_is_a_crc_mismatch_naming_the_tensor(tmp_path, rng):
    p = tmp_path / "ckpt.safetensors"
    t = sample(rng)
    save_safetensors(p, t)
    back, _ = load_safetensors(p)
    off = 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]
    hdr = json.loads(p.read_bytes()[8:off])
    begin = hdr["w"]["data_offsets"][0]
    del back
    b = bytearray(p.read_bytes())
    b[off + begin + 5] ^= 0x10
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"ckpt.safetensors: tensor 'w' CRC mismatch"):
        load_safetensors(p)
    assert load_safetensors(p, verify=False)[0]["w"].shape == (3, 5)


def test_every_single_bit_flip_in_the_header_is_refused_or_harmless(tmp_path, rng):
    """Fuzz the parser and validator: no flip may crash, hang or yield
    tensors or metadata that differ from the original without an error."""
    p = tmp_path / "x.safetensors"
    t = {"a": np.arange(4, dtype=np.float32), "bb": np.arange(3, dtype=np.int64)}
    meta = {"config": '{"dim": 64}', "step": "12"}
    save_safetensors(p, t, meta)
    good = p.read_bytes()
    n = 8 + struct.unpack("<Q", good[:8])[0]
    for byte in range(n):
        for bit in range(8):
            b = bytearray(good)
            b[byte] ^= 1 << bit
            p.write_bytes(bytes(b))
            try:
                back, m = load_safetensors(p)
            except ValueError as e:
                assert "x.safetensors" in str(e)
                continue
            assert set(back) == set(t), (byte, bit)
            assert {k: v for k, v in m.items() if not k.startswith("crc32:")} == meta, (byte, bit)
            for k in t:
                np.testing.assert_array_equal(back[k], t[k])


BAD_HEADERS = [
    ("not json", b"hello   ", "not a safetensors file"),
    ("bad token", b'{"a":tru}', "header JSON: unexpected character at byte 5"),
    ("trailing", b'{"a":1} x', "header JSON: trailing characters"),
    ("unterminated", b'{"a', "unterminated string"),
    ("deep", b'{"a":' + b"[" * 200 + b"]" * 200 + b"}", "nesting too deep"),
    ("lone surrogate", b'{"\\ud800":{}}', "surrogate"),
    ("bad utf8", b'{"\xff":{}}', "invalid UTF-8"),
    ("leading zero", b'{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}', "leading zero"),
    ("array top", b"[]", "does not start with '{'"),
    ("tensor not object", b'{"a":[]}', "tensor 'a': expected an object, got array"),
]


@pytest.mark.parametrize("name,header,msg", BAD_HEADERS, ids=[b[0] for b in BAD_HEADERS])
def test_malformed_header_json_is_refused_with_position(tmp_path, name, header, msg):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match=msg) as e:
        load_safetensors(p)
    assert "bad.safetensors" in str(e.value)


def f32(begin, end, shape):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


BAD_LAYOUTS = [
    ("outside", {"a": f32(0, 32, [8])}, 16, "outside the 16 bytes of data"),
    ("size", {"a": f32(0, 16, [3])}, 16, "span 16 bytes but its shape and dtype F32 need 12"),
    ("overlap", {"a": f32(0, 8, [2]), "b": f32(4, 12, [2])}, 12, "overlap"),
    ("hole", {"a": f32(0, 4, [1]), "b": f32(8, 12, [1])}, 12, "belong to no tensor"),
    ("tail", {"a": f32(0, 4, [1])}, 8, "indexes 4 bytes of data but the file holds 8"),
    ("dtype", {"a": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype 'F31'"),
    ("negative", {"a": f32(0, 4, [-1])}, 4, "shape\\[0\\] is not a non-negative integer"),
    ("backwards", {"a": f32(4, 0, [0])}, 4, "run backwards"),
    ("meta", {"__metadata__": {"k": 1}}, 0, "metadata 'k' must be a string"),
    ("crc without header crc", {"__metadata__": {"crc32:a": "00000000"}, "a": f32(0, 4, [1])}, 4,
     "header CRC 'crc32:__header__' is missing"),
    ("bad crc", {"__metadata__": {"crc32:a": "0000zz00"}, "a": f32(0, 4, [1])}, 4, "not 8 hex digits"),
    ("crc ghost", {"__metadata__": {"crc32:zz": "00000000"}, "a": f32(0, 4, [1])}, 4, "no such tensor"),
    ("field", {"a": {**f32(0, 4, [1]), "extra": 1}}, 4, "unknown field 'extra'"),
]


@pytest.mark.parametrize("name,header,n_data,msg", BAD_LAYOUTS, ids=[b[0] for b in BAD_LAYOUTS])
def test_inconsistent_header_is_refused_naming_the_tensor(tmp_path, name, header, n_data, msg):
    p = tmp_path / "bad.safetensors"
    write_raw(p, header, b"\x01" * n_data)
    with pytest.raises(ValueError, match=msg):
        load_safetensors(p)


def test_duplicate_keys_and_huge_header_length_are_refused(tmp_path):
    p = tmp_path / "dup.safetensors"
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(ValueError, match="'a' appears twice"):
        load_safetensors(p)
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(ValueError, match="header length .* exceeds"):
        load_safetensors(p)


def many_tensors(path, n, *, dup=False, overlap=False):
    """n one-byte tensors t0..t{n-1}, laid out in order; `dup` appends a
    second 't0' at the far end, `overlap` points the last one at t0's byte."""
    body = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    if dup:
        body += ',"t0":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    if overlap:
        body = body.replace(f'"data_offsets":[{n - 1},{n}]', '"data_offsets":[0,1]')
    h = ("{" + body + "}").encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + bytes(n))
    return path


def test_header_validation_is_n_log_n_in_the_tensor_count(tmp_path):
    """Duplicate, overlap and hole checks sort the names and extents; they
    compared all pairs, which took minutes for 200,000 tensors (timings
    across sizes: benchmarks/bench_io.py)."""
    n = 200_000
    _, items = _C.safetensors_load(many_tensors(tmp_path / "ok.safetensors", n))
    assert len(items) == n and items[-1][0] == f"t{n - 1}" and bytes(items[-1][3]) == b"\0"
    assert_n_log_n(lambda k: lambda p=many_tensors(tmp_path / f"{k}.safetensors", k): _C.safetensors_load(p),
                   n, "safetensors header validation")
    for kind, msg in (("dup", "'t0' appears twice in the header"),
                      ("overlap", f"tensors 't0' and 't{n - 1}' overlap")):
        p = many_tensors(tmp_path / f"{kind}.safetensors", n, **{kind: True})
        with pytest.raises(ValueError, match=f"{kind}.safetensors: {msg}"):
            _C.safetensors_load(p)


def test_many_tensors_with_crcs_round_trip(tmp_path):
    """Our writer's name checks, the header CRC and the per-tensor CRC lookup
    over 50,000 tensors (each was a scan over all names)."""
    n = 50_000
    tensors = {f"layer.{i}.w": np.full(2, i, np.int32) for i in range(n)}
    p = tmp_path / "many.safetensors"
    save_safetensors(p, tensors)
    meta, items = _C.safetensors_load(p, verify=True)
    assert len(items) == n and len(meta) == n + 1

    def saved(k):
        q = tmp_path / f"many{k}.safetensors"
        save_safetensors(q, {f"layer.{i}.w": np.full(2, i, np.int32) for i in range(k)})
        return lambda: _C.safetensors_load(q, verify=True)
    assert_n_log_n(saved, n, "load and CRC checks")
    got, _ = load_safetensors(p)
    np.testing.assert_array_equal(got[f"layer.{n - 1}.w"], [n - 1, n - 1])
    with pytest.raises(ValueError, match="tensor name 'a' given twice"):
        _C.safetensors_save(str(tmp_path / "d.safetensors"), [("a", "U8", [1], b"x")] * 2)


def existing(tmp_path):
    p = tmp_path / "keep.safetensors"
    save_safetensors(p, {"a": np.ones(4, np.float32)})
    return p, p.read_bytes()


def test_failed_write_midway_leaves_the_old_file_and_no_temp(tmp_path):
    p, before = existing(tmp_path)
    big = np.zeros(1 << 16, np.float32)
    # the third tensor's data is not a buffer: two tensors are already written
    with pytest.raises(TypeError, match="tensor 'c'"):
        _C.safetensors_save(str(p), [("a", "F32", big.shape, big), ("b", "F32", big.shape, big),
                                     ("c", "F32", (4,), object())], {})
    # wrong byte count for the second tensor
    with pytest.raises(ValueError, match="tensor 'b': buffer holds 8 bytes"):
        _C.safetensors_save(str(p), [("a", "F32", big.shape, big), ("b", "F32", (4,), b"12345678")])
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def test_bad_arguments_never_create_a_file(tmp_path):
    p, before = existing(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        save_safetensors(p, {"a": np.ones(1, np.float32)}, {"crc32:a": "x"})
    with pytest.raises(ValueError, match="__metadata__"):
        save_safetensors(p, {"__metadata__": np.ones(1, np.float32)})
    with pytest.raises(TypeError, match="cannot store"):
        save_safetensors(p, {"a": np.ones(1, np.complex64)})
    with pytest.raises(OSError, match="no/such/dir"):
        save_safetensors(tmp_path / "no/such/dir/x.safetensors", {"a": np.ones(1, np.float32)})
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda s: "\0" not in s
                                                                and s != "__metadata__"),
                       st.tuples(st.sampled_from(["float32", "float16", "int64", "uint8", "int32"]),
                                 st.lists(st.integers(0, 4), max_size=3)),
                       max_size=5))
def test_random_tensor_sets_round_trip_through_both_readers(tmp_path_factory, spec):
    d = tmp_path_factory.mktemp("h")
    rng = np.random.default_rng(0)
    t = {k: (rng.standard_normal(s) * 100).astype(dt) for k, (dt, s) in spec.items()}
    p = str(d / "r.safetensors")
    save_safetensors(p, t)
    back, _ = load_safetensors(p)
    ref = stn.load_file(p)
    for k, v in t.items():
        np.testing.assert_array_equal(back[k], v)
        np.testing.assert_array_equal(ref[k], v)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_header_bytes_never_crash(tmp_path_factory, header):
    p = tmp_path_factory.mktemp("f") / "f.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    try:
        load_safetensors(p)
    except ValueError:
        pass


def test_name_table_maps_every_model_tensor_both_ways():
    import smedjan
    m = smedjan.Model(smedjan.Config(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                     vocab_size=64, max_seq_len=16))
    hf = {to_hf_name(n) for n in m.params}
    assert "model.embed_tokens.weight" in hf and "model.norm.weight" in hf
    assert "model.layers.1.self_attn.q_proj.weight" in hf and "model.layers.0.mlp.down_proj.weight" in hf
    assert "model.layers.1.post_attention_layernorm.weight" in hf
    gg = {to_gguf_name(n) for n in m.params}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_output.weight",
            "blk.0.ffn_gate.weight", "blk.1.ffn_norm.weight"} <= gg
    for n in m.params:
        assert from_hf_name(to_hf_name(n)) == n and from_gguf_name(to_gguf_name(n)) == n
    # the untied head and the qk-norm gains have their rows too
    assert from_hf_name("lm_head.weight") == from_gguf_name("output.weight") == "lm_head"
    assert to_gguf_name("layers.2.q_norm") == "blk.2.attn_q_norm.weight"
    assert to_hf_name("layers.2.k_norm") == "model.layers.2.self_attn.k_norm.weight"
    for bad in ("model.layers.0.self_attn.rotary_emb.inv_freq", "layers.01.wq", "layers.x.wq"):
        with pytest.raises(KeyError):
            from_hf_name(bad) if bad.startswith("model.") else to_hf_name(bad)
