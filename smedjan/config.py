"""Model configuration: presets, custom shapes, exact parameter counts."""
from __future__ import annotations

import dataclasses
import json
from typing import Optional, Union

from . import _C


LAYER_FIELDS = ("mixer", "ffn", "qk_norm", "window")


@dataclasses.dataclass(frozen=True)
class Config:
    """A decoder: its shape and its architecture options.

    Zero options is the Llama-style model (RMSNorm, RoPE, GQA, SwiGLU, tied
    head). Per-layer fields (mixer, ffn, qk_norm, window) take one value for
    every layer or a list repeated as a period: window=[1024, 1024, 1024, 0]
    gives every 4th layer the whole context, the rest a 1024-token window.

    >>> Config.preset("small").dim
    256
    >>> Config.preset("tiny", window=[64, 0]).window
    (64, 0, 64, 0)
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
    # None, or transformers' rope_scaling as smedjan spells it: {"type": "linear" |
    # "dynamic" | "yarn", "factor", "original_max_seq_len", yarn: "beta_fast",
    # "beta_slow", "attention_factor" (0: 0.1 ln(factor) + 1), "truncate"}
    rope_scaling: Optional[dict] = None
    tied_head: bool = True          # False: a separate lm_head
    paired_heads: bool = False      # seed 001: adjacent heads' q, k, v averaged
    value_mix: float = 0.0          # seed 001: v = (1 - a) v + a v of layer 0
    embed_skip: float = 0.0         # seed 001: each block's input += a * embedding
    mixer: Union[str, tuple] = "attention"
    ffn: Union[str, tuple] = "swiglu"           # or "relu2": relu(gate)^2 * up
    qk_norm: Union[str, tuple] = "none"         # "weighted" (Qwen3) or "plain" (no gains)
    window: Union[int, tuple] = 0               # sliding window in tokens; 0: all
    # None, or the mixture of experts of the layers whose ffn is "moe": {"n_experts",
    # "top_k", "expert_dim" (each expert's SwiGLU hidden), "n_shared" (shared experts:
    # one dense SwiGLU of hidden n_shared * expert_dim beside them), "router":
    # "softmax" (Mixtral, OLMoE; "norm_topk" renormalises the k weights) | "sigmoid"
    # (DeepSeek-V3: top-k on score + bias, weights normalised), "aux_loss" (switch
    # load-balancing coefficient), "z_loss" (router z-loss coefficient),
    # "bias_update_rate" (sigmoid: aux-loss-free balancing by a per-expert bias)}
    moe: Optional[dict] = None
    # The mla layers' sizes (mixer "mla", DeepSeek-V2/V3): {"q_lora_rank" (0: no q
    # bottleneck), "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    # "v_head_dim"}; left out, DeepSeek-V3's proportions to the head size. None
    # where no layer is mla.
    mla: Optional[dict] = None
    # Mamba-2 layers' shape (mixer "mamba2"): None, or {"d_state" (128), "d_conv" (4),
    # "expand" (2), "head_dim" (64), "n_groups" (1), "chunk_size" (64)}; the defaults
    # fill in wherever a layer is a Mamba-2 mixer
    ssm: Optional[dict] = None
    # linear attention layers (mixer "linear"): None, or {"feature": "identity" | "elu1",
    # "normalize": False, "decay": "none" | "gated", "chunk_size": 64}; defaults fill in
    # wherever a layer is a linear mixer
    linear: Optional[dict] = None

    def __post_init__(self):
        # The engine validates (ValueError names the field) and gives the
        # canonical form: a per-layer field is one value, or one per layer.
        canon = _C.config_canonical(self.to_dict())
        for k in LAYER_FIELDS:
            v = canon[k]
            object.__setattr__(self, k, tuple(v) if isinstance(v, list) else v)
        if self.rope_scaling is not None:   # defaults filled, the given values kept
            object.__setattr__(self, "rope_scaling", {**canon["rope_scaling"], **self.rope_scaling})
        if self.moe is not None:   # None where no layer is MoE
            object.__setattr__(self, "moe", canon["moe"] and {**canon["moe"], **self.moe})
        object.__setattr__(self, "mla", canon["mla"])
        object.__setattr__(self, "ssm", canon["ssm"])
        object.__setattr__(self, "linear", canon["linear"])

    def layer(self, i: int) -> dict:
        """Layer i's kinds: {"mixer", "ffn", "qk_norm", "window"}."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"layer {i} of {self.n_layers}")
        return {k: (v[i] if isinstance(v, tuple) else v)
                for k, v in ((k, getattr(self, k)) for k in LAYER_FIELDS)}

    @property
    def plain(self) -> bool:
        """True for the Llama-style model without options."""
        return self == dataclasses.replace(
            self, rope_scaling=None, tied_head=True, paired_heads=False, value_mix=0.0,
            embed_skip=0.0, mixer="attention", ffn="swiglu", qk_norm="none", window=0, mla=None,
            ssm=None, linear=None)

    @classmethod
    def preset(cls, name: str, vocab_size: int = 8192, **overrides) -> "Config":
        """A named preset (tiny, small, medium, large, xl, max, huge, 8b) with
        any fields overridden. Dynamic or YaRN RoPE scaling without an
        original_max_seq_len takes the preset's context as the original and
        extends max_seq_len by the factor."""
        d = _C.preset(name, vocab_size)
        d["rope_theta"] = 10000.0
        d["norm_eps"] = 1e-5
        rs = overrides.get("rope_scaling")
        if rs and rs.get("type") in ("dynamic", "yarn") and "original_max_seq_len" not in rs:
            # Scaling a preset extends its context: the preset's is the original.
            overrides["rope_scaling"] = {**rs, "original_max_seq_len": d["max_seq_len"]}
            overrides.setdefault("max_seq_len", int(d["max_seq_len"] * rs.get("factor", 1)))
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

    @property
    def n_active_params(self) -> int:
        """Parameters one token's forward reads: MoE layers count top_k experts."""
        return _C.param_count(self.to_dict(), True)

    def to_dict(self) -> dict:
        """JSON-ready: the form checkpoints record."""
        d = dataclasses.asdict(self)
        for k in LAYER_FIELDS:
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        for k in ("rope_scaling", "moe", "mla", "ssm", "linear"):
            if d[k] is not None:
                d[k] = dict(d[k])
        return d

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))


PRESETS = tuple(_C.preset_names())


def sizes(vocab_size: int = 8192, **options) -> list:
    """Exact parameter counts of every preset at a vocabulary size, with
    any architecture options (Config fields).

    >>> [s["params"] for s in sizes(8192)][:2]
    [2098304, 7212288]
    """
    rows = []
    for name in PRESETS:
        c = Config.preset(name, vocab_size, **options)
        rows.append(dict(name=name, dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads,
                         n_kv_heads=c.n_kv_heads, ffn_dim=c.ffn_dim,
                         max_seq_len=c.max_seq_len, params=c.n_params))
    return rows


def format_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(n)
