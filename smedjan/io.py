"""Tensor files and names: safetensors read/write over the engine's checked,
atomic container code, bf16/f16 conversions, and the ONE table that maps
smedjan's tensor names to Hugging Face Llama and GGUF names.

Loaded arrays are zero-copy views into a private copy-on-write mapping of
the file: writable, never written back, and they keep the mapping alive.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
>>> save_safetensors(p, {"w": np.ones((2, 3), np.float32)}, {"note": "hi"})
>>> t, meta = load_safetensors(p)
>>> t["w"].shape, meta["note"], t.dtypes["w"]
((2, 3), 'hi', 'F32')
"""
from __future__ import annotations

import gc
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from . import _C

# numpy dtype <-> safetensors dtype name. BF16 has no numpy dtype: it travels
# as uint16 bit patterns, named "BF16" through `dtypes=` / TensorDict.dtypes.
_NP_TO_ST = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
_ST_TO_NP = {v: k for k, v in _NP_TO_ST.items()}
_ST_TO_NP.update({"BF16": np.dtype(np.uint16), "F8_E5M2": np.dtype(np.uint8),
                  "F8_E4M3": np.dtype(np.uint8)})
_BITS_ONLY = {"BF16": np.dtype(np.uint16), "F8_E5M2": np.dtype(np.uint8), "F8_E4M3": np.dtype(np.uint8)}


class TensorDict(dict):
    """A dict name -> np.ndarray that also knows each tensor's file dtype
    (`.dtypes[name]`, e.g. "BF16" for a uint16 array of bf16 bits)."""

    def __init__(self, *a, dtypes: Optional[Dict[str, str]] = None, **kw):
        super().__init__(*a, **kw)
        self.dtypes: Dict[str, str] = dict(dtypes or {})


def save_safetensors(path, tensors: Mapping[str, np.ndarray],
                     metadata: Optional[Mapping[str, str]] = None, *,
                     dtypes: Optional[Mapping[str, str]] = None) -> None:
    """Write tensors to a safetensors file, atomically (temp file, fsync,
    rename): an existing file at path survives any failure untouched.

    A "crc32:<name>" metadata entry is added per tensor. `dtypes` names a
    file dtype where NumPy has none: {"w": "BF16"} for a uint16 array of
    bf16 bits. Tensors are laid out by descending element size so that every
    tensor's data is aligned in the file.

    >>> import tempfile, os
    >>> save_safetensors(os.path.join(tempfile.mkdtemp(), "x.safetensors"),
    ...                  {"b": f32_to_bf16(np.ones(4, np.float32))}, dtypes={"b": "BF16"})
    """
    dtypes = dict(dtypes or {})
    if isinstance(tensors, TensorDict):
        dtypes = {**tensors.dtypes, **dtypes}
    rows = []
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{os.fspath(path)}: tensor names must be str, got {name!r}")
        a = np.asarray(arr)
        st = dtypes.get(name)
        if st is None:
            st = _NP_TO_ST.get(a.dtype.newbyteorder("=") if a.dtype.byteorder == ">" else a.dtype)
            if st is None:
                raise TypeError(f"{os.fspath(path)}: tensor '{name}' has dtype {a.dtype}, which "
                                "safetensors cannot store")
        elif st in _BITS_ONLY:
            if a.dtype != _BITS_ONLY[st]:
                raise TypeError(f"{os.fspath(path)}: tensor '{name}' declared {st} must be a "
                                f"{_BITS_ONLY[st]} array of its bits, got {a.dtype}")
        elif st not in _ST_TO_NP or _ST_TO_NP[st] != a.dtype.newbyteorder("="):
            raise TypeError(f"{os.fspath(path)}: tensor '{name}' declared {st} but has dtype {a.dtype}")
        shape = a.shape   # before ascontiguousarray, which makes 0-d arrays 1-d
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        rows.append((name, st, shape, a))
    rows.sort(key=lambda r: -_C.st_dtype_size(r[1]))   # stable: keeps caller order within a size
    meta = {} if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    _C.safetensors_save(path, [(n, st, shape, a) for n, st, shape, a in rows], meta)


def load_safetensors(path, *, verify: bool = True) -> Tuple[TensorDict, Dict[str, str]]:
    """Read a safetensors file (ours or anyone's): (tensors, metadata).

    Every size and offset is checked against the file, and each
    "crc32:<name>" entry present is verified (verify=False skips that).
    Arrays are zero-copy, writable copy-on-write views; BF16 and F8 tensors
    come as unsigned-integer arrays of their bits, with `tensors.dtypes[name]`
    saying what they are (see bf16_to_f32). Errors name the file and tensor:
    OSError (FileNotFoundError) when it cannot be opened, ValueError when it
    is malformed, truncated or corrupt."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(2, f"{p}: no such file", p)
    meta, items = _C.safetensors_load(p, verify=verify)
    out = TensorDict()
    # No cycles are made here; with the GC on, a file of a million tensors
    # spends more time in collections over `items` than in this loop.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for name, st, shape, view in items:
            dt = _ST_TO_NP[st].newbyteorder("<")
            out[name] = np.frombuffer(view, dtype=dt).reshape(shape)
            out.dtypes[name] = st
    finally:
        if gc_was_on:
            gc.enable()
    return out, meta


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    b = np.asarray(bits, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def to_float32(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    """A float32 array from a loaded tensor of file dtype F32, F16, BF16 or F64."""
    if st_dtype == "BF16":
        return bf16_to_f32(arr)
    if st_dtype in ("F32", "F16", "F64"):
        return np.asarray(arr, dtype=np.float32)
    raise ValueError(f"cannot convert a {st_dtype} tensor to float32")


# ---- names: the one mapping table ---------------------------------------------
#
# (ours, Hugging Face Llama, GGUF) for each per-layer tensor, then the globals.
# Hugging Face q_proj/k_proj rows are already in rotate-half order (ours):
# copy them directly. GGUF files written by llama.cpp's converter store
# attn_q/attn_k rows permuted for interleaved RoPE; a GGUF reader/writer must
# (un)permute them — this table maps names only.
LAYER_NAMES = (
    ("attn_norm", "input_layernorm.weight", "attn_norm.weight"),
    ("wq", "self_attn.q_proj.weight", "attn_q.weight"),
    ("wk", "self_attn.k_proj.weight", "attn_k.weight"),
    ("wv", "self_attn.v_proj.weight", "attn_v.weight"),
    ("wo", "self_attn.o_proj.weight", "attn_output.weight"),
    ("ffn_norm", "post_attention_layernorm.weight", "ffn_norm.weight"),
    ("w_gate", "mlp.gate_proj.weight", "ffn_gate.weight"),
    ("w_up", "mlp.up_proj.weight", "ffn_up.weight"),
    ("w_down", "mlp.down_proj.weight", "ffn_down.weight"),
    ("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight"),
)
GLOBAL_NAMES = (
    ("tok_emb", "model.embed_tokens.weight", "token_embd.weight"),
    ("final_norm", "model.norm.weight", "output_norm.weight"),
    ("lm_head", "lm_head.weight", "output.weight"),   # untied heads only
)
HF_LM_HEAD = "lm_head.weight"
GGUF_OUTPUT = "output.weight"

_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(\w+)$")


def _table(col: int):
    g = {row[0]: row[col] for row in GLOBAL_NAMES}
    l = {row[0]: row[col] for row in LAYER_NAMES}
    return g, l


def to_hf_name(name: str) -> str:
    """Our tensor name -> Hugging Face Llama name.

    >>> to_hf_name("layers.3.wq")
    'model.layers.3.self_attn.q_proj.weight'
    """
    return _to(name, 1, "model.layers.{i}.{x}")


def to_gguf_name(name: str) -> str:
    """Our tensor name -> GGUF name.

    >>> to_gguf_name("layers.0.w_down")
    'blk.0.ffn_down.weight'
    """
    return _to(name, 2, "blk.{i}.{x}")


def _to(name: str, col: int, layer_fmt: str) -> str:
    g, l = _table(col)
    if name in g:
        return g[name]
    m = _OURS_LAYER.match(name)
    if m and m.group(2) in l:
        return layer_fmt.format(i=int(m.group(1)), x=l[m.group(2)])
    raise KeyError(f"no mapping for tensor name '{name}'")


def from_hf_name(name: str) -> str:
    """Hugging Face Llama name -> ours (KeyError for lm_head.weight and others we lack).

    >>> from_hf_name("model.layers.2.mlp.up_proj.weight")
    'layers.2.w_up'
    """
    return _from(name, 1, re.compile(r"^model\.layers\.(\d+)\.(.+)$"))


def from_gguf_name(name: str) -> str:
    """GGUF name -> ours.

    >>> from_gguf_name("blk.1.attn_k.weight")
    'layers.1.wk'
    """
    return _from(name, 2, re.compile(r"^blk\.(\d+)\.(.+)$"))


def _from(name: str, col: int, layer_re) -> str:
    g, l = _table(col)
    for ours, theirs in g.items():
        if theirs == name:
            return ours
    m = layer_re.match(name)
    if m:
        for ours, theirs in l.items():
            if theirs == m.group(2):
                return f"layers.{int(m.group(1))}.{ours}"
    raise KeyError(f"no smedjan tensor for '{name}'")


__all__ = ["save_safetensors", "load_safetensors", "TensorDict", "bf16_to_f32", "f32_to_bf16",
           "to_float32", "to_hf_name", "from_hf_name", "to_gguf_name", "from_gguf_name",
           "LAYER_NAMES", "GLOBAL_NAMES", "HF_LM_HEAD", "GGUF_OUTPUT"]
