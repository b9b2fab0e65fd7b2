"""Linear attention (mixer "linear") against its definition: a PyTorch model
written here whose token mixer is a plain loop over time (S = exp(a) S + phi(k)
v^T, y = S^T phi(q) / sqrt(hd), optionally over scale phi(q) . sum decay phi(k) +
eps), logits 1e-5 and every gradient 1e-4 relative; training, and generation
against recomputation with a constant state."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smedjan
from conftest import assert_model_matches, max_rel_err

torch.set_num_threads(max(1, smedjan.threads()))

OPTIONS = {
    "identity": dict(),
    "elu1-normalized": dict(feature="elu1", normalize=True),
    "gated": dict(decay="gated"),
    "elu1-gated-normalized": dict(feature="elu1", decay="gated", normalize=True, chunk_size=4),
}


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def linear_ref(h, P, l, cfg):
    o = cfg.linear
    B, T, C = h.shape
    H = cfg.n_heads
    hd = C // H
    phi = (lambda x: torch.where(x > 0, x + 1, torch.exp(x))) if o["feature"] == "elu1" else (lambda x: x)
    q = phi(h @ P[f"layers.{l}.wq"].T).reshape(B, T, H, hd)
    k = phi(h @ P[f"layers.{l}.wk"].T).reshape(B, T, H, hd)
    v = (h @ P[f"layers.{l}.wv"].T).reshape(B, T, H, hd)
    if o["normalize"]:
        v = torch.cat([v, torch.ones(B, T, H, 1, dtype=v.dtype)], -1)
    a = F.logsigmoid(h @ P[f"layers.{l}.wg"].T) if o["decay"] == "gated" else None
    S = torch.zeros(B, H, hd, v.shape[-1], dtype=h.dtype)
    ys = []
    for t in range(T):
        decay = torch.exp(a[:, t])[..., None, None] if a is not None else 1.0
        S = decay * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        y = torch.einsum("bhk,bhkv->bhv", q[:, t], S) / hd ** 0.5
        if o["normalize"]:
            y = y[..., :hd] / (y[..., hd:] + cfg.norm_eps)
        ys.append(y.reshape(B, C))
    return torch.stack(ys, 1) @ P[f"layers.{l}.wo"].T


def ref_logits(P, cfg, tokens):
    x = P["tok_emb"][tokens]
    for l in range(cfg.n_layers):
        x = x + linear_ref(rms(x, P[f"layers.{l}.attn_norm"], cfg.norm_eps), P, l, cfg)
        h = rms(x, P[f"layers.{l}.ffn_norm"], cfg.norm_eps)
        x = x + (F.silu(h @ P[f"layers.{l}.w_gate"].T) * (h @ P[f"layers.{l}.w_up"].T)) @ P[f"layers.{l}.w_down"].T
    return rms(x, P["final_norm"], cfg.norm_eps) @ P["tok_emb"].T


def config(n_layers=2, **linear):
    return smedjan.Config.custom(32, n_layers, 4, vocab_size=97, max_seq_len=256, mixer="linear",
                                 linear=linear)


@pytest.mark.parametrize("option", OPTIONS)
def test_logits_and_every_gradient_match_a_recurrent_loop(option):
    cfg = config(**OPTIONS[option])
    model = smedjan.Model(cfg, seed=1)
    r = np.random.default_rng(0)
    for name, v in model.params.items():
        if v.ndim == 1:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    tokens = r.integers(0, 97, (2, 19)).astype(np.int32)
    targets = r.integers(0, 97, (2, 19)).astype(np.int32)
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in model.params.items()}
    assert_model_matches(model, tokens, targets, lambda t: ref_logits(P, cfg, t), lambda n: P[n].grad.numpy(),
                         max_rel_err)


def test_config_canonical_form_and_refusals():
    assert config().linear == {"feature": "identity", "normalize": False, "decay": "none", "chunk_size": 64}
    with pytest.raises(ValueError, match="linear.feature"):
        config(feature="relu")
    with pytest.raises(ValueError, match="linear.chunk_size"):
        config(chunk_size=0)
    m = smedjan.Model(config(decay="gated"))
    assert m.params["layers.0.wg"].shape == (4, 32) and m.n_params == m.config.n_params


@pytest.mark.parametrize("option", ["elu1-gated-normalized", "gated"])
def test_linear_attention_trains(option):
    model = smedjan.Model(config(**OPTIONS[option]), seed=0)
    tr = smedjan.Trainer(model, lr=3e-3)
    text = (np.arange(25 * 8, dtype=np.int32) * 7 % 23)[None, :]
    x, y = text[:, :-1], text[:, 1:]
    first = model.loss(x, y)
    for _ in range(30):
        tr.step(x, y)
    assert model.loss(x, y) < 0.5 * first


@pytest.mark.parametrize("option", ["elu1-gated-normalized", "identity"])
def test_generation_equals_recomputation_for_128_tokens(option):
    from smedjan.infer import InferenceModel
    model = smedjan.Model(config(3, **OPTIONS[option]), seed=3)
    r = np.random.default_rng(0)
    for v in model.params.values():   # large projections: a model that does not repeat itself
        if v.ndim == 2:
            v[:] = r.standard_normal(v.shape) * 4 / np.sqrt(v.shape[1])
    prompt = list(np.random.default_rng(1).integers(0, 97, 37))
    gen = InferenceModel.from_model(model, "fp32")
    ours = [int(np.argmax(gen.prefill(prompt)))]
    ours += [int(t) for t in gen.greedy(ours[0], 127)]
    assert len(set(ours)) > 20, ours
    ids = list(prompt)
    for _ in range(128):
        ids.append(int(model.forward(np.array([ids], np.int32))[0, -1].argmax()))
    assert ours == ids[len(prompt):]
    short = InferenceModel.from_model(model, "fp32", max_ctx=64)
    assert gen.memory()["cache_bytes"] == short.memory()["cache_bytes"]   # no KV rows: a constant state
