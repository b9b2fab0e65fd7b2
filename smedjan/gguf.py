"""GGUF files: read (metadata, tensors as zero-copy NumPy views of a
read-only mapping, the embedded GPT-2-style BPE tokenizer) and write (F32,
Q8_0, Q4_0 with tokenizer metadata, loadable by llama.cpp).

The C reader checks every count, length, type, dimension and offset against
the file before use: a malformed file raises ValueError naming the file and
the key or tensor, never reads out of bounds.

>>> # f = read_gguf("model.gguf"); f.kv["llama.block_count"], f.tensors["token_embd.weight"].shape
"""
from __future__ import annotations

import os
import re
import unicodedata
from typing import Dict, List, Optional

import numpy as np

from . import _C
from .io import tensor_names
from .tokenizer import Tokenizer, _from_bytelevel

# tensor types (ggml_type) and metadata value types (gguf_type)
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16"}
_BLOCK = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}
U8, I8, U16, I16, U32, I32, F32V, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


class GGUFFile:
    """A parsed GGUF file: `kv` (key -> value), `kv_types`, `tensors`
    (name -> raw NumPy array of its bytes, or of F32/F16 values, shaped
    rows-first like NumPy: GGUF [ne0, ne1] -> (ne1, ne0)), `types` (name -> ggml type)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(2, f"{self.path}: no such file", self.path)
        owner, self.version, self.kv, self.kv_types, rows = _C.gguf_open(self.path)
        self._owner = owner
        buf = memoryview(owner) if rows else None
        self.tensors: Dict[str, np.ndarray] = {}
        self.types: Dict[str, int] = {}
        self.shapes: Dict[str, tuple] = {}
        for name, ty, shape, off, nbytes in rows:
            raw = np.frombuffer(buf[off:off + nbytes], dtype=np.uint8)
            np_shape = tuple(reversed(shape))
            if ty == F32:
                arr = raw.view("<f4").reshape(np_shape)
            elif ty == F16:
                arr = raw.view("<f2").reshape(np_shape)
            elif ty == BF16:
                arr = raw.view("<u2").reshape(np_shape)
            else:
                be, bb = _BLOCK[ty]
                arr = raw.reshape(*np_shape[:-1], np_shape[-1] // be * bb)
            self.tensors[name] = arr
            self.types[name] = ty
            self.shapes[name] = np_shape

    def dequantize(self, name: str) -> np.ndarray:
        """A tensor as float32, in NumPy shape order (engine's dequantiser)."""
        n = int(np.prod(self.shapes[name]))
        out = _C.gguf_dequantize(self.types[name], self.tensors[name], n)
        return np.frombuffer(out, np.float32).reshape(self.shapes[name])

    def tokenizer(self) -> "Tokenizer":
        return tokenizer_from_gguf(self)


def read_gguf(path) -> GGUFFile:
    """Open and validate a GGUF file (see GGUFFile)."""
    return GGUFFile(path)


# ---- tokenizer ----------------------------------------------------------------

# Pre-tokenizers (tokenizer.ggml.pre) we reproduce exactly: GPT-2's regex, and
# SmolLM / StarCoder's (every Unicode number character split off first, then
# GPT-2's regex: Hugging Face's Sequence[Digits(individual_digits), ByteLevel]).
_PRE_GPT2 = {"default", "gpt2", "gpt-2"}
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell"}
_num_re = None


def _numbers_re():
    global _num_re
    if _num_re is None:
        import sys
        ranges, start, prev = [], None, None
        for cp in range(sys.maxunicode + 1):
            if unicodedata.category(chr(cp))[0] == "N":
                if start is None:
                    start = cp
                elif cp != prev + 1:
                    ranges.append((start, prev))
                    start = cp
                prev = cp
        ranges.append((start, prev))
        cls = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                      for a, b in ranges)
        _num_re = re.compile(f"([{cls}])")
    return _num_re


class GGUFTokenizer(Tokenizer):
    """A GGUF file's byte-level BPE, encoding exactly as Hugging Face
    tokenizers does with the same vocabulary and merges:

    - split_digits (SmolLM2, StarCoder: tokenizer.ggml.pre "smollm" ...):
      every Unicode number character is isolated before GPT-2's regex
      (HF's Sequence[Digits(individual_digits=True), ByteLevel]); each
      segment is encoded on its own.
    - single bytes missing from the vocabulary (SmolLM2 lacks a few control
      bytes) get ids past the model's vocabulary inside the engine so any
      text encodes, and are dropped from the output, as HF's BPE without an
      unk token drops them."""

    split_digits = False
    n_model_vocab: Optional[int] = None

    def encode(self, text, *, allowed_special="all", disallowed_special="all") -> np.ndarray:
        kw = dict(allowed_special=allowed_special, disallowed_special=disallowed_special)
        if self.split_digits:
            if isinstance(text, bytes):
                text = text.decode("utf-8", "surrogateescape")
            parts = [p for p in _numbers_re().split(text) if p]
            if len(parts) > 1:
                ids = np.concatenate(super().encode_batch(parts, **kw)).astype(np.int32, copy=False)
            else:
                ids = super().encode(text, **kw)
        else:
            ids = super().encode(text, **kw)
        if self.n_model_vocab is not None and ids.size and ids.max() >= self.n_model_vocab:
            ids = ids[ids < self.n_model_vocab]
        return ids

    def encode_batch(self, texts, *, allowed_special="all", disallowed_special="all") -> list:
        return [self.encode(t, allowed_special=allowed_special,
                            disallowed_special=disallowed_special) for t in texts]

    @property
    def vocab_size(self) -> int:
        return self.n_model_vocab if self.n_model_vocab is not None else super().vocab_size

    def __len__(self) -> int:
        return self.vocab_size


DigitSplitTokenizer = GGUFTokenizer   # (name kept for readers of older notes)


def tokenizer_from_gguf(f: GGUFFile) -> Tokenizer:
    """The GPT-2-style BPE tokenizer embedded in a GGUF file
    (tokenizer.ggml.model == "gpt2"); control and user-defined tokens are
    special (never split). ValueError for other tokenizer kinds."""
    kv = f.kv
    model = kv.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{f.path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) "
                         "is supported")
    pre = kv.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_GPT2 | _PRE_DIGITS:
        raise ValueError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not supported (gpt2 and "
                         f"{sorted(_PRE_DIGITS)} are)")
    toks = kv.get("tokenizer.ggml.tokens")
    merges = kv.get("tokenizer.ggml.merges")
    if not isinstance(toks, list) or not isinstance(merges, list):
        raise ValueError(f"{f.path}: tokenizer.ggml.tokens / merges are missing")
    types = kv.get("tokenizer.ggml.token_type") or [1] * len(toks)
    if len(types) != len(toks):
        raise ValueError(f"{f.path}: token_type has {len(types)} entries for {len(toks)} tokens")
    tokens, special, index = [], [], {}
    for i, (s, ty) in enumerate(zip(toks, types)):
        if not isinstance(s, str):
            raise ValueError(f"{f.path}: token {i} is not valid UTF-8")
        index.setdefault(s, i)
        if ty in (3, 4):
            tokens.append(s.encode("utf-8"))
            special.append(True)
        else:
            tokens.append(_from_bytelevel(s, f.path))
            special.append(False)
    n_model = len(tokens)
    have = {t for t, sp in zip(tokens, special) if not sp and len(t) == 1}
    for b in range(256):
        if bytes([b]) not in have:
            tokens.append(bytes([b]))
            special.append(False)
    pairs = []
    for r, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2 or parts[0] not in index or parts[1] not in index:
            raise ValueError(f"{f.path}: merge {r} ({m!r}) is malformed or names an unknown token")
        pairs.append((index[parts[0]], index[parts[1]]))
    tok = GGUFTokenizer(_C.Tokenizer(tokens, special, pairs))
    tok.split_digits = pre in _PRE_DIGITS
    tok.n_model_vocab = n_model if len(tokens) > n_model else None
    tok.bos_id = kv.get("tokenizer.ggml.bos_token_id")
    tok.eos_id = kv.get("tokenizer.ggml.eos_token_id")
    tok.pre = pre
    return tok


# ---- writer --------------------------------------------------------------------

def _kv(key, value, vtype=None):
    """One metadata entry pre-encoded for _C.gguf_save."""
    import struct
    if isinstance(value, bool):
        return (key, BOOL, -1, struct.pack("<?", value))
    if isinstance(value, str):
        return (key, STRING, -1, value.encode("utf-8"))
    if isinstance(value, int):
        t = vtype if vtype is not None else U32
        fmt = {U32: "<I", I32: "<i", U64: "<Q", I64: "<q"}[t]
        return (key, t, -1, struct.pack(fmt, value))
    if isinstance(value, float):
        return (key, F32V, -1, struct.pack("<f", value))
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (str, bytes)):
            return (key, ARRAY, STRING, [v.encode("utf-8") if isinstance(v, str) else v for v in value])
        t = vtype if vtype is not None else I32
        dt = {I32: "<i4", F32V: "<f4", U32: "<u4"}[t]
        return (key, ARRAY, t, np.asarray(value, dt).tobytes())
    raise TypeError(f"metadata {key}: cannot store {type(value).__name__}")


def write_gguf(path, kvs: List[tuple], tensors: List[tuple]) -> None:
    """Low level: kvs from _kv(...), tensors (name, ggml type, GGUF shape
    [ne0, ne1], bytes). Written atomically (temp file + rename)."""
    _C.gguf_save(os.fspath(path), kvs, tensors)


def tokenizer_kvs(tok: Tokenizer, pre: Optional[str] = None) -> List[tuple]:
    """tokenizer.ggml.* entries for a byte-level BPE tokenizer."""
    from .tokenizer import _to_bytelevel
    names, types = [], []
    specials = set(tok.special_tokens.values())
    for i in range(tok.vocab_size):   # a GGUFTokenizer's extra byte tokens are not written
        b = tok.id_to_token(i)
        if i in specials:
            names.append(b.decode("utf-8", "surrogateescape"))
            types.append(3)
        else:
            names.append(_to_bytelevel(b))
            types.append(1)
    merges = [f"{_to_bytelevel(a)} {_to_bytelevel(b)}" for a, b in tok.merges()]
    if pre is None:
        pre = getattr(tok, "pre", None) or ("smollm" if getattr(tok, "split_digits", False) else "gpt2")
    out = [_kv("tokenizer.ggml.model", "gpt2"), _kv("tokenizer.ggml.pre", pre),
           _kv("tokenizer.ggml.tokens", names), _kv("tokenizer.ggml.token_type", types, I32),
           _kv("tokenizer.ggml.merges", merges)]
    for key, attr in (("bos", "bos_id"), ("eos", "eos_id")):
        v = getattr(tok, attr, None)
        if v is None and key == "eos":
            v = tok.eot_id
        if v is not None:
            out.append(_kv(f"tokenizer.ggml.{key}_token_id", int(v)))
    out.append(_kv("tokenizer.ggml.add_bos_token", False))
    return out


__all__ = ["GGUFFile", "read_gguf", "tokenizer_from_gguf", "GGUFTokenizer", "write_gguf",
           "tokenizer_kvs", "export_gguf", "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "TYPE_NAMES"]


def _kv_typed(key, value, vtype, arr_type):
    """Re-encode a value read from a GGUF file with its original types."""
    import struct
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}
    if vtype == STRING:
        return (key, STRING, -1, value.encode("utf-8") if isinstance(value, str) else bytes(value))
    if vtype == ARRAY:
        if arr_type == STRING:
            return (key, ARRAY, STRING, [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value])
        return (key, ARRAY, arr_type, b"".join(struct.pack(fmt[arr_type], v) for v in value))
    return (key, vtype, -1, struct.pack(fmt[vtype], value))


_FILE_TYPE = {F32: 0, Q8_0: 7, Q4_0: 2}
# Config fields at the values a llama GGUF implies (an untied head is output.weight)
_OPTIONS_OFF = dict(rope_scaling=None, paired_heads=False, value_mix=0.0, embed_skip=0.0,
                    mixer="attention", ffn="swiglu", qk_norm="none", window=0)


def export_gguf(m, path, type: str = "q8_0", *, tokenizer=None, name: str = "smedjan") -> None:
    """Write an InferenceModel (or a smedjan Model, taken at fp32) as a
    llama.cpp-loadable GGUF (architecture llama): type "f32", "q8_0" or
    "q4_0" for the layer matrices (q4_0 keeps the embedding / output at
    Q8_0), norms F32, attn_q/attn_k rows permuted as llama.cpp's converter
    stores them, and the tokenizer: copied verbatim from the source GGUF when
    the model came from one, else written from `tokenizer` (or the model's)."""
    from .infer import InferenceModel
    on = [k for k, off in _OPTIONS_OFF.items() if getattr(m.config, k, off) != off]
    if on:
        raise ValueError(f"export_gguf: a llama GGUF has no way to say {on[0]}="
                         f"{getattr(m.config, on[0])!r}; only models without it export")
    if not isinstance(m, InferenceModel):
        tok_ = tokenizer if tokenizer is not None else getattr(m, "tokenizer", None)
        m = InferenceModel.from_model(m, "fp32")
        m.tokenizer = tok_
    t = {"f32": F32, "q8_0": Q8_0, "q8": Q8_0, "q4_0": Q4_0, "q4": Q4_0}.get(type.lower())
    if t is None:
        raise ValueError(f"export type must be f32, q8_0 or q4_0, got {type!r}")
    c, h = m.config, m._h
    emb_t = Q8_0 if t == Q4_0 else t
    kvs = [_kv("general.architecture", "llama"), _kv("general.name", name),
           _kv("general.file_type", _FILE_TYPE[t]), _kv("general.quantization_version", 2),
           _kv("llama.context_length", int(c.max_seq_len)), _kv("llama.embedding_length", c.dim),
           _kv("llama.block_count", c.n_layers), _kv("llama.feed_forward_length", c.ffn_dim),
           _kv("llama.attention.head_count", c.n_heads),
           _kv("llama.attention.head_count_kv", c.n_kv_heads),
           _kv("llama.rope.freq_base", float(c.rope_theta)),
           _kv("llama.attention.layer_norm_rms_epsilon", float(c.norm_eps)),
           _kv("llama.rope.dimension_count", c.dim // c.n_heads), _kv("llama.vocab_size", c.vocab_size)]
    src = read_gguf(m.source) if getattr(m, "source", "") else None
    if src is not None and "tokenizer.ggml.tokens" in src.kv:
        kvs += [_kv_typed(k, v, *src.kv_types[k]) for k, v in src.kv.items() if k.startswith("tokenizer.")]
    else:
        tk = tokenizer if tokenizer is not None else m.tokenizer
        if tk is not None:
            kvs += tokenizer_kvs(tk)
    tensors = []
    for ours in tensor_names(c.n_layers):
        try:   # the embedding and an untied head keep 8 bits at q4_0, as llama.cpp's files
            data, typ, shape = h.weight_gguf(ours, emb_t if ours in ("tok_emb", "lm_head") else t)
        except KeyError:
            continue                     # a tensor this model has not (a tied head, qk-norm)
        tensors.append((_C.tensor_name(ours, "ours", "gguf"), typ, shape, data))
    write_gguf(path, kvs, tensors)

