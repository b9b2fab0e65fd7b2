"""Multi-head latent attention (the "mla" mixer, DeepSeek-V2/V3) against a
PyTorch definition written here: logits within 1e-5 and every gradient within
1e-4 (fp32, relative) on the CPU, alone and beside attention layers."""
import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smedjan
from conftest import assert_model_matches, rel_err
from torch_ref import rope_freqs

torch.set_num_threads(max(1, smedjan.threads()))

SIZES = dict(q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)


class TorchMLA(torch.nn.Module):
    """The decoder with mla and plain (MHA) attention layers, by the
    definition: q = q_b(rms(q_a h)) or q_proj h; (ckv, k_pe) = kv_a h;
    (k_nope, v) per head = kv_b rms(ckv); k_pe shared by every head and
    turned by RoPE with q_pe; softmax scale 1/sqrt(nope + rope)."""

    def __init__(self, model):
        super().__init__()
        self.cfg = model.config
        self.p = torch.nn.ParameterDict({
            k.replace(".", "_"): torch.nn.Parameter(torch.from_numpy(np.array(v)))
            for k, v in model.params.items()})

    def named(self, name):
        return self.p[name.replace(".", "_")]

    def rms(self, x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(self, x, T, hd):
        inv, mscale = rope_freqs(types.SimpleNamespace(head_dim=hd, rope_theta=self.cfg.rope_theta,
                                                       rope_scaling=self.cfg.rope_scaling), T)
        f = torch.outer(torch.arange(T).float(), inv)
        emb = torch.cat((f, f), dim=-1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * emb.cos() * mscale + torch.cat((-x2, x1), dim=-1) * emb.sin() * mscale

    @staticmethod
    def causal(q, k, v, scale):
        T = q.shape[-2]
        s = (q @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v

    def mla(self, i, h):
        cfg, a = self.cfg, self.cfg.mla
        g = lambda n: self.named(f"layers.{i}.mla.{n}")
        B, T, _ = h.shape
        H, dn, dr, dv, kvr = (cfg.n_heads, a["qk_nope_head_dim"], a["qk_rope_head_dim"],
                              a["v_head_dim"], a["kv_lora_rank"])
        if a["q_lora_rank"]:
            q = self.rms(h @ g("q_a_proj").T, g("q_a_norm"), 1e-6) @ g("q_b_proj").T
        else:
            q = h @ self.named(f"layers.{i}.wq").T
        q = q.view(B, T, H, dn + dr).transpose(1, 2)
        ckv, k_pe = (h @ g("kv_a_proj").T).split([kvr, dr], dim=-1)
        kv = (self.rms(ckv, g("kv_a_norm"), 1e-6) @ g("kv_b_proj").T).view(B, T, H, dn + dv)
        k_nope, v = kv.transpose(1, 2).split([dn, dv], dim=-1)
        k_pe = self.rope(k_pe, T, dr)[:, None].expand(B, H, T, dr)
        q = torch.cat((q[..., :dn], self.rope(q[..., dn:], T, dr)), dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        return self.causal(q, k, v, 1 / math.sqrt(dn + dr)).transpose(1, 2).reshape(B, T, H * dv)

    def attention(self, i, h):
        g = lambda n: self.named(f"layers.{i}.{n}")
        B, T, _ = h.shape
        H, hd = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = ((h @ g(w).T).view(B, T, H, hd).transpose(1, 2) for w in ("wq", "wk", "wv"))
        a = self.causal(self.rope(q, T, hd), self.rope(k, T, hd), v, 1 / math.sqrt(hd))
        return a.transpose(1, 2).reshape(B, T, H * hd)

    def forward(self, tokens):
        cfg = self.cfg
        x = self.named("tok_emb")[tokens]
        for i in range(cfg.n_layers):
            g = lambda n: self.named(f"layers.{i}.{n}")
            h = self.rms(x, g("attn_norm"), cfg.norm_eps)
            a = self.mla(i, h) if cfg.layer(i)["mixer"] == "mla" else self.attention(i, h)
            x = x + a @ g("wo").T
            h = self.rms(x, g("ffn_norm"), cfg.norm_eps)
            x = x + (F.silu(h @ g("w_gate").T) * (h @ g("w_up").T)) @ g("w_down").T
        return self.rms(x, self.named("final_norm"), cfg.norm_eps) @ self.named("tok_emb").T

    def loss(self, tokens, targets):
        logits = self.forward(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_model(mixer="mla", seed=0, n_layers=2, **options):
    options = {"mla": SIZES, **options}
    cfg = smedjan.Config.custom(64, n_layers, 4, vocab_size=97, max_seq_len=256, mixer=mixer,
                                norm_eps=1e-5, **options)
    model = smedjan.Model(cfg, seed=seed)
    r = np.random.default_rng(seed)
    for v in model.params.values():
        if v.ndim == 1:   # gains at 1.0 would hide a wrong gain gradient
            v[:] = r.uniform(0.5, 1.5, v.shape)
    return model


CASES = {
    "q-lora": dict(),
    "no-q-lora": dict(mla={**SIZES, "q_lora_rank": 0}),
    "v-as-wide-as-qk": dict(mla={**SIZES, "v_head_dim": 20}),
    "rope-yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}),
    "hybrid": dict(mixer=["mla", "attention", "attention"], n_layers=3),
}


@pytest.mark.parametrize("case", CASES)
def test_mla_logits_loss_and_every_gradient_match_torch(case):
    model = make_model(**CASES[case])
    ref = TorchMLA(model)
    r = np.random.default_rng(1)
    tokens = r.integers(0, 97, (2, 19)).astype(np.int32)
    targets = r.integers(0, 97, (2, 19)).astype(np.int32)
    assert_model_matches(model, tokens, targets, ref.forward, lambda n: ref.named(n).grad.numpy())


@pytest.mark.parametrize("levers", [dict(gradient_checkpointing=True), dict(cheap_recompute=True)])
def test_mla_gradients_are_the_same_under_recompute(levers):
    r = np.random.default_rng(2)
    tokens = r.integers(0, 97, (2, 16)).astype(np.int32)
    plain, lever = make_model(), make_model()
    lever.set_levers(**levers)
    assert plain.loss(tokens, tokens, backward=True) == lever.loss(tokens, tokens, backward=True)
    for name, g in plain.grads.items():
        np.testing.assert_array_equal(g, lever.grads[name], err_msg=name)


def test_mla_tensor_table_and_parameter_count():
    m = make_model(mixer=["mla", "attention"])
    mla = {k for k in m.params if k.startswith("layers.0.")}
    assert mla == {f"layers.0.{n}" for n in (
        "mla.q_a_proj", "mla.q_a_norm", "mla.q_b_proj", "mla.kv_a_proj", "mla.kv_a_norm",
        "mla.kv_b_proj", "wo", "attn_norm", "ffn_norm", "w_gate", "w_up", "w_down")}
    assert m.params["layers.0.mla.q_b_proj"].shape == (4 * 20, 24)
    assert m.params["layers.0.mla.kv_a_proj"].shape == (20 + 8, 64)
    assert m.params["layers.0.mla.kv_b_proj"].shape == (4 * (12 + 10), 20)
    assert m.params["layers.0.wo"].shape == (64, 4 * 10)
    assert m.config.n_params == sum(v.size for v in m.params.values())


def test_mla_sizes_default_to_deepseek_proportions_and_round_trip():
    cfg = smedjan.Config.custom(64, 2, 4, vocab_size=97, mixer="mla")
    assert cfg.mla == dict(q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=16)
    assert smedjan.Config(**cfg.to_dict()) == cfg
    assert smedjan.Config.custom(64, 2, 4, vocab_size=97, mla=SIZES).mla is None   # no mla layer


@pytest.mark.parametrize("options, message", [
    (dict(mla={**SIZES, "qk_rope_head_dim": 7}), "mla.qk_rope_head_dim must be even"),
    (dict(mla={**SIZES, "v_head_dim": 21}), "mla.v_head_dim must be in 1..qk_nope_head_dim"),
    (dict(mla={**SIZES, "kv_lora_rank": 0}), "mla.kv_lora_rank must be in 1"),
    (dict(mla={**SIZES, "rank": 3}), "'mla' has field 'rank'"),
    (dict(window=8), "mla layers take no window"),
    (dict(value_mix=0.5), "mla layers take neither paired_heads nor value_mix"),
])
def test_bad_mla_configs_are_refused_by_field(options, message):
    with pytest.raises(ValueError, match=message):
        smedjan.Config.custom(64, 2, 4, vocab_size=97, mixer="mla", **{"mla": SIZES, **options})


# ---- generation: the cache holds the latent, decode runs the absorbed matrices ----

from smedjan.infer import InferenceModel  # noqa: E402


@pytest.mark.parametrize("case", ["q-lora", "no-q-lora", "hybrid"])
def test_engine_logits_equal_the_training_forward(case):
    model = make_model(**CASES[case])
    tokens = np.random.default_rng(3).integers(0, 97, 150).astype(np.int32)   # past one 128-token chunk
    ours = InferenceModel.from_model(model, max_ctx=256)
    ref = model.forward(tokens[None])[0]
    assert rel_err(ours.forward(tokens), ref) < 1e-5
    ours.reset()                       # prefill, then decode token by token: the same logits
    ours.prefill(tokens[:7])
    stepped = np.stack([ours.decode(t) for t in tokens[7:]])
    assert rel_err(stepped[:-1], ref[7:-1]) < 1e-5


def greedy_matches_recomputation(model, prompt, n):
    """Generate n greedy tokens with the engine's cache; each must be the
    argmax of the training forward over the whole sequence so far (up to a
    tie within 1e-5 of the top logit)."""
    engine = InferenceModel.from_model(model, max_ctx=len(prompt) + n)
    out = list(engine.generate(prompt, n, temperature=0))
    assert len(out) == n
    seq = np.array(list(prompt) + out, np.int32)
    logits = model.forward(seq[None, :-1])[0, len(prompt) - 1:]
    for i, (tok, row) in enumerate(zip(out, logits)):
        assert row[tok] >= row.max() - 1e-5 * max(1.0, abs(row.max())), (i, tok, int(row.argmax()))
    return out


def test_mla_generation_equals_recomputation_for_128_greedy_tokens():
    greedy_matches_recomputation(make_model(n_layers=2), [5, 17, 3, 88, 41], 128)


def test_mla_cache_holds_latent_and_rope_key_per_token_per_layer():
    """(kv_lora_rank + qk_rope_head_dim) x layers x 4 bytes per cached token,
    read off the engine's own accounting as max_ctx grows; an attention
    model of the same width would hold 2 x n_kv_heads x head_dim."""
    model = make_model(n_layers=3)
    grow = [InferenceModel.from_model(model, max_ctx=n).memory()["cache_bytes"] for n in (128, 384)]
    per_token = (grow[1] - grow[0]) / 256
    assert per_token == (20 + 8) * 3 * 4, per_token
    attn = make_model(mixer="attention", n_layers=3)
    grow = [InferenceModel.from_model(attn, max_ctx=n).memory()["cache_bytes"] for n in (128, 384)]
    assert (grow[1] - grow[0]) / 256 >= 2 * 64 * 3 * 4 > per_token


def test_mla_generation_on_the_gpu_is_refused_by_name():
    model = make_model()
    with pytest.raises((ValueError, RuntimeError), match="mla layers: GPU generation is not built|no CUDA"):
        InferenceModel.from_model(model, device="cuda")


# ---- hybrid stacks: train, checkpoint, resume bit-identically, generate ----------

def test_hybrid_trains_resumes_bit_identically_and_generates(tmp_path, text_bytes):
    from smedjan.checkpoint import load_checkpoint, restore, save_checkpoint
    from smedjan.data import Batches, TokenFile, write_tokens
    write_tokens(tmp_path / "d.tok", [np.frombuffer(text_bytes[:50_000], np.uint8)])
    data = TokenFile(tmp_path / "d.tok")
    cfg = smedjan.Config.custom(64, 4, 4, vocab_size=256, max_seq_len=256, mla=SIZES,
                                mixer=["mla", "mla", "mla", "attention"])
    train = dict(lr=3e-3, min_lr=3e-4, warmup=2, steps=20, weight_decay=0.1, clip=1.0)

    def run(m, tr, b, n):
        return [tr.step(*next(b)).loss for _ in range(n)]

    ref = smedjan.Model(cfg, seed=0)
    ref_tr, ref_b = smedjan.Trainer(ref, **train), Batches(data, 2, 32, seed=7)
    losses = run(ref, ref_tr, ref_b, 6)
    assert losses[-1] < losses[0]

    m = smedjan.Model(cfg, seed=0)
    tr, b = smedjan.Trainer(m, **train), Batches(data, 2, 32, seed=7)
    run(m, tr, b, 3)
    save_checkpoint(tmp_path / "c.safetensors", m, tr, step=tr.step_count, loader_state=b.state_dict())
    ck = load_checkpoint(tmp_path / "c.safetensors")
    assert ck.config == cfg
    m = smedjan.Model(ck.config, seed=1)
    tr, b = smedjan.Trainer(m, **ck.trainer), Batches(data, 2, 32, seed=0)
    restore(ck, m, tr)
    b.load_state_dict(ck.loader)
    assert run(m, tr, b, 3) == losses[3:]
    np.testing.assert_array_equal(m.flat_params, ref.flat_params)
    np.testing.assert_array_equal(tr.exp_avg_sq, ref_tr.exp_avg_sq)
    greedy_matches_recomputation(m, list(text_bytes[:12]), 128)


# ---- transformers' DeepseekV3ForCausalLM (dense layers) ------------------------------

def deepseek(tmp_path, seed=0, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hc = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        first_k_dense_replace=2, n_routed_experts=4, moe_intermediate_size=32,
        tie_word_embeddings=False, **{**SIZES, **kw})
    hf = transformers.DeepseekV3ForCausalLM(hc).eval()
    with torch.no_grad():   # gains off 1.0, so that a wrong gain shows
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=None), dict(rope_interleave=False),
                                dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                      "rope_theta": 500.0}),
                                dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 32})],
                         ids=["q-lora", "no-q-lora", "rotate-half", "rope-linear", "rope-yarn"])
def test_deepseek_v3_imports_with_equal_logits_and_exports_back(tmp_path, kw):
    from smedjan.hf import export_hf, load_hf
    hf = deepseek(tmp_path / "hf", **kw)
    tokens = np.random.default_rng(4).integers(0, 97, (2, 23))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.numpy()
    model = load_hf(tmp_path / "hf")
    assert model.config.layer(0)["mixer"] == "mla"
    assert rel_err(model.forward(tokens.astype(np.int32)), theirs) < 1e-5
    engine = InferenceModel.from_model(model, max_ctx=64)
    assert rel_err(engine.forward(tokens[0].astype(np.int32)), theirs[0]) < 1e-5
    export_hf(model, tmp_path / "ours")   # and transformers reads our export as it wrote
    import transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_err(back(torch.from_numpy(tokens)).logits.numpy(), theirs) < 1e-5


def test_deepseek_v3_moe_layers_and_yarn_mscale_are_refused_by_name(tmp_path):
    from smedjan.hf import load_hf
    import json
    deepseek(tmp_path)
    hc = json.loads((tmp_path / "config.json").read_text())
    for change, message in (({"first_k_dense_replace": 1}, "MoE layers"),
                            ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                  "original_max_position_embeddings": 32,
                                                  "mscale": 1.0, "mscale_all_dim": 1.0}},
                             "mscale_all_dim")):
        (tmp_path / "config.json").write_text(json.dumps({**hc, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path)


def test_mla_beside_attention_has_no_transformers_architecture():
    from smedjan.hf import hf_architecture
    with pytest.raises(ValueError, match="mla beside other mixers"):
        hf_architecture(make_model(mixer=["mla", "attention"]).config)


def test_cli_sizes_takes_mixer_and_mla_sizes(capsys):
    from smedjan.cli import main
    main(["sizes", "--vocab-size", "97", "--mixer", "mla,attention", "--mla", '{"kv_lora_rank": 32}'])
    out = capsys.readouterr().out
    tiny = smedjan.Config.preset("tiny", 97, mixer=["mla", "attention"], mla={"kv_lora_rank": 32})
    assert f"{tiny.n_params:,}" in out, out
    with pytest.raises(SystemExit):
        main(["sizes", "--mla", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_quantised_engines_run_mla_layers_near_fp32():
    sizes = dict(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)
    cfg = smedjan.Config.custom(128, 2, 4, vocab_size=256, max_seq_len=128, mixer=["mla", "attention"], mla=sizes)
    model = smedjan.Model(cfg, seed=0)
    tokens = np.random.default_rng(5).integers(0, 256, 40).astype(np.int32)
    ref = model.forward(tokens[None])[0]
    for mode, tol in (("bf16", 1e-2), ("q8", 3e-2)):
        assert rel_err(InferenceModel.from_model(model, mode=mode, max_ctx=64).forward(tokens), ref) < tol, mode
    with pytest.raises(ValueError, match="mla.q_b_proj: 24 columns is not a multiple of 32"):
        InferenceModel.from_model(make_model(), mode="q8")
