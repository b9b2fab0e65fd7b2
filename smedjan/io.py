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


# ---- names: the engine's one table (csrc/io/names.c) --------------------------
#
# Rows (ours, Hugging Face Llama, GGUF, per_layer, rope_rows); a per-layer row
# spells what follows "layers.{i}.", "model.layers.{i}." or "blk.{i}.".
# Hugging Face q_proj/k_proj rows are in rotate-half order (ours): they copy
# directly. GGUF files of architecture llama hold the rope_rows tensors'
# rows permuted for interleaved RoPE; the engine's GGUF reader and writer
# (un)permute them.
NAME_TABLE = _C.tensor_names()
LAYER_NAMES = tuple((ours, hf, gguf) for ours, hf, gguf, per_layer, _ in NAME_TABLE if per_layer)
GLOBAL_NAMES = tuple((ours, hf, gguf) for ours, hf, gguf, per_layer, _ in NAME_TABLE if not per_layer)


def to_hf_name(name: str) -> str:
    """Our tensor name -> Hugging Face Llama name.

    >>> to_hf_name("layers.3.wq")
    'model.layers.3.self_attn.q_proj.weight'
    """
    return _C.tensor_name(name, "ours", "hf")


def to_gguf_name(name: str) -> str:
    """Our tensor name -> GGUF name.

    >>> to_gguf_name("layers.0.w_down")
    'blk.0.ffn_down.weight'
    """
    return _C.tensor_name(name, "ours", "gguf")


def from_hf_name(name: str) -> str:
    """Hugging Face Llama name -> ours (KeyError for names we lack).

    >>> from_hf_name("model.layers.2.mlp.up_proj.weight")
    'layers.2.w_up'
    """
    return _C.tensor_name(name, "hf", "ours")


def from_gguf_name(name: str) -> str:
    """GGUF name -> ours.

    >>> from_gguf_name("blk.1.attn_k.weight")
    'layers.1.wk'
    """
    return _C.tensor_name(name, "gguf", "ours")


def tensor_names(n_layers: int) -> list:
    """Every name of ours for n_layers, in the table's order: the globals
    before the per-layer rows, each layer's rows, the globals after.

    >>> tensor_names(1)[:3]
    ['tok_emb', 'layers.0.attn_norm', 'layers.0.wq']
    """
    first = next(i for i, r in enumerate(NAME_TABLE) if r[3])
    layer = [r[0] for r in NAME_TABLE if r[3]]
    return ([r[0] for r in NAME_TABLE[:first] if not r[3]] +
            [f"layers.{i}.{x}" for i in range(n_layers) for x in layer] +
            [r[0] for r in NAME_TABLE[first:] if not r[3]])


# The untied output head.
HF_LM_HEAD = to_hf_name("lm_head")
GGUF_OUTPUT = to_gguf_name("lm_head")


def write_text_atomic(path, text: str) -> None:
    """Write a small text file (JSON, TOML) so that it appears under `path`
    only when complete: "<path>.tmp.<pid>", fsync, rename (the engine's
    atomic writer does the same for binary files)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["save_safetensors", "load_safetensors", "write_text_atomic", "TensorDict", "bf16_to_f32", "f32_to_bf16",
           "to_float32", "to_hf_name", "from_hf_name", "to_gguf_name", "from_gguf_name",
           "tensor_names", "NAME_TABLE", "LAYER_NAMES", "GLOBAL_NAMES", "HF_LM_HEAD", "GGUF_OUTPUT"]
