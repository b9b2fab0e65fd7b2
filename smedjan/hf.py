"""Hugging Face interchange: export a Model as a transformers directory
(config.json + model.safetensors) that `transformers` loads as is — Llama,
Mistral/Ministral (sliding windows), Qwen3 (qk-norm), Mixtral (every layer
MoE), DeepSeek-V3 (mla layers, dense SwiGLU FFNs) or Mamba2 (every layer a
Mamba-2 mixer without ffn), with RoPE scaling and untied heads — and load
such directories (ours or real checkpoints,
F32/F16/BF16, single file or sharded) into a Model. What transformers cannot
express (seed 001's options, mla beside attention layers) is refused by name,
both ways.

Our RoPE is rotate-half like Hugging Face's, so q_proj/k_proj rows copy
directly, and our weight layout (out, in) is theirs: no permutation. The one
exception: DeepSeek's rope_interleave turns interleaved pairs; its rotary rows
(of q_b_proj / q_proj and kv_a_proj_with_mqa) are de-interleaved on load,
which turns them by rotate-half to the same vectors. We export
rope_interleave=false.

>>> import tempfile, smedjan
>>> d = tempfile.mkdtemp()
>>> m = smedjan.Model("tiny", seed=0, vocab_size=256)
>>> export_hf(m, d)
>>> bool((load_hf(d).flat_params == m.flat_params).all())
True
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict

import numpy as np

from .config import Config
from .io import (HF_LM_HEAD, from_hf_name, load_safetensors, save_safetensors, to_float32,
                 to_hf_name, write_text_atomic)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_architecture(config: Config) -> str:
    """The transformers model_type that computes exactly what `config` does:
    llama; mistral (one sliding window in every layer); ministral (windows in
    some layers); qwen3 (weighted qk-norm, optionally windows). ValueError
    naming the options when transformers has no such architecture."""
    c = config
    layers = [c.layer(i) for i in range(c.n_layers)]
    if any(y["mixer"] == "mamba2" for y in layers):
        lacking = [name for name, on in (("paired_heads", c.paired_heads), ("value_mix", c.value_mix),
                                         ("embed_skip", c.embed_skip)) if on]
        if any(y["mixer"] != "mamba2" or y["ffn"] != "none" for y in layers):
            lacking.append("layers other than Mamba-2 mixers without ffn (a hybrid stack)")
        if lacking:
            raise ValueError("transformers has no architecture with " + ", ".join(lacking) +
                             "; save a smedjan checkpoint instead")
        return "mamba2"
    mixers = {y["mixer"] for y in layers}
    if "mla" in mixers:
        lacking = [name for name, on in (
            ("mla beside other mixers", len(mixers) > 1), ("embed_skip", c.embed_skip),
            ("relu2", any(y["ffn"] != "swiglu" for y in layers))) if on]
        if lacking:
            raise ValueError("transformers has no architecture with " + ", ".join(lacking) +
                             "; save a smedjan checkpoint instead")
        return "deepseek_v3"
    if any(y["mixer"] != "attention" or y["ffn"] == "none" for y in layers):
        raise ValueError("transformers has no architecture with these mixers; save a smedjan "
                         "checkpoint instead")
    qk = {y["qk_norm"] for y in layers}
    windows = {y["window"] for y in layers}
    lacking = [name for name, on in (("paired_heads", c.paired_heads), ("value_mix", c.value_mix),
                                     ("embed_skip", c.embed_skip)) if on]
    ffns = {y["ffn"] for y in layers}
    if "moe" in ffns:   # Mixtral: every layer routed, softmax, renormalised, nothing shared
        mc = c.moe
        if ffns != {"moe"}:
            lacking.append("MoE in some layers only")
        if mc["router"] != "softmax" or not mc["norm_topk"]:
            lacking.append(f"a MoE router other than softmax with norm_topk (got {mc['router']}, "
                           f"norm_topk={mc['norm_topk']})")
        if mc["n_shared"]:
            lacking.append("shared experts beside Mixtral's routed ones")
        if qk != {"none"} or len(windows - {0}) > 1 or (0 in windows and len(windows) > 1):
            lacking.append("MoE with qk-norm or per-layer windows")
    if "plain" in qk:
        lacking.append("qk_norm='plain'")
    if len(qk) > 1:
        lacking.append("qk-norm in some layers only")
    if len({y["ffn"] for y in layers}) > 1:
        lacking.append("a different ffn per layer")
    if len(windows - {0}) > 1:
        lacking.append("several window sizes")
    if lacking:
        raise ValueError("transformers has no architecture with " + ", ".join(lacking) +
                         "; save a smedjan checkpoint (or GGUF) instead")
    if "moe" in ffns:
        return "mixtral"
    if qk == {"weighted"}:
        return "qwen3"
    if windows == {0}:
        return "llama"
    return "mistral" if 0 not in windows else "ministral"


_ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "ministral": "MinistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mixtral": "MixtralForCausalLM",
               "deepseek_v3": "DeepseekV3ForCausalLM",
               "mamba2": "Mamba2ForCausalLM"}

# Mixtral's experts, one tensor per expert and projection (transformers'
# checkpoint spelling); ours stack them per layer (model/moe.c): w1 (gate)
# and w3 (up) are expert e's rows of moe.w_gate_up, w2 its rows of moe.w_down.
_MIXTRAL_EXPERT = "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"
_MIXTRAL_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def _expert_rows(config: Config, w: str, e: int):
    """Our stacked tensor and the row slice of expert e's projection w."""
    C, Fe = config.dim, config.moe["expert_dim"]
    if w == "w2":
        return "moe.w_down", slice(e * C, (e + 1) * C)
    at = e * 2 * Fe + (Fe if w == "w3" else 0)
    return "moe.w_gate_up", slice(at, at + Fe)


def _hf_tensors(model) -> dict:
    """Our parameters by transformers' names (Mixtral's experts split out)."""
    c, out = model.config, {}
    for name, view in model.params.items():
        l, _, rest = name.partition(".")[2].partition(".") if name.startswith("layers.") else ("", "", "")
        if rest in ("moe.w_gate_up", "moe.w_down"):
            for e in range(c.moe["n_experts"]):
                for w in (("w1", "w3") if rest == "moe.w_gate_up" else ("w2",)):
                    out[_MIXTRAL_EXPERT.format(l=l, e=e, w=w)] = np.asarray(view[_expert_rows(c, w, e)[1]])
            continue
        out[to_hf_name(name)] = np.asarray(view)
    return out


# transformers' Mamba2 keeps its layers under backbone. and names three tensors
# its own way; the mixer tensors' spellings are the names table's (io.py)
_MAMBA2_GLOBALS = {"tok_emb": "backbone.embeddings.weight", "final_norm": "backbone.norm_f.weight"}
_MAMBA2_PREFIX = ("model.layers.", "backbone.layers.")


def _mamba2_hf_name(ours: str) -> str:
    if ours in _MAMBA2_GLOBALS:
        return _MAMBA2_GLOBALS[ours]
    if ours.endswith(".attn_norm"):
        return "backbone." + ours[:-len("attn_norm")] + "norm.weight"
    return to_hf_name(ours).replace(*_MAMBA2_PREFIX)


def _mamba2_from_hf_name(name: str) -> str:
    for ours, theirs in _MAMBA2_GLOBALS.items():
        if name == theirs:
            return ours
    if name.startswith(_MAMBA2_PREFIX[1]) and name.endswith(".norm.weight") and ".mixer." not in name:
        return name[len("backbone."):-len("norm.weight")] + "attn_norm"
    return from_hf_name(name.replace(_MAMBA2_PREFIX[1], _MAMBA2_PREFIX[0]))


def _mamba2_config(c: Config) -> dict:
    s = c.ssm
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers, "vocab_size": c.vocab_size, "state_size": s["d_state"],
        "conv_kernel": s["d_conv"], "expand": s["expand"], "head_dim": s["head_dim"],
        "num_heads": s["expand"] * c.dim // s["head_dim"], "n_groups": s["n_groups"],
        "chunk_size": s["chunk_size"], "layer_norm_epsilon": c.norm_eps, "use_bias": False,
        "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
        "tie_word_embeddings": c.tied_head, "torch_dtype": "float32", "use_cache": True,
    }


def _rope_parameters(c: Config) -> dict:
    rs = c.rope_scaling
    rp = {"rope_type": "default" if rs is None else rs["type"], "rope_theta": c.rope_theta}
    if rs is None:
        return rp
    rp["factor"] = rs["factor"]
    if rs["type"] == "yarn":
        rp.update(original_max_position_embeddings=rs["original_max_seq_len"],
                  beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"],
                  truncate=rs["truncate"])
        if rs["attention_factor"]:
            rp["attention_factor"] = rs["attention_factor"]
    return rp


def hf_config(config: Config) -> dict:
    """The config.json (transformers 5 spelling) for one of our configs."""
    c = config
    arch = hf_architecture(c)
    if arch == "mamba2":
        return _mamba2_config(c)
    y0 = c.layer(0)
    windows = [c.layer(i)["window"] for i in range(c.n_layers)]
    d = {
        "architectures": [_ARCH_CLASS[arch]],
        "model_type": arch,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.dim // c.n_heads,
        "vocab_size": c.vocab_size,
        # transformers' dynamic NTK takes max_position_embeddings as the original context
        "max_position_embeddings": (c.rope_scaling["original_max_seq_len"]
                                    if c.rope_scaling and c.rope_scaling["type"] == "dynamic"
                                    else c.max_seq_len),
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": _rope_parameters(c),
        "tie_word_embeddings": c.tied_head,
        "torch_dtype": "float32",
        "hidden_act": "relu2" if y0["ffn"] == "relu2" else "silu",   # MoE experts: SwiGLU
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if arch == "llama":
        d.update(mlp_bias=False, pretraining_tp=1)
    if arch == "mixtral":
        mc = c.moe
        d.update(intermediate_size=mc["expert_dim"], num_local_experts=mc["n_experts"],
                 num_experts_per_tok=mc["top_k"], router_aux_loss_coef=mc["aux_loss"],
                 output_router_logits=False, router_jitter_noise=0.0,
                 sliding_window=max(windows) or None)
    if arch == "deepseek_v3":   # every layer dense: no expert is ever built
        a = c.mla
        d.update(q_lora_rank=a["q_lora_rank"] or None, kv_lora_rank=a["kv_lora_rank"],
                 qk_nope_head_dim=a["qk_nope_head_dim"], qk_rope_head_dim=a["qk_rope_head_dim"],
                 v_head_dim=a["v_head_dim"], head_dim=a["qk_rope_head_dim"],
                 num_key_value_heads=c.n_heads, rope_interleave=False,
                 first_k_dense_replace=c.n_layers, n_routed_experts=1, n_shared_experts=1,
                 moe_intermediate_size=c.ffn_dim, num_experts_per_tok=1, n_group=1, topk_group=1,
                 num_nextn_predict_layers=0)
    if arch in ("mistral", "ministral", "qwen3"):
        d["sliding_window"] = max(windows) or None
    if arch in ("ministral", "qwen3"):
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in windows]
    if arch == "qwen3":
        d["use_sliding_window"] = any(windows)
        d["max_window_layers"] = 0
    return d


def export_hf(model, directory) -> None:
    """Write config.json and model.safetensors (F32) into `directory`
    (created if needed). Each file is written atomically; a config that
    transformers cannot express writes nothing."""
    hc = hf_config(model.config)
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    if hc["model_type"] == "mamba2":
        tensors = {_mamba2_hf_name(name): np.asarray(view) for name, view in model.params.items()}
        for name, t in tensors.items():   # Conv1d's weight is (channels, 1, kernel)
            if name.endswith("conv1d.weight"):
                tensors[name] = t[:, None, :]
    else:
        tensors = _hf_tensors(model)
    # transformers refuses safetensors files whose metadata lacks format=pt.
    save_safetensors(os.path.join(d, WEIGHTS_FILE), tensors, {"format": "pt"})
    write_text_atomic(os.path.join(d, "config.json"), json.dumps(hc, indent=2, sort_keys=True) + "\n")


_ROPE_KEYS = {"default": set(), "linear": {"factor"}, "dynamic": {"factor"},
              "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "attention_factor", "truncate"}}


def _rope_from_hf(where: str, hc: dict, max_pos: int):
    """(rope_theta, rope_scaling, max_seq_len) from rope_parameters
    (transformers 5) or rope_scaling + rope_theta (4.x). Anything we cannot
    compute exactly is refused, never approximated."""
    rp = dict(hc.get("rope_parameters") or hc.get("rope_scaling") or {})
    theta = float(rp.pop("rope_theta", hc.get("rope_theta", 10000.0)))
    kind = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    if kind not in _ROPE_KEYS:
        raise ValueError(f"{where}: RoPE type {kind!r} is not supported (default, linear, dynamic, "
                         "yarn)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {rp['partial_rotary_factor']} is not "
                         "supported (all of each head rotates)")
    rp.pop("partial_rotary_factor", None)
    extra = sorted(set(rp) - _ROPE_KEYS[kind])
    if extra:
        raise ValueError(f"{where}: {kind} RoPE with {', '.join(extra)} is not supported")
    if kind == "default":
        return theta, None, max_pos
    factor = rp.get("factor")
    if kind == "yarn":
        orig = rp.get("original_max_position_embeddings") or max_pos
        if factor is None:
            factor = max_pos / orig
        scaling = {"type": "yarn", "factor": float(factor), "original_max_seq_len": int(orig),
                   "beta_fast": float(rp.get("beta_fast", 32.0)),
                   "beta_slow": float(rp.get("beta_slow", 1.0)),
                   "attention_factor": float(rp.get("attention_factor") or 0.0),
                   "truncate": bool(rp.get("truncate", True))}
        return theta, scaling, max(max_pos, int(orig * factor))
    if factor is None:
        raise ValueError(f"{where}: {kind} RoPE without a factor")
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(factor)}, max_pos
    # dynamic: transformers grows the base past max_position_embeddings
    return theta, {"type": "dynamic", "factor": float(factor), "original_max_seq_len": max_pos}, \
        int(max_pos * factor)


def _windows_from_hf(where: str, hc: dict, mt: str, n_layers: int):
    w = hc.get("sliding_window")
    if mt == "qwen3" and not hc.get("use_sliding_window", False):
        w = None
    if mt == "llama" or not w:
        return 0
    types = hc.get("layer_types")
    if mt == "mistral" or types is None and mt != "qwen3":
        return int(w)
    if types is None:   # qwen3 without layer_types: windows from max_window_layers on
        types = ["sliding_attention" if i >= hc.get("max_window_layers", 28) else "full_attention"
                 for i in range(n_layers)]
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad or len(types) != n_layers:
        raise ValueError(f"{where}: layer_types {types!r} is not {n_layers} of sliding_attention / "
                         "full_attention")
    return [int(w) if t == "sliding_attention" else 0 for t in types]


def _config_from_hf(d: str, hc: dict) -> Config:
    where = os.path.join(d, "config.json")

    def need(key):
        if key not in hc:
            raise ValueError(f"{where}: missing '{key}'")
        return hc[key]

    mt = hc.get("model_type")
    if mt == "mamba2":
        return _mamba2_config_from_hf(where, hc, need)
    if mt == "olmoe":
        raise ValueError(f"{where}: OLMoE is not supported: its q_norm and k_norm normalise the "
                         "whole q and k projections, and smedjan's qk-norm is per head")
    if mt == "qwen2_moe":
        raise ValueError(f"{where}: Qwen2-MoE is not supported: its shared expert is scaled by a "
                         "learned sigmoid gate (shared_expert_gate; smedjan's shared experts are "
                         "ungated, DeepSeek's way) and its attention has q/k/v biases")
    if mt not in ("llama", "mistral", "ministral", "qwen3", "mixtral", "deepseek_v3"):
        raise ValueError(f"{where}: model_type {mt!r} is not supported (llama, mistral, ministral, "
                         "qwen3, mixtral, deepseek_v3, mamba2)")
    act = hc.get("hidden_act", "silu")
    if act not in ("silu", "relu2"):
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (silu, relu2)")
    for key in ("attention_bias", "mlp_bias"):
        if hc.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (our layers have no biases)")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    hd = hc.get("head_dim")
    mla = None
    if mt == "deepseek_v3":
        mla = _mla_from_hf(where, hc, need)
        hd = None   # DeepSeek's head_dim is its rotary dim
    if hd is not None and hd * heads != dim:
        raise ValueError(f"{where}: head_dim {hd} * {heads} heads != hidden_size {dim}")
    n_layers = need("num_hidden_layers")
    theta, rope_scaling, max_seq_len = _rope_from_hf(where, hc, hc.get("max_position_embeddings", 2048))
    moe = None
    if mt == "mixtral":
        if hc.get("router_jitter_noise"):
            raise ValueError(f"{where}: router_jitter_noise {hc['router_jitter_noise']} is not "
                             "supported (routing is deterministic)")
        moe = dict(n_experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                   expert_dim=need("intermediate_size"), n_shared=0, router="softmax",
                   norm_topk=True,
                   aux_loss=float(hc.get("router_aux_loss_coef", 0.0))
                   if hc.get("output_router_logits") else 0.0)
    try:
        return Config(dim=dim, n_layers=n_layers, n_heads=heads,
                      n_kv_heads=hc.get("num_key_value_heads") or heads,
                      ffn_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
                      max_seq_len=max_seq_len, rope_theta=theta,
                      norm_eps=float(hc.get("rms_norm_eps", 1e-6)), rope_scaling=rope_scaling,
                      tied_head=bool(hc.get("tie_word_embeddings", True)),
                      ffn="moe" if moe else "swiglu" if act == "silu" else "relu2", moe=moe,
                      qk_norm="weighted" if mt == "qwen3" else "none",
                      window=0 if mla else _windows_from_hf(where, hc, "mistral" if moe else mt, n_layers),
                      mixer="mla" if mla else "attention", mla=mla)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _mla_from_hf(where: str, hc: dict, need) -> dict:
    """A DeepSeek-V3 config's mla sizes; MoE layers and YaRN's mscale_all_dim
    softmax scale (which our attention does not apply) are refused."""
    n_layers = need("num_hidden_layers")
    if hc.get("first_k_dense_replace", 3) < n_layers and hc.get("n_routed_experts"):
        raise ValueError(f"{where}: MoE layers (first_k_dense_replace "
                         f"{hc.get('first_k_dense_replace', 3)} < num_hidden_layers {n_layers}) are "
                         "not supported: only dense DeepSeek-V3 models load")
    rp = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if rp.get("mscale_all_dim"):
        raise ValueError(f"{where}: YaRN with mscale_all_dim (DeepSeek's softmax scale "
                         "mscale^2) is not supported")
    return {"q_lora_rank": hc.get("q_lora_rank") or 0, "kv_lora_rank": need("kv_lora_rank"),
            "qk_nope_head_dim": need("qk_nope_head_dim"), "qk_rope_head_dim": need("qk_rope_head_dim"),
            "v_head_dim": need("v_head_dim")}


def _deinterleave_rope_rows(model) -> None:
    """DeepSeek's interleaved rotary pairs (x0, x1), (x2, x3) ... as our
    rotate-half pairs (x_i, x_{i+d/2}): the rotary rows of each q head and
    of the shared key, evens first, then odds."""
    a, H = model.config.mla, model.config.n_heads
    dn, dr, kvr = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["kv_lora_rank"]
    order = np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])
    q_rows = (np.arange(H)[:, None] * (dn + dr) + dn + order[None]).reshape(-1)
    q_dst = (np.arange(H)[:, None] * (dn + dr) + dn + np.arange(dr)[None]).reshape(-1)
    for i in range(model.config.n_layers):
        q = model.params[f"layers.{i}.mla.q_b_proj" if a["q_lora_rank"] else f"layers.{i}.wq"]
        q[q_dst] = q[q_rows].copy()
        kv = model.params[f"layers.{i}.mla.kv_a_proj"]
        kv[kvr:] = kv[kvr + order].copy()


def _mamba2_config_from_hf(where: str, hc: dict, need) -> Config:
    """Our config for transformers' Mamba2Config; what we do not compute
    (biases in the projections, a conv without bias, another activation, a
    clamped dt, the norm before the gate) is refused by name."""
    for key, want in (("use_bias", False), ("use_conv_bias", True), ("hidden_act", "silu"),
                      ("rms_norm", True), ("norm_before_gate", False)):
        if key in hc and hc[key] != want:
            raise ValueError(f"{where}: {key}={hc[key]!r} is not supported (only {want!r})")
    # transformers writes infinity as {"__float__": "Infinity"}
    limit = [float(v["__float__"]) if isinstance(v, dict) else float(v)
             for v in hc.get("time_step_limit") or (0.0, float("inf"))]
    if limit[0] > 0 or limit[1] != float("inf"):
        raise ValueError(f"{where}: time_step_limit {limit!r} is not supported (dt is not clamped)")
    dim, expand, head_dim = need("hidden_size"), hc.get("expand", 2), hc.get("head_dim", 64)
    if hc.get("num_heads", expand * dim // head_dim) * head_dim != expand * dim:
        raise ValueError(f"{where}: num_heads {hc.get('num_heads')} * head_dim {head_dim} != expand * "
                         f"hidden_size {expand * dim}")
    # no attention: any head count that passes our checks (dim / n_heads even, <= 256)
    heads = [h for h in range(1, dim + 1) if dim % h == 0 and (dim // h) % 2 == 0 and dim // h <= 256]
    if not heads:
        raise ValueError(f"{where}: hidden_size {dim} must be even")
    n_heads = heads[0]
    try:
        return Config(dim=dim, n_layers=need("num_hidden_layers"), n_heads=n_heads, n_kv_heads=n_heads,
                      ffn_dim=dim, vocab_size=need("vocab_size"), max_seq_len=1 << 20,
                      norm_eps=float(hc.get("layer_norm_epsilon", 1e-5)),
                      tied_head=bool(hc.get("tie_word_embeddings", False)), mixer="mamba2", ffn="none",
                      ssm={"d_state": hc.get("state_size", 128), "d_conv": hc.get("conv_kernel", 4),
                           "expand": expand, "head_dim": head_dim, "n_groups": hc.get("n_groups", 1),
                           "chunk_size": hc.get("chunk_size", 256)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _weight_files(d: str):
    single, index = os.path.join(d, WEIGHTS_FILE), os.path.join(d, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            try:
                wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
        return [os.path.join(d, name) for name in sorted(set(wm.values()))]
    if os.path.exists(single):
        return [single]
    if any(n.endswith(".bin") for n in os.listdir(d)):
        raise ValueError(f"{d}: only PyTorch .bin weights found; convert them to safetensors first")
    raise FileNotFoundError(2, f"{d}: no {WEIGHTS_FILE} or {INDEX_FILE}", single)


def _hf_spelling(name: str) -> str:
    """transformers' name of our tensor (the stacked experts: their pattern)."""
    if name.endswith(("moe.w_gate_up", "moe.w_down")):
        return _MIXTRAL_EXPERT.format(l=name.split(".")[1], e="*", w="w*")
    return to_hf_name(name)


def load_hf(directory, *, seed: int = 0):
    """A Model from a transformers directory (config.json + safetensors) of
    a Llama, Mistral, Ministral, Qwen3, Mixtral, dense DeepSeek-V3 or Mamba2
    model (OLMoE and Qwen2-MoE are refused, saying why). F16/BF16 weights are
    converted to f32."""
    from .model import Model
    d = os.fspath(directory)
    cpath = os.path.join(d, "config.json")
    if not os.path.exists(cpath):
        raise FileNotFoundError(2, f"{d}: no config.json", cpath)
    with open(cpath) as f:
        try:
            hc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cpath}: invalid JSON ({e})") from None
    config = _config_from_hf(d, hc)
    model = Model(config, seed=seed)
    # transformers' DeepSeek-V3 builds no multi-token-prediction layers: skip their weights
    mtp_from = config.n_layers if hc.get("model_type") == "deepseek_v3" else None
    mamba2 = hc.get("model_type") == "mamba2"
    seen: Dict[str, str] = {}
    lm_head = None
    for wf in _weight_files(d):
        tensors, _ = load_safetensors(wf)
        for name, arr in tensors.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue   # a buffer some old exports carry; we compute it
            if mtp_from is not None and name.startswith("model.layers.") and \
                    int(name.split(".")[2]) >= mtp_from:
                continue
            if name == HF_LM_HEAD and config.tied_head:
                lm_head = (wf, to_float32(arr, tensors.dtypes[name]))
                continue
            expert = _MIXTRAL_EXPERT_RE.fullmatch(name) if config.moe else None
            rows = slice(None)
            if expert:
                l, e, w = int(expert[1]), int(expert[2]), expert[3]
                if e >= config.moe["n_experts"]:
                    raise ValueError(f"{wf}: tensor '{name}': expert {e} of "
                                     f"{config.moe['n_experts']}")
                stacked, rows = _expert_rows(config, w, e)
                ours = f"layers.{l}.{stacked}"
            else:
                try:
                    ours = _mamba2_from_hf_name(name) if mamba2 else from_hf_name(name)
                except KeyError:
                    raise ValueError(f"{wf}: tensor '{name}' has no smedjan counterpart") from None
            if ours not in model.params:
                raise ValueError(f"{wf}: tensor '{name}' ({ours}) is not in the model the config "
                                 "describes")
            view = model.params[ours][rows]
            if mamba2 and ours.endswith("ssm.conv_w") and arr.ndim == 3 and arr.shape[1] == 1:
                arr = arr.reshape(arr.shape[0], arr.shape[2])   # Conv1d's (channels, 1, kernel)
            if tuple(arr.shape) != view.shape:
                raise ValueError(f"{wf}: tensor '{name}' has shape {tuple(arr.shape)}, the config "
                                 f"implies {view.shape}")
            try:
                view[...] = to_float32(arr, tensors.dtypes[name])
            except ValueError:
                raise ValueError(f"{wf}: tensor '{name}' has dtype {tensors.dtypes[name]}, expected "
                                 "F32, F16 or BF16") from None
            seen[f"{ours}[{rows.start}]" if expert else ours] = wf
    if config.moe:   # a stacked tensor is there when every expert's rows are
        per = {"moe.w_gate_up": ("w1", "w3"), "moe.w_down": ("w2",)}
        for l in range(config.n_layers):
            for stacked, ws in per.items():
                keys = [f"layers.{l}.{stacked}[{_expert_rows(config, w, e)[1].start}]"
                        for e in range(config.moe["n_experts"]) for w in ws]
                if all(k in seen for k in keys):
                    seen[f"layers.{l}.{stacked}"] = seen[keys[0]]
    missing = [n for n in model.params if n not in seen]
    if missing:
        hf_name = _mamba2_hf_name if mamba2 else _hf_spelling
        raise ValueError(f"{d}: missing tensors {', '.join(hf_name(n) for n in missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if config.mla is not None and hc.get("rope_interleave", True):
        _deinterleave_rope_rows(model)
    if lm_head is not None and not np.array_equal(lm_head[1], model.params["tok_emb"]):
        raise ValueError(f"{lm_head[0]}: {HF_LM_HEAD} differs from the embedding although the "
                         "config says tie_word_embeddings")
    return model


__all__ = ["export_hf", "load_hf", "hf_config", "hf_architecture"]
