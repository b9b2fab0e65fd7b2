"""Hugging Face interchange: an exported Model is a LlamaForCausalLM that
transformers loads and that computes our logits; load_hf reads it (and
directories saved by transformers itself) back into identical weights."""
import json
import os

import numpy as np
import pytest

import smedjan
from smedjan.hf import export_hf, load_hf
from smedjan.io import load_safetensors, save_safetensors

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CFG = smedjan.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=300,
                     max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    m = smedjan.Model(CFG, seed=5)
    export_hf(m, d)
    return m, d


def test_transformers_loads_the_export_and_matches_our_logits(exported):
    m, d = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    x = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x).long()).logits.numpy()
    ours = m.forward(x)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"max relative difference {err:.3g}"


def test_export_is_a_standard_llama_directory(exported):
    m, d = exported
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["rope_parameters"]["rope_theta"]) == (64, 2, 5000.0)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    t, meta = load_safetensors(d / "model.safetensors")
    assert meta["format"] == "pt" and "lm_head.weight" not in t
    np.testing.assert_array_equal(t["model.layers.1.self_attn.k_proj.weight"], m.params["layers.1.wk"])
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]


def test_load_hf_of_an_export_gives_identical_params(exported):
    m, d = exported
    m2 = load_hf(d)
    assert m2.config == CFG
    np.testing.assert_array_equal(m2.flat_params, m.flat_params)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_hf_of_a_transformers_save_converts_to_f32(tmp_path, exported, dtype):
    m, d = exported
    hf = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=getattr(torch, dtype))
    out = tmp_path / dtype
    hf.save_pretrained(out)
    m2 = load_hf(out)
    for name, theirs in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        ours = smedjan.io.from_hf_name(name)
        np.testing.assert_array_equal(m2.params[ours], theirs.float().numpy(), err_msg=name)


def test_untied_head_loads_and_unsupported_configs_are_refused(tmp_path, exported):
    m, d = exported
    t, _ = load_safetensors(d / "model.safetensors")
    t = {k: np.array(v) for k, v in t.items()}
    bad = tmp_path / "untied"
    bad.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    head = t["model.embed_tokens.weight"] + 1
    (bad / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    save_safetensors(bad / "model.safetensors", {**t, "lm_head.weight": head})
    untied = load_hf(bad)
    assert not untied.config.tied_head
    np.testing.assert_array_equal(untied.params["lm_head"], head)
    (bad / "config.json").write_text(json.dumps(cfg))   # tied, yet a different head
    with pytest.raises(ValueError, match="lm_head.weight differs from the embedding"):
        load_hf(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        load_hf(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_hf(bad)
    for rope, what in (({"rope_type": "llama3", "factor": 8.0}, "RoPE type 'llama3'"),
                       ({"rope_type": "yarn", "factor": 4.0, "mscale": 1.0}, "yarn RoPE with mscale"),
                       ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary")):
        (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": rope}))
        with pytest.raises(ValueError, match=what):
            load_hf(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")
