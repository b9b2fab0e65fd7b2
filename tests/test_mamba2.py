"""The Mamba-2 mixer (mixer "mamba2", ffn "none") against its definition: a
PyTorch model written here whose SSM is a plain loop over time (the state
S = exp(dt A) S + dt x B^T, y = S C + D x), logits 1e-5 and every gradient 1e-4
(fp32, relative); training, generation against recomputation, hybrid stacks with
attention (train, checkpoint, resume bit-identically, generate), transformers'
Mamba2ForCausalLM import and export, and constant generation memory."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smedjan
from conftest import assert_model_matches, max_rel_err

torch.set_num_threads(max(1, smedjan.threads()))

SSM = {"d_state": 8, "d_conv": 4, "expand": 2, "head_dim": 8, "n_groups": 2, "chunk_size": 8}


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mamba2_ref(h, P, l, cfg):
    """One Mamba-2 mixer, h: (B, T, C) -> (B, T, C), its scan a loop over time."""
    s = cfg.ssm
    B_, T, C = h.shape
    d_inner = s["expand"] * C
    Pd, N, G, K = s["head_dim"], s["d_state"], s["n_groups"], s["d_conv"]
    H = d_inner // Pd
    conv_dim = d_inner + 2 * G * N
    p = lambda n: P[f"layers.{l}.ssm.{n}"]
    zx = h @ p("in_proj").T
    z, xbc, dt = zx.split([d_inner, conv_dim, H], dim=-1)
    padded = F.pad(xbc, (0, 0, K - 1, 0))
    w = p("conv_w")
    xbc = F.silu(p("conv_b") + sum(w[:, j] * padded[:, j:j + T] for j in range(K)))
    x, Bm, Cm = xbc.split([d_inner, G * N, G * N], dim=-1)
    x = x.reshape(B_, T, H, Pd)
    Bm = Bm.reshape(B_, T, G, N).repeat_interleave(H // G, dim=2)
    Cm = Cm.reshape(B_, T, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + p("dt_bias"))
    A = -torch.exp(p("A_log"))
    S = torch.zeros(B_, H, Pd, N, dtype=h.dtype)
    ys = []
    for t in range(T):
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + \
            (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Cm[:, t]) + p("D")[:, None] * x[:, t])
    y = torch.stack(ys, 1).reshape(B_, T, d_inner) * F.silu(z)
    y = y.reshape(B_, T, G, d_inner // G)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).reshape(B_, T, d_inner)
    return (y * p("norm")) @ p("out_proj").T


def ref_logits(P, cfg, tokens):
    x = P["tok_emb"][tokens]
    for l in range(cfg.n_layers):
        x = x + mamba2_ref(rms(x, P[f"layers.{l}.attn_norm"], cfg.norm_eps), P, l, cfg)
        if cfg.layer(l)["ffn"] != "none":
            h = rms(x, P[f"layers.{l}.ffn_norm"], cfg.norm_eps)
            x = x + (F.silu(h @ P[f"layers.{l}.w_gate"].T) * (h @ P[f"layers.{l}.w_up"].T)) @ P[f"layers.{l}.w_down"].T
    x = rms(x, P["final_norm"], cfg.norm_eps)
    return x @ P["lm_head" if "lm_head" in P else "tok_emb"].T


def config(n_layers=2, **kw):
    base = dict(vocab_size=97, max_seq_len=256, mixer="mamba2", ffn="none", ssm=SSM)
    return smedjan.Config.custom(32, n_layers, 4, **{**base, **kw})


@pytest.mark.parametrize("ffn,T", [("none", 21), ("swiglu", 8), ("none", 1)])
def test_logits_and_every_gradient_match_a_recurrent_loop(ffn, T):
    cfg = config(ffn=ffn)
    model = smedjan.Model(cfg, seed=1)
    r = np.random.default_rng(0)
    for name, v in model.params.items():
        if name.endswith(("norm", ".D")):   # gains at 1.0 would hide a wrong gain gradient
            v[:] = r.uniform(0.5, 1.5, v.shape)
    tokens = r.integers(0, 97, (2, T)).astype(np.int32)
    targets = r.integers(0, 97, (2, T)).astype(np.int32)
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    assert_model_matches(model, tokens, targets, lambda t: ref_logits(P, cfg, t), lambda n: P[n].grad.numpy(),
                         max_rel_err)


def test_parameter_table_and_weight_decay():
    model = smedjan.Model(config(), seed=0)
    names = {n for n, _, _ in model.tensors}
    assert {"layers.0.ssm.in_proj", "layers.0.ssm.conv_w", "layers.0.ssm.conv_b", "layers.0.ssm.dt_bias",
            "layers.0.ssm.A_log", "layers.0.ssm.D", "layers.0.ssm.norm", "layers.0.ssm.out_proj",
            "layers.0.attn_norm"} <= names
    assert not any(n.startswith("layers.0.w") or n == "layers.0.ffn_norm" for n in names)
    assert model.n_params == model.config.n_params
    A = -np.exp(model.params["layers.0.ssm.A_log"])
    assert (-16 <= A).all() and (A <= -1).all()
    dt = np.log1p(np.exp(model.params["layers.0.ssm.dt_bias"]))
    assert (dt >= 1e-4).all() and (dt <= 0.1 + 1e-6).all()
    assert (model.params["layers.0.ssm.D"] == 1).all()
    decays = {n: d for n, _, _, d in model._h.tensors()}
    assert decays["layers.0.ssm.in_proj"] and decays["layers.0.ssm.out_proj"]
    for n in ("A_log", "D", "dt_bias", "norm", "conv_b"):   # no weight decay by default
        assert not decays[f"layers.0.ssm.{n}"], n


def test_config_names_the_field_it_refuses():
    with pytest.raises(ValueError, match="ssm.head_dim"):
        config(ssm={**SSM, "head_dim": 7})
    with pytest.raises(ValueError, match="ssm.n_groups"):
        config(ssm={**SSM, "n_groups": 3})
    assert config(ssm=None).ssm["d_state"] == 128   # defaults fill in


def test_mamba2_trains():
    model = smedjan.Model(config(), seed=0)
    tr = smedjan.Trainer(model, lr=3e-3)
    text = np.tile(np.arange(24, dtype=np.int32) % 11, 8)[None, :]
    x, y = text[:, :-1], text[:, 1:]
    first = model.loss(x, y)
    for _ in range(30):
        tr.step(x, y)
    assert model.loss(x, y) < 0.5 * first


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.forward(np.array([ids], np.int32))[0, -1].argmax()))
    return ids[len(prompt):]


def greedy_by_engine(model, prompt, n, **kw):
    from smedjan.infer import InferenceModel
    gen = InferenceModel.from_model(model, "fp32", **kw)
    logits = gen.prefill(prompt)
    out = [int(np.argmax(logits))]
    out += [int(t) for t in gen.greedy(out[0], n - 1)]
    return gen, out


@pytest.mark.parametrize("mixer,ffn", [("mamba2", "none"), (["mamba2", "mamba2", "mamba2", "attention"],
                                                               ["none", "none", "none", "swiglu"])])
def test_generation_equals_recomputation_for_128_tokens(mixer, ffn):
    model = smedjan.Model(config(4, mixer=mixer, ffn=ffn), seed=3)
    r = np.random.default_rng(0)
    for v in model.params.values():   # unit-variance projections: a model that does not repeat itself
        if v.ndim == 2:
            v[:] = r.standard_normal(v.shape) / np.sqrt(v.shape[1])
    prompt = list(np.random.default_rng(1).integers(0, 97, 37))
    gen, ours = greedy_by_engine(model, prompt, 128)
    assert len(set(ours)) > 20, ours
    assert ours == greedy_by_recomputation(model, prompt, 128)
    # reset forgets the state: the same prompt gives the same tokens again
    gen.reset()
    again = [int(np.argmax(gen.prefill(prompt)))]
    assert again[0] == ours[0]
    assert [int(t) for t in gen.greedy(again[0], 15)] == ours[1:16]


def test_prefill_logits_match_the_training_forward():
    model = smedjan.Model(config(), seed=4)
    tokens = np.random.default_rng(2).integers(0, 97, 150).astype(np.int32)   # > one 128-token chunk
    from smedjan.infer import InferenceModel
    gen = InferenceModel.from_model(model, "fp32")
    got = gen.prefill(tokens, all_logits=True)
    assert max_rel_err(got, model.forward(tokens[None])[0]) < 1e-4


def test_generation_memory_is_constant_in_the_context():
    """A 16k-token prompt generates with the cache bytes of a 1k one."""
    from smedjan.infer import InferenceModel
    model = smedjan.Model(config(max_seq_len=20000), seed=5)
    short = InferenceModel.from_model(model, "fp32", max_ctx=1024)
    long = InferenceModel.from_model(model, "fp32", max_ctx=17000)
    assert long.memory()["cache_bytes"] == short.memory()["cache_bytes"]
    prompt = np.random.default_rng(3).integers(0, 97, 16384).astype(np.int32)
    logits = long.prefill(prompt)
    assert np.isfinite(logits).all()
    nxt = long.greedy(int(np.argmax(logits)), 4)
    assert len(nxt) == 4 and long.pos == 16384 + 4
    assert long.memory()["cache_bytes"] == short.memory()["cache_bytes"]


HYBRID = dict(mixer=["mamba2", "mamba2", "mamba2", "attention"], ffn=["none", "none", "none", "swiglu"])
TRAIN = dict(lr=3e-3, min_lr=3e-4, warmup=2, steps=20, weight_decay=0.1, clip=1.0)


def trained_hybrid(tokens, n_steps):
    from smedjan.data import Batches
    m = smedjan.Model(config(4, **HYBRID), seed=0)
    tr = smedjan.Trainer(m, **TRAIN)
    b = Batches(tokens, 2, 24, seed=7)
    losses = [tr.step(*next(b)).loss for _ in range(n_steps)]
    return m, tr, b, losses


@pytest.fixture
def tokens(tmp_path, text_bytes):
    from smedjan.data import TokenFile, write_tokens
    p = tmp_path / "data.tok"
    write_tokens(p, [np.frombuffer(text_bytes[:50_000], np.uint8) % 97])
    return TokenFile(p)


def test_hybrid_stack_trains_saves_resumes_bit_identically_and_generates(tmp_path, tokens):
    from smedjan.checkpoint import load_checkpoint, restore, save_checkpoint
    from smedjan.data import Batches
    ref, ref_tr, _, losses = trained_hybrid(tokens, 6)
    m, tr, b, _ = trained_hybrid(tokens, 3)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, tr, step=tr.step_count, loader_state=b.state_dict())
    ck = load_checkpoint(p)
    assert ck.config == m.config and ck.config.layer(3)["mixer"] == "attention"
    m2 = smedjan.Model(ck.config, seed=9)
    tr2 = smedjan.Trainer(m2, **ck.trainer)
    restore(ck, m2, tr2)
    b2 = Batches(tokens, 2, 24, seed=0)
    b2.load_state_dict(ck.loader)
    for _ in range(3):
        tr2.step(*next(b2))
    diff = np.flatnonzero(m2.flat_params != ref.flat_params)
    assert diff.size == 0, f"{diff.size} params differ"
    np.testing.assert_array_equal(tr2.exp_avg_sq, ref_tr.exp_avg_sq)
    prompt = [1, 2, 3, 4, 5]
    assert greedy_by_engine(m2, prompt, 8)[1] == greedy_by_recomputation(m2, prompt, 8)


def test_hybrid_loss_falls():
    model = smedjan.Model(config(4, **HYBRID), seed=0)
    tr = smedjan.Trainer(model, lr=3e-3)
    text = (np.arange(25 * 8, dtype=np.int32) * 7 % 23)[None, :]
    x, y = text[:, :-1], text[:, 1:]
    first = model.loss(x, y)
    for _ in range(30):
        tr.step(x, y)
    assert model.loss(x, y) < 0.5 * first


def hf_mamba2(tied=False):
    transformers = pytest.importorskip("transformers")
    hc = transformers.Mamba2Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                   head_dim=8, num_heads=8, n_groups=2, chunk_size=8, conv_kernel=4,
                                   tie_word_embeddings=tied, layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    m = transformers.Mamba2ForCausalLM(hc).eval()
    with torch.no_grad():   # away from 1.0 and 0: wrong gains or a missing bias would show
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
                p.uniform_(0.5, 1.5)
    return transformers, m


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_mamba2_imports_with_equal_logits(tmp_path, tied):
    from smedjan.hf import load_hf
    transformers, hf = hf_mamba2(tied)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.layer(0)["mixer"] == "mamba2" and ours.config.ssm["n_groups"] == 2
    tokens = np.random.default_rng(0).integers(0, 97, (2, 19)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert max_rel_err(ours.forward(tokens), want) < 1e-4


def test_export_loads_back_in_transformers(tmp_path):
    from smedjan.hf import export_hf
    transformers = pytest.importorskip("transformers")
    model = smedjan.Model(config(), seed=6)
    r = np.random.default_rng(1)
    for name, v in model.params.items():
        if name.endswith(("norm", ".D")):
            v[:] = r.uniform(0.5, 1.5, v.shape)
    export_hf(model, tmp_path)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = np.random.default_rng(2).integers(0, 97, (1, 23)).astype(np.int32)
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens).long()).logits.numpy()
    assert max_rel_err(model.forward(tokens), want) < 1e-4


def test_hybrid_stack_has_no_transformers_form(tmp_path):
    from smedjan.hf import export_hf
    with pytest.raises(ValueError, match="hybrid"):
        export_hf(smedjan.Model(config(4, **HYBRID)), tmp_path)


@pytest.mark.parametrize("lever", ["gradient_checkpointing", "cheap_recompute", "fp16_activations"])
def test_memory_levers_keep_the_gradients(lever):
    """Recomputed activations of the scan mixers: bit-identical loss and gradients (fp16-stored ones: close)."""
    cfg = config(4, mixer=["mamba2", "linear", "mamba2", "attention"], ffn=["none", "swiglu", "none", "swiglu"])
    r = np.random.default_rng(0)
    x = r.integers(0, 97, (2, 21)).astype(np.int32)
    y = r.integers(0, 97, (2, 21)).astype(np.int32)
    plain = smedjan.Model(cfg, seed=2)
    want = plain.loss(x, y, backward=True)
    model = smedjan.Model(cfg, seed=2)
    model.set_levers(**{lever: True})
    got = model.loss(x, y, backward=True)
    tol = 1e-3 if lever == "fp16_activations" else 0
    assert abs(got - want) <= tol * abs(want)
    assert max_rel_err(model.flat_grads, plain.flat_grads) < (1e-2 if lever == "fp16_activations" else 1e-12)
