"""Model configuration: presets, custom shapes, exact parameter counts."""
from __future__ import annotations

import dataclasses
from typing import Optional

from . import _C


@dataclasses.dataclass(frozen=True)
class Config:
    """Shape of a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU, tied head).

    >>> Config.preset("small").dim
    256
    """
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 8192
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        _C.param_count(self.to_dict())   # validates; ValueError names the field

    @classmethod
    def preset(cls, name: str, vocab_size: int = 8192, **overrides) -> "Config":
        """A named preset (tiny, small, medium, large, xl, max, huge, 8b)."""
        d = _C.preset(name, vocab_size)
        d["rope_theta"] = 10000.0
        d["norm_eps"] = 1e-5
        d.update(overrides)
        return cls(**d)

    @classmethod
    def custom(cls, dim: int, n_layers: int, n_heads: int, n_kv_heads: Optional[int] = None,
               ffn_mult: float = 2.67, vocab_size: int = 8192, max_seq_len: int = 2048,
               **kw) -> "Config":
        """Any shape; SwiGLU hidden = ceil(trunc(ffn_mult * dim) / 256) * 256."""
        return cls(dim=dim, n_layers=n_layers, n_heads=n_heads,
                   n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads,
                   ffn_dim=_C.ffn_dim_for(dim, ffn_mult), vocab_size=vocab_size,
                   max_seq_len=max_seq_len, **kw)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        """Exact parameter count (the tied head counted once)."""
        return _C.param_count(self.to_dict())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = tuple(_C.preset_names())


def sizes(vocab_size: int = 8192) -> list:
    """Exact parameter counts of every preset at a vocabulary size.

    >>> [s["params"] for s in sizes(8192)][:2]
    [2098304, 7212288]
    """
    rows = []
    for name in PRESETS:
        c = Config.preset(name, vocab_size)
        rows.append(dict(name=name, dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                         n_kv_heads=c.n_kv_heads, ffn_dim=c.ffn_dim,
                         max_seq_len=c.max_seq_len, params=c.n_params))
    return rows


def format_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(n)
