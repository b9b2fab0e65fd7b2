"""Mixture-of-experts layers (ffn="moe") against a PyTorch reference that
loops over the experts: outputs, every gradient (the router's too), the aux
and z losses, bias balancing, generation, checkpoints and bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import smedjan
from smedjan import Config, Model
from smedjan.checkpoint import load_checkpoint, restore, save_checkpoint

from conftest import rel_err
from torch_ref import TorchLlama


def moe_config(router="softmax", ffn=("swiglu", "moe"), **moe):
    spec = dict(n_experts=4, top_k=2, expert_dim=24, n_shared=1, router=router,
                aux_loss=0.01, z_loss=0.001)
    spec.update(moe)
    return Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=61,
                  max_seq_len=64, ffn=list(ffn), moe=spec)


class TorchMoE(TorchLlama):
    """TorchLlama whose MoE layers route each token to its top-k experts, one
    expert at a time (the definition), and add the aux and z losses."""

    def __init__(self, cfg, model):
        torch.nn.Module.__init__(self)
        self.cfg = cfg
        self.p = torch.nn.ParameterDict({self.key(n): torch.nn.Parameter(torch.tensor(np.array(v)))
                                         for n, v in model.params.items()})
        self.extra = []

    def ffn(self, g, kinds, h):
        if kinds["ffn"] != "moe":
            return super().ffn(g, kinds, h)
        mc, C = self.cfg.moe, self.cfg.dim
        E, k, Fe = mc["n_experts"], mc["top_k"], mc["expert_dim"]
        x = h.reshape(-1, C)
        N = x.shape[0]
        logits = x @ g("moe_router").T
        if mc["router"] == "sigmoid":
            scores = torch.sigmoid(logits)
            pick = scores + g("moe_router_bias")
        else:
            scores = logits.softmax(-1)
            pick = scores
        idx = pick.detach().topk(k, dim=-1).indices
        w = scores.gather(1, idx)
        if mc["router"] == "sigmoid" or mc["norm_topk"]:
            w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(E):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if not len(tok):
                continue
            gu = g("moe_w_gate_up")[e * 2 * Fe:(e + 1) * 2 * Fe]
            down = g("moe_w_down")[e * C:(e + 1) * C]
            out = (F.silu(x[tok] @ gu[:Fe].T) * (x[tok] @ gu[Fe:].T)) @ down.T
            y = y.index_add(0, tok, out * w[tok, slot, None])
        if mc["n_shared"]:
            y = y + super().ffn(g, {"ffn": "swiglu"}, x)
        count = torch.bincount(idx.reshape(-1), minlength=E).float()
        q = scores / scores.sum(-1, keepdim=True) if mc["router"] == "sigmoid" else scores
        aux = E / N ** 2 * (count * q.sum(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        self.extra.append((aux, z))
        return y.reshape(h.shape)

    def loss(self, tokens, targets, ignore_index=-1):
        self.extra = []
        ce = super().loss(tokens, targets, ignore_index)
        mc = self.cfg.moe
        return ce + sum(mc["aux_loss"] * a + mc["z_loss"] * z for a, z in self.extra)


def batch(cfg, B=3, T=20, seed=0):
    r = np.random.default_rng(seed)
    return (r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
            r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32))


def perturb_router(m, scale=0.5, seed=1):
    """Routers far from uniform, so that the top-k choice has clear margins."""
    r = np.random.default_rng(seed)
    for name, v in m.params.items():
        if name.endswith("moe.router"):
            v[...] = r.normal(0, scale, v.shape)


@pytest.mark.parametrize("router,extra", [("softmax", {}), ("softmax", {"norm_topk": True}),
                                          ("sigmoid", {})])
def test_moe_logits_loss_and_grads_match_torch(router, extra):
    cfg = moe_config(router, **extra)
    m = Model(cfg, seed=0)
    perturb_router(m)
    if router == "sigmoid":
        m.params["layers.1.moe.router_bias"][...] = np.linspace(-0.1, 0.1, 4)
    tok, tgt = batch(cfg)
    ref = TorchMoE(cfg, m)
    want = ref.forward(torch.from_numpy(tok).long()).detach().numpy()
    got = m.forward(tok)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    loss = m.loss(tok, tgt, backward=True)
    tl = ref.loss(torch.from_numpy(tok).long(), torch.from_numpy(tgt).long())
    tl.backward()
    assert abs(loss - tl.item()) < 1e-5 * abs(tl.item()), (loss, tl.item())
    aux, z = ref.extra[0]
    st = m.moe_stats
    assert abs(st["aux_loss"][0] - aux.item()) < 1e-5 and abs(st["z_loss"][0] - z.item()) < 1e-4
    assert sum(st["load"][0]) == tok.size * cfg.moe["top_k"] and st["dropped"] == 0
    for name, gview in m.grads.items():
        tg = ref.named(name).grad
        want_g = np.zeros(gview.shape, np.float32) if tg is None else tg.numpy()
        if name.endswith("router_bias"):
            assert not np.any(gview), name   # moved by load, never by a gradient
            continue
        err = rel_err(gview, want_g)
        assert err < 1e-4, (name, err)


def test_router_gradient_includes_aux_and_z_losses():
    cfg = moe_config(aux_loss=0.5, z_loss=0.1)
    m = Model(cfg, seed=0)
    perturb_router(m)
    tok, tgt = batch(cfg)
    ref = TorchMoE(cfg, m)
    ref.loss(torch.from_numpy(tok).long(), torch.from_numpy(tgt).long()).backward()
    m.loss(tok, tgt, backward=True)
    want = ref.named("layers.1.moe.router").grad.numpy()
    assert rel_err(m.grads["layers.1.moe.router"], want) < 1e-4


def test_bias_moves_by_load_after_a_backward():
    cfg = moe_config("sigmoid", bias_update_rate=0.01)
    m = Model(cfg, seed=0)
    perturb_router(m)
    tok, tgt = batch(cfg)
    before = m.params["layers.1.moe.router_bias"].copy()
    assert not before.any()
    m.loss(tok, tgt)                      # no backward: the bias stays
    assert not m.params["layers.1.moe.router_bias"].any()
    m.loss(tok, tgt, backward=True)
    load = np.array(m.moe_stats["load"][0])
    mean = tok.size * cfg.moe["top_k"] / cfg.moe["n_experts"]
    want = 0.01 * np.sign(mean - load)
    np.testing.assert_allclose(m.params["layers.1.moe.router_bias"], want, atol=1e-7)


def test_routing_is_deterministic_and_ties_go_to_the_lower_expert():
    cfg = moe_config(n_shared=0)
    m = Model(cfg, seed=0)
    for name, v in m.params.items():
        if name.endswith("moe.router"):
            v[...] = 0   # every score ties: experts 0 and 1 take every token
    tok, _ = batch(cfg)
    a = m.forward(tok)
    assert m.moe_stats["load"][0] == [tok.size, tok.size, 0, 0]
    b = m.forward(tok)
    assert np.array_equal(a, b)


def test_grads_with_checkpointing_and_cheap_recompute_are_the_same():
    cfg = moe_config()
    tok, tgt = batch(cfg)
    grads = []
    for levers in ({}, {"gradient_checkpointing": True}, {"cheap_recompute": True}):
        m = Model(cfg, seed=0)
        perturb_router(m)
        m.set_levers(**levers)
        m.loss(tok, tgt, backward=True)
        grads.append(np.array(m.flat_grads))
    assert np.array_equal(grads[0], grads[1]) and np.array_equal(grads[0], grads[2])


def test_active_and_total_params():
    cfg = moe_config()
    C, E, k, Fe = 32, 4, 2, 24
    assert cfg.n_params - cfg.n_active_params == 3 * C * Fe * (E - k)
    assert Model(cfg).n_params == cfg.n_params


@pytest.mark.parametrize("moe,field", [({"top_k": 5}, "moe.top_k"), ({"n_experts": 0}, "moe.n_experts"),
                                       ({"expert_dim": 0}, "moe.expert_dim"),
                                       ({"bias_update_rate": 0.1}, "moe.bias_update_rate"),
                                       ({"router": "relu"}, "moe.router")])
def test_bad_moe_config_is_refused_naming_the_field(moe, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        moe_config(**moe)


def test_training_reduces_loss_and_resume_is_bit_identical(tmp_path):
    """The balancing bias is state like the weights: it travels in the
    checkpoint, and a resumed run repeats the original bit for bit."""
    cfg = moe_config("sigmoid", bias_update_rate=0.001)
    tok, tgt = batch(cfg, B=4, T=16)
    m = Model(cfg, seed=0)
    tr = smedjan.Trainer(m, lr=3e-3, steps=20)
    losses = [tr.step(tok, tgt).loss for _ in range(4)]
    assert losses[-1] < losses[0]
    assert m.params["layers.1.moe.router_bias"].any()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, m, tr, step=tr.step_count)
    after = [tr.step(tok, tgt).loss for _ in range(3)]
    ck = load_checkpoint(path)
    m2 = Model(ck.config, seed=1)
    tr2 = smedjan.Trainer(m2, **ck.trainer)
    restore(ck, m2, tr2)
    again = [tr2.step(tok, tgt).loss for _ in range(3)]
    assert again == after
    assert np.array_equal(m2.flat_params, m.flat_params)


def test_metrics_rows_carry_the_routing(tmp_path):
    from smedjan.data import Batches, TokenFile, write_tokens
    from smedjan.loop import fit
    cfg = moe_config()
    write_tokens(tmp_path / "data.tok", [np.random.default_rng(0).integers(0, cfg.vocab_size, 4000)
                                         .astype(np.uint16)])
    tokens = TokenFile(tmp_path / "data.tok")
    m = Model(cfg, seed=0)
    tr = smedjan.Trainer(m, lr=1e-3, steps=3)
    path = tmp_path / "metrics.jsonl"
    fit(tr, Batches(tokens, 2, 16, seed=0), metrics_file=str(path), progress=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["moe_load"]) == 1 and sum(row["moe_load"][0]) == 2 * 16 * 2
        assert row["moe_aux_loss"][0] > 0 and row["moe_z_loss"][0] > 0 and row["moe_dropped"] == 0


def gen_config(router="softmax", **moe):
    """Widths that quantise (multiples of 32), context for 64 new tokens."""
    spec = dict(n_experts=4, top_k=2, expert_dim=32, n_shared=1, router=router)
    spec.update(moe)
    return Config(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=97,
                  max_seq_len=96, ffn=["moe", "swiglu", "moe"], moe=spec)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_generation_with_the_cache_equals_recomputation(router):
    from smedjan.generate import generate, generate_recompute
    m = Model(gen_config(router, bias_update_rate=0.01 if router == "sigmoid" else 0.0), seed=3)
    perturb_router(m, 2.0)
    if router == "sigmoid":
        m.params["layers.0.moe.router_bias"][...] = [0.05, -0.02, 0.0, 0.01]
    prompt = [5, 17, 2, 88, 40, 3, 9]
    fast = list(generate(m, prompt, 64, temperature=0))
    slow = list(generate_recompute(m, prompt, 64, temperature=0))
    assert len(fast) == 64 and fast == slow


@pytest.mark.parametrize("mode", ["fp32", "q8", "q4"])
def test_engine_prefill_logits_match_the_model(mode):
    from smedjan.infer import from_model
    m = Model(gen_config(), seed=4)
    perturb_router(m, 2.0)
    tok = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]], np.int32)
    want = m.forward(tok)[0]
    im = from_model(m, mode)
    got = im.forward(tok[0])
    err = rel_err(got, want)
    assert err < {"fp32": 1e-5, "q8": 2e-2, "q4": 1e-1}[mode], err
    s = im.stats()
    assert s["params"] == m.config.n_params and s["active_params"] == m.config.n_active_params
    assert s["active_params"] < s["params"]


def test_decode_reads_only_the_chosen_experts():
    """An expert no token chose can hold anything: a decode step never reads it."""
    from smedjan.infer import from_model
    m = Model(gen_config(n_shared=0), seed=5)
    for name, v in m.params.items():
        if name.endswith("moe.router"):
            v[...] = 0   # ties: experts 0 and 1 always
    ref = from_model(m, "fp32").forward(np.array([7, 8, 9], np.int32))
    for name in ("layers.0.moe.w_gate_up", "layers.2.moe.w_gate_up"):
        m.params[name][2 * 2 * 32:] = np.nan   # experts 2 and 3
    got = from_model(m, "fp32").forward(np.array([7, 8, 9], np.int32))
    assert np.array_equal(got, ref)


def test_gpu_generation_is_refused_by_name():
    from smedjan.infer import from_model
    if not smedjan.build_info().get("cuda_compiled", False):
        pytest.skip("no CUDA build: the GPU engine refuses everything")
    with pytest.raises(ValueError, match="moe layers: GPU generation"):
        from_model(Model(gen_config()), "bf16", device="cuda")


def tiny_hf(cls_name, cfg_name, **kw):
    torch.manual_seed(0)
    c = getattr(transformers, cfg_name)(vocab_size=97, hidden_size=64, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False, **kw)
    m = getattr(transformers, cls_name)(c).eval()
    with torch.no_grad():   # routers far from uniform: clear top-k margins
        for name, p in m.named_parameters():
            if name.endswith("gate.weight") and p.shape[0] == 4:
                p.normal_(0, 0.5)
    return m


def test_mixtral_imports_with_equal_logits_and_exports_back(tmp_path):
    from smedjan.hf import export_hf, load_hf
    hf = tiny_hf("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    hf.save_pretrained(tmp_path / "in")
    m = load_hf(tmp_path / "in")
    assert m.config.moe["n_experts"] == 4 and m.config.ffn == "moe" and m.config.moe["norm_topk"]
    tok = np.array([[1, 5, 9, 33, 2, 71, 40, 8, 8, 3]], np.int32)
    with torch.no_grad():
        want = hf(torch.from_numpy(tok).long()).logits.numpy()
    got = m.forward(tok)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    export_hf(m, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(torch.from_numpy(tok).long()).logits.numpy()
    assert rel_err(again, want) < 1e-6
    assert np.array_equal(load_hf(tmp_path / "out").flat_params, m.flat_params)


@pytest.mark.parametrize("cls,cfg,kw,why", [
    ("OlmoeForCausalLM", "OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2), "OLMoE.*per head"),
    ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
     dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=32), "Qwen2-MoE.*sigmoid gate")])
def test_olmoe_and_qwen2_moe_are_refused_saying_why(tmp_path, cls, cfg, kw, why):
    from smedjan.hf import load_hf
    tiny_hf(cls, cfg, **kw).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=why):
        load_hf(tmp_path)


@pytest.mark.parametrize("moe,ffn,what", [({"router": "sigmoid"}, ("moe",), "router other than softmax"),
                                          ({"n_shared": 1, "norm_topk": True}, ("moe",), "shared experts"),
                                          ({"norm_topk": True}, ("swiglu", "moe"), "some layers only")])
def test_export_of_what_mixtral_cannot_express_is_refused(tmp_path, moe, ffn, what):
    from smedjan.hf import export_hf
    m = Model(moe_config(ffn=ffn, **{"n_shared": 0, **moe}))
    with pytest.raises(ValueError, match=what):
        export_hf(m, tmp_path)
    assert not any(tmp_path.iterdir())


def test_planned_memory_is_the_worst_case_of_any_routing():
    """Dropless routing keeps N k rows whatever the choice: the plan made
    before any token is seen is the arena every batch uses, skewed or not."""
    cfg = moe_config()
    m = Model(cfg, seed=0)
    plan = m.plan_memory(3, 20, "backward")
    assert plan["arena_bytes"] > Model(moe_config(ffn=("swiglu", "swiglu"))).plan_memory(3, 20, "backward")["arena_bytes"]
    tok, tgt = batch(cfg)
    m.loss(tok, tgt, backward=True)
    held = m.memory()["bytes"]
    for name, v in m.params.items():
        if name.endswith("moe.router"):
            v[...] = 0   # every token to experts 0 and 1
    m.loss(tok, tgt, backward=True)
    assert m.memory()["bytes"] == held
    assert held == plan["fixed_bytes"] + plan["arena_bytes"]


def test_the_command_line_takes_the_moe_settings(capsys):
    from smedjan.cli import main
    moe = {"n_experts": 4, "top_k": 2, "expert_dim": 64}
    main(["sizes", "--vocab-size", "97", "--ffn", "swiglu,moe", "--moe", json.dumps(moe)])
    tiny = smedjan.Config.preset("tiny", 97, ffn=["swiglu", "moe"], moe=moe)
    assert f"{tiny.n_params:,}" in capsys.readouterr().out
    assert main(["sizes", "--ffn", "moe", "--moe", '{"n_experts": 4, "top_k": 5, "expert_dim": 8}']) == 1
    assert "moe.top_k must be in 1..moe.n_experts (4), got 5" in capsys.readouterr().err

