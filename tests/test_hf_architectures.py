"""The architectures transformers has, both ways: a small random smedjan
model of each exports and transformers computes its logits; a small random
transformers model of each imports and smedjan computes its logits (within
1e-5, relative). Llama with linear, dynamic and YaRN RoPE scaling, Qwen3
(qk-norm, windows in some layers), Mistral (one window), Ministral (windows
in some layers), relu2, untied heads."""
import numpy as np
import pytest

import smedjan
from smedjan.hf import export_hf, hf_architecture, load_hf
from conftest import max_rel_err

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

T = 40   # past every window and the dynamic original context below
BASE = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=211,
            max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6)
YARN = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}
CASES = {
    "llama-linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    "llama-dynamic": ("llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0,
                                                  "original_max_seq_len": 24})),
    "llama-yarn": ("llama", dict(rope_scaling=YARN)),
    "llama-yarn-options": ("llama", dict(rope_scaling={**YARN, "beta_fast": 16.0, "beta_slow": 2.0,
                                                       "attention_factor": 0.9, "truncate": False})),
    "llama-relu2-untied": ("llama", dict(ffn="relu2", tied_head=False)),
    "qwen3": ("qwen3", dict(qk_norm="weighted", tied_head=False)),
    "qwen3-windows": ("qwen3", dict(qk_norm="weighted", window=[9, 0, 9], rope_scaling=YARN)),
    "mistral": ("mistral", dict(window=7)),
    "ministral": ("ministral", dict(window=[0, 11, 11])),
}


def their_logits(directory, tokens):
    m = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    with torch.no_grad():
        return m(torch.from_numpy(tokens).long()).logits.numpy()


def tokens():
    return np.random.default_rng(0).integers(0, BASE["vocab_size"], (2, T)).astype(np.int32)


@pytest.mark.parametrize("case", CASES)
def test_our_export_computes_our_logits_in_transformers(case, tmp_path):
    arch, options = CASES[case]
    cfg = smedjan.Config(**BASE, **options)
    assert hf_architecture(cfg) == arch
    m = smedjan.Model(cfg, seed=3)
    r = np.random.default_rng(3)
    for v in m.params.values():     # gains away from 1.0
        if v.ndim == 1:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    export_hf(m, tmp_path)
    x = tokens()
    assert max_rel_err(m.forward(x), their_logits(tmp_path, x)) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_a_transformers_model_imports_with_its_logits(case, tmp_path):
    arch, options = CASES[case]
    hc = smedjan.hf.hf_config(smedjan.Config(**BASE, **options))   # the same shape, spelled theirs
    hc.pop("architectures")
    model_type = hc.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **hc)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # gains away from 1.0
        for name, p in theirs.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert hf_architecture(ours.config) == arch
    x = tokens()
    assert max_rel_err(ours.forward(x), their_logits(tmp_path, x)) < 1e-5


def test_what_transformers_cannot_express_is_refused_and_nothing_written(tmp_path):
    for options, what in ((dict(paired_heads=True), "paired_heads"), (dict(value_mix=0.1), "value_mix"),
                          (dict(embed_skip=0.1), "embed_skip"), (dict(qk_norm="plain"), "qk_norm='plain'"),
                          (dict(qk_norm=["weighted", "none", "none"]), "qk-norm in some layers"),
                          (dict(window=[5, 9, 0]), "several window sizes")):
        m = smedjan.Model(smedjan.Config(**BASE, **options), seed=0)
        d = tmp_path / what.replace("'", "")
        with pytest.raises(ValueError, match=what):
            export_hf(m, d)
        assert not d.exists()


def test_a_yarn_llama_of_transformers_imports_exactly_where_it_was_approximated(tmp_path):
    """Before rope_parameters were read, this model imported as plain RoPE,
    8.5e-3 off."""
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=96, num_hidden_layers=2, vocab_size=211,
                                      max_position_embeddings=64,
                                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                       "original_max_position_embeddings": 16})
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path)
    m = load_hf(tmp_path)
    assert m.config.rope_scaling["type"] == "yarn"
    x = tokens()
    assert max_rel_err(m.forward(x), their_logits(tmp_path, x)) < 1e-5
