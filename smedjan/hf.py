"""Hugging Face interchange: export a Model as a LlamaForCausalLM directory
(config.json + model.safetensors) that `transformers` loads as is, and load
such directories — ours or real Llama-family checkpoints (F32/F16/BF16,
single file or sharded) — into a Model.

Our RoPE is rotate-half like Hugging Face's, so q_proj/k_proj rows copy
directly, and our weight layout (out, in) is theirs: no permutation.

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
from typing import Dict

import numpy as np

from .config import Config
from .io import (HF_LM_HEAD, from_hf_name, load_safetensors, save_safetensors, to_float32,
                 to_hf_name)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def hf_config(config: Config) -> dict:
    """The LlamaForCausalLM config.json for one of our configs."""
    c = config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.dim // c.n_heads,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def export_hf(model, directory) -> None:
    """Write config.json and model.safetensors (F32, tied head) into
    `directory` (created if needed). Each file is written atomically."""
    d = os.fspath(directory)
    os.makedirs(d, exist_ok=True)
    tensors = {to_hf_name(name): np.asarray(view) for name, view in model.params.items()}
    # transformers refuses safetensors files whose metadata lacks format=pt.
    save_safetensors(os.path.join(d, WEIGHTS_FILE), tensors, {"format": "pt"})
    tmp = os.path.join(d, f"config.json.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(hf_config(model.config), f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(d, "config.json"))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _config_from_hf(d: str, hc: dict) -> Config:
    where = os.path.join(d, "config.json")

    def need(key):
        if key not in hc:
            raise ValueError(f"{where}: missing '{key}'")
        return hc[key]

    mt = hc.get("model_type")
    if mt not in ("llama", "mistral"):
        raise ValueError(f"{where}: model_type {mt!r} is not Llama-family (llama, mistral)")
    if hc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hc['hidden_act']!r} is not supported (silu only)")
    for key in ("attention_bias", "mlp_bias"):
        if hc.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (our layers have no biases)")
    if hc.get("rope_scaling"):
        raise ValueError(f"{where}: rope_scaling {hc['rope_scaling']!r} is not supported")
    if hc.get("sliding_window") and hc.get("use_sliding_window", True):
        raise ValueError(f"{where}: sliding-window attention ({hc['sliding_window']}) is not supported")
    dim, heads = need("hidden_size"), need("num_attention_heads")
    hd = hc.get("head_dim")
    if hd is not None and hd * heads != dim:
        raise ValueError(f"{where}: head_dim {hd} * {heads} heads != hidden_size {dim}")
    try:
        return Config(dim=dim, n_layers=need("num_hidden_layers"), n_heads=heads,
                      n_kv_heads=hc.get("num_key_value_heads") or heads,
                      ffn_dim=need("intermediate_size"), vocab_size=need("vocab_size"),
                      max_seq_len=hc.get("max_position_embeddings", 2048),
                      rope_theta=float(hc.get("rope_theta", 10000.0)),
                      norm_eps=float(hc.get("rms_norm_eps", 1e-6)))
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


def load_hf(directory, *, seed: int = 0):
    """A Model from a Hugging Face Llama-family directory (config.json +
    safetensors). F16/BF16 weights are converted to f32. An untied
    lm_head.weight (one that differs from the embedding) is refused for
    now: our head is tied."""
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
    seen: Dict[str, str] = {}
    lm_head = None
    for wf in _weight_files(d):
        tensors, _ = load_safetensors(wf)
        for name, arr in tensors.items():
            if name == HF_LM_HEAD:
                lm_head = (wf, to_float32(arr, tensors.dtypes[name]))
                continue
            if name.endswith("rotary_emb.inv_freq"):
                continue   # a buffer some old exports carry; we compute it
            try:
                ours = from_hf_name(name)
            except KeyError:
                raise ValueError(f"{wf}: tensor '{name}' has no smedjan counterpart") from None
            if ours not in model.params:
                raise ValueError(f"{wf}: tensor '{name}' ({ours}) is beyond the config's "
                                 f"{config.n_layers} layers")
            view = model.params[ours]
            if tuple(arr.shape) != view.shape:
                raise ValueError(f"{wf}: tensor '{name}' has shape {tuple(arr.shape)}, the config "
                                 f"implies {view.shape}")
            try:
                view[...] = to_float32(arr, tensors.dtypes[name])
            except ValueError:
                raise ValueError(f"{wf}: tensor '{name}' has dtype {tensors.dtypes[name]}, expected "
                                 "F32, F16 or BF16") from None
            seen[ours] = wf
    missing = [n for n in model.params if n not in seen]
    if missing:
        raise ValueError(f"{d}: missing tensors {', '.join(to_hf_name(n) for n in missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
    if lm_head is not None and not np.array_equal(lm_head[1], model.params["tok_emb"]):
        raise ValueError(f"{lm_head[0]}: untied {HF_LM_HEAD} (different from the embedding) is not "
                         "supported: smedjan's output head is tied to tok_emb")
    return model


__all__ = ["export_hf", "load_hf", "hf_config"]
