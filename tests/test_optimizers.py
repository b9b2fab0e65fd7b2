"""Every optimizer equals its reference, step by step, driven with the
engine's own gradients (fp32, CPU): torch.optim's AdamW, SGD, Adafactor and
Muon, and lion-pytorch's Lion. Parameter groups (lr multiplier, weight
decay) equal torch's param groups; each optimizer's state resumes from a
checkpoint bit for bit; a checkpoint of another optimizer is refused.

The trajectories run 50 steps each, the learning rate moving every step
(warm-up, then cosine), on a reduced model: the "small" preset takes minutes
a trajectory on a CPU test machine (torch's per-tensor steps dominate).
REF keeps every kind of tensor: an untied head, wide (wk, wv, w_down) and
tall (w_gate, w_up) matrices, norm gains."""
import fnmatch

import numpy as np
import pytest
import torch
from lion_pytorch import Lion
from torch.optim import _muon

import smedjan
from conftest import text_batches
from smedjan.checkpoint import load_checkpoint, restore, save_checkpoint
from conftest import rel_err

torch.set_num_threads(max(1, smedjan.threads()))

STEPS = 50
SCHEDULE = dict(warmup=5, steps=STEPS, clip=0.0)
TINY = smedjan.Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=256,
                      max_seq_len=32)


REF = smedjan.Config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=256,
                     max_seq_len=64, tied_head=False)


def small_model(seed=0):
    model = smedjan.Model(REF, seed=seed)
    # Norm gains at 1.0 would hide a wrong update of them: randomise them.
    r = np.random.default_rng(seed)
    for v in model.params.values():
        if v.ndim == 1:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    return model


def torch_params(model):
    return {n: torch.nn.Parameter(torch.from_numpy(np.array(v))) for n, v in model.params.items()}


def default_decay(name, p):
    """The Trainer's default: the matrices decay, the norm gains do not."""
    return p.ndim == 2


def groups_of(params, weight_decay, decay=default_decay, lr_mult=lambda name: 1.0):
    """One torch param group per tensor, carrying its lr multiplier."""
    return [{"params": [p], "weight_decay": weight_decay if decay(n, p) else 0.0,
             "lr_mult": lr_mult(n)} for n, p in params.items()]


def run_against(model, trainer, refs, params, text_bytes, clip=0.0, steps=STEPS, tol=1e-5):
    """Each step: the engine's gradients into both, the engine's update and
    the reference's (lr = the engine's scheduled lr x the group's lr_mult);
    every parameter compared after every step."""
    for step, (x, y) in enumerate(text_batches(text_bytes, 2, 32, steps, seed=5)):
        model.loss(x, y, backward=True)
        for n, g in model.grads.items():
            params[n].grad = torch.from_numpy(np.array(g))
        if clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        _, lr = trainer.optimizer_step()
        for opt in refs:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
            opt.step()
        for n, v in model.params.items():
            err = rel_err(v, params[n].detach().numpy())
            assert err < tol, f"step {step}: {n} differs from the reference by {err:.3g} (relative)"


def test_adamw_matches_torch(text_bytes):
    model = small_model()
    params = torch_params(model)
    tr = smedjan.Trainer(model, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, **SCHEDULE)
    ref = torch.optim.AdamW(groups_of(params, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                            foreach=False)
    run_against(model, tr, [ref], params, text_bytes)


def test_lion_matches_lion_pytorch(text_bytes):
    model = small_model()
    params = torch_params(model)
    tr = smedjan.Trainer(model, optimizer="lion", lr=3e-4, weight_decay=0.5, betas=(0.9, 0.99),
                         **SCHEDULE)
    ref = Lion(groups_of(params, 0.5), lr=3e-4, betas=(0.9, 0.99))
    run_against(model, tr, [ref], params, text_bytes)


@pytest.mark.parametrize("settings", [dict(momentum=0.9, nesterov=True),
                                      dict(momentum=0.9, dampening=0.2),
                                      dict(momentum=0.0)], ids=["nesterov", "dampening", "plain"])
def test_sgd_matches_torch(settings, text_bytes):
    """With L2 weight decay and global-norm clipping."""
    model = small_model()
    params = torch_params(model)
    sched = {**SCHEDULE, "clip": 0.5}
    tr = smedjan.Trainer(model, optimizer="sgd", lr=0.05, weight_decay=0.01, **settings, **sched)
    ref = torch.optim.SGD(groups_of(params, 0.01), lr=0.05, foreach=False, **settings)
    run_against(model, tr, [ref], params, text_bytes, clip=0.5)


def test_adafactor_matches_torch(text_bytes):
    model = small_model()
    params = torch_params(model)
    tr = smedjan.Trainer(model, optimizer="adafactor", lr=1e-2, weight_decay=0.01, **SCHEDULE)
    ref = torch.optim.Adafactor(groups_of(params, 0.01), lr=1e-2, foreach=False)
    run_against(model, tr, [ref], params, text_bytes)


def _newton_schulz_f32(grad, ns_coefficients, ns_steps, eps):
    """torch's _zeropower_via_newtonschulz in float32 instead of bfloat16:
    the engine's CPU iterations run in the model's compute dtype (f32)."""
    a, b, c = ns_coefficients
    x = grad.float()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def is_muon_matrix(name, p):
    """Muon's matrices: the hidden 2-D weights (not the embedding or head)."""
    return p.ndim == 2 and name not in ("tok_emb", "lm_head")


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_matches_torch(adjust_lr_fn, text_bytes, monkeypatch):
    """torch.optim.Muon on the hidden matrices plus torch.optim.AdamW on
    the rest, as the Muon reference splits them; torch's Newton-Schulz
    iterations in f32, as the engine's run for an f32 model."""
    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", _newton_schulz_f32)
    model = small_model()
    params = torch_params(model)
    lr, adamw_lr = 0.02, 3e-3
    tr = smedjan.Trainer(model, optimizer="muon", lr=lr, weight_decay=0.1, momentum=0.95,
                         nesterov=True, adjust_lr_fn=adjust_lr_fn, adamw_lr=adamw_lr,
                         adamw_betas=(0.9, 0.95), adamw_eps=1e-8, **SCHEDULE)
    hidden = {n: p for n, p in params.items() if is_muon_matrix(n, p)}
    rest = {n: p for n, p in params.items() if not is_muon_matrix(n, p)}
    muon = torch.optim.Muon(groups_of(hidden, 0.1), lr=lr, momentum=0.95, nesterov=True,
                            adjust_lr_fn=adjust_lr_fn)
    adamw = torch.optim.AdamW(groups_of(rest, 0.1, lr_mult=lambda n: adamw_lr / lr),
                              lr=adamw_lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    assert set(rest) == {"tok_emb", "lm_head"} | {n for n in params if params[n].ndim == 1}
    run_against(model, tr, [muon, adamw], params, text_bytes)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_param_groups_match_torch_param_groups(optimizer, text_bytes):
    """Globs over names set lr_mult and weight_decay, later groups over
    earlier ones; decay_embedding=False spares the embedding."""
    model = small_model()
    params = torch_params(model)
    groups = [{"params": "layers.*.w_*", "lr_mult": 0.5, "weight_decay": 0.0},
              {"params": ["layers.1.*", "final_norm"], "lr_mult": 2.0},
              {"params": "layers.0.attn_norm", "weight_decay": 0.3}]

    def lr_mult(name):
        return 2.0 if fnmatch.fnmatch(name, "layers.1.*") or name == "final_norm" else \
            0.5 if fnmatch.fnmatch(name, "layers.*.w_*") else 1.0

    def decay(name, p):
        if name == "layers.0.attn_norm":
            return True
        return p.ndim == 2 and name != "tok_emb" and not fnmatch.fnmatch(name, "layers.*.w_*")

    settings = dict(momentum=0.9) if optimizer == "sgd" else {}
    lr = 0.05 if optimizer == "sgd" else 3e-3
    tr = smedjan.Trainer(model, optimizer=optimizer, lr=lr, weight_decay=0.1, param_groups=groups,
                         decay_embedding=False, **settings, **SCHEDULE)
    ref_groups = groups_of(params, 0.1, decay, lr_mult)
    for g, name in zip(ref_groups, params):
        if name == "layers.0.attn_norm":
            g["weight_decay"] = 0.3
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    ref = cls(ref_groups, lr=lr, foreach=False,
              **(settings if optimizer == "sgd" else dict(betas=(0.9, 0.95), eps=1e-8)))
    run_against(model, tr, [ref], params, text_bytes)


def test_a_group_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="matches no parameter"):
        smedjan.Trainer(smedjan.Model(TINY), param_groups=[{"params": "layer.*.wq", "lr_mult": 2}])
    with pytest.raises(ValueError, match="lr_mult must be"):
        smedjan.Trainer(smedjan.Model(TINY), param_groups=[{"params": "*", "lr_mult": -1}])


@pytest.mark.parametrize("optimizer, kw, message", [
    ("adamw", dict(momentum=0.9), "momentum: not a setting of adamw"),
    ("lion", dict(eps=1e-8), "eps: not a setting of lion"),
    ("rmsprop", {}, "optimizer must be one of"),
    ("sgd", dict(momentum=0.0, nesterov=True), "nesterov needs momentum"),
    ("sgd", dict(momentum=1.5), "momentum must be in"),
    ("adafactor", dict(beta2_decay=0.5), "beta2_decay must be"),
    ("adafactor", dict(d=0.5), "d must be"),
    ("muon", dict(ns_steps=0), "ns_steps must be"),
    ("muon", dict(adjust_lr_fn="rms"), "adjust_lr_fn must be"),
    ("lion", dict(betas=(0.9, 1.0)), "betas must be"),
])
def test_settings_are_checked_by_name(optimizer, kw, message):
    with pytest.raises(ValueError, match=message):
        smedjan.Trainer(smedjan.Model(TINY), optimizer=optimizer, **kw)


KINDS = {"adamw": {}, "lion": {}, "sgd": dict(momentum=0.9, nesterov=True),
         "adafactor": {}, "muon": {}}


def tiny_run(optimizer, steps, tokens, ckpt=None, at=None):
    """Train `steps` steps; with ckpt and at, checkpoint after `at` of them
    and continue in a fresh model and Trainer restored from it."""
    model = smedjan.Model(TINY, seed=1)
    tr = smedjan.Trainer(model, optimizer=optimizer, lr=1e-3, warmup=2, steps=10,
                         **KINDS[optimizer])
    for i, (x, y) in enumerate(tokens[:steps]):
        if i == at:
            save_checkpoint(ckpt, model, tr, step=tr.step_count)
            c = load_checkpoint(ckpt)
            model = smedjan.Model(TINY, seed=99)
            tr = smedjan.Trainer(model, **c.trainer)
            restore(c, model, tr)
        tr.step(x, y)
    return model, tr


@pytest.mark.parametrize("optimizer", KINDS)
def test_resume_is_bit_identical(optimizer, tmp_path, text_bytes):
    tokens = list(text_batches(text_bytes, 2, 16, 6, seed=3))
    whole, tw = tiny_run(optimizer, 6, tokens)
    resumed, tr = tiny_run(optimizer, 6, tokens, tmp_path / "ck.safetensors", at=3)
    assert tr.optimizer == optimizer and tr.step_count == tw.step_count == 6
    np.testing.assert_array_equal(resumed.flat_params, whole.flat_params)
    a, b = tr.optimizer_state(), tw.optimizer_state()
    assert list(a) == list(b) and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_another_optimizer_is_refused_on_resume_unless_reset(tmp_path, text_bytes):
    tokens = list(text_batches(text_bytes, 2, 16, 3, seed=3))
    model, lion = tiny_run("lion", 3, tokens)
    p = tmp_path / "lion.safetensors"
    save_checkpoint(p, model, lion, step=lion.step_count)
    c = load_checkpoint(p)
    assert c.optimizer == "lion" and set(c.optimizer_state) == {"exp_avg"}
    m2 = smedjan.Model(TINY, seed=5)
    adamw = smedjan.Trainer(m2, lr=1e-3, steps=10)
    before = m2.flat_params.copy()
    with pytest.raises(ValueError, match=r"optimizer state is lion .*this Trainer's is adamw.*"
                                         r"reset_optimizer=True"):
        restore(c, m2, adamw)
    np.testing.assert_array_equal(m2.flat_params, before)   # refused before anything moved
    restore(c, m2, adamw, reset_optimizer=True)
    np.testing.assert_array_equal(m2.flat_params, model.flat_params)
    assert adamw.step_count == 3 and not adamw.exp_avg.any() and not adamw.exp_avg_sq.any()


def test_a_state_of_another_shape_is_refused_on_resume(tmp_path):
    """SGD with momentum keeps a buffer; without, none: not interchangeable."""
    model = smedjan.Model(TINY)
    tr = smedjan.Trainer(model, optimizer="sgd", momentum=0.9)
    p = tmp_path / "sgd.safetensors"
    save_checkpoint(p, model, tr, step=0)
    plain = smedjan.Trainer(smedjan.Model(TINY), optimizer="sgd")
    with pytest.raises(ValueError, match="sgd momentum=0.9 .*this Trainer's is sgd momentum=0.0"):
        restore(load_checkpoint(p), plain.model, plain)


def test_the_state_is_planned_and_held_as_each_optimizer_needs():
    """Bytes of state a parameter: AdamW 8, Lion 4, SGD 4 with momentum and
    0 without (each buffer rounded up to 256 bytes); Adafactor a row and a
    column a matrix; Muon 4 on its matrices, 8 elsewhere, plus its
    Newton-Schulz scratch."""
    model = smedjan.Model(TINY)
    n = model.n_params
    base = model.plan_memory(2, 16, "train", 2, optimizer="sgd")["fixed_bytes"]
    state = {k: model.plan_memory(2, 16, "train", 2, optimizer=k, momentum=0.9)["fixed_bytes"] - base
             for k in ("adamw", "lion", "sgd")}
    exact = {"adamw": 8 * n, "lion": 4 * n, "sgd": 4 * n}
    buffers = {"adamw": 2, "lion": 1, "sgd": 1}
    assert all(0 <= state[k] - exact[k] < 256 * buffers[k] for k in exact), (state, exact)
    mats = [t for t in model._h.tensors() if len(t[1]) == 2]
    fact = model.plan_memory(2, 16, "train", 2, optimizer="adafactor")["fixed_bytes"] - base
    vectors = sum(t[1][0] for t in model._h.tensors() if len(t[1]) == 1)
    assert 4 * (sum(r + c for _, (r, c), *_ in mats) + vectors) <= fact < 4 * n
    for optimizer, kw in KINDS.items():
        m = smedjan.Model(TINY)
        held = m.memory()["bytes"]
        tr = smedjan.Trainer(m, optimizer=optimizer, **kw)
        planned = m.plan_memory(2, 16, "train", 2, optimizer=optimizer,
                                momentum=kw.get("momentum"))["fixed_bytes"] - base
        assert m.memory()["bytes"] - held == planned, optimizer
        del tr


@pytest.mark.parametrize("optimizer", KINDS)
def test_the_device_code_path_updates_bit_for_bit(optimizer, text_bytes):
    """cpu-staged (the CPU kernels behind the device code path: the
    hyper-parameters and the norm read from backend memory) trains each
    optimizer to the same bits as the plain CPU path."""
    runs = []
    for device in ("cpu", "cpu-staged"):
        m = smedjan.Model(TINY, seed=2, device=device)
        tr = smedjan.Trainer(m, optimizer=optimizer, lr=1e-3, warmup=2, steps=6, clip=0.5,
                             **KINDS[optimizer])
        runs.append(([tuple(tr.step(x, y)) for x, y in text_batches(text_bytes, 2, 16, 5)],
                     m.flat_params.copy()))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_train_cli_takes_the_optimizer_flags_and_resets_on_request(tmp_path, capsys):
    from smedjan.cli import build_parser, main
    from smedjan.commands import optimizer_options
    from smedjan.data import write_tokens
    data, ck = str(tmp_path / "d.tok"), str(tmp_path / "ck")
    write_tokens(data, [np.random.default_rng(0).integers(0, 256, 10_000)], dtype="uint16")
    base = ["train", "--data", data, "--vocab-size", "256", "--size", "custom", "--dim", "32",
            "--layers", "2", "--heads", "4", "--seq-len", "16", "--batch-size", "2",
            "--warmup", "1", "--val-fraction", "0", "--checkpoint-dir", ck]
    args = build_parser().parse_args(base + [
        "--optimizer", "muon", "--momentum", "0.9", "--no-nesterov", "--ns-coefficients", "3,-4,2",
        "--adjust-lr-fn", "match_rms_adamw", "--param-groups", '[{"params": "tok_emb", "lr_mult": 2}]',
        "--no-decay-embedding"])
    assert optimizer_options(args) == dict(
        optimizer="muon", momentum=0.9, nesterov=False, ns_coefficients=(3.0, -4.0, 2.0),
        adjust_lr_fn="match_rms_adamw", param_groups=[{"params": "tok_emb", "lr_mult": 2}],
        decay_embedding=False)
    args = build_parser().parse_args(base + ["--optimizer", "adafactor", "--eps", "none,1e-3"])
    assert optimizer_options(args)["eps"] == (None, 1e-3)
    assert main(base + ["--steps", "4", "--max-steps", "2", "--optimizer", "lion"]) == 0
    assert load_checkpoint(tmp_path / "ck" / "latest.safetensors").optimizer == "lion"
    capsys.readouterr()
    assert main(base + ["--steps", "4", "--resume", "--optimizer", "sgd"]) != 0
    err = capsys.readouterr().err
    assert "optimizer state is lion (exp_avg), this Trainer's is sgd" in err and \
        "--reset-optimizer" in err, err
    assert main(base + ["--steps", "4", "--resume", "--optimizer", "sgd", "--momentum", "0.9",
                        "--reset-optimizer"]) == 0
    c = load_checkpoint(tmp_path / "ck" / "latest.safetensors")
    assert c.optimizer == "sgd" and c.step == 4 and c.trainer["momentum"] == 0.9
    assert "step 4: loss" in capsys.readouterr().out


def test_a_trainer_says_what_it_runs():
    m = smedjan.Model(smedjan.Config.custom(32, 1, 2, 1, vocab_size=64))
    assert repr(smedjan.Trainer(m, lr=1e-3, steps=100)) == (
        "Trainer(adamw, lr=0.001 -> 0.0001 over 100 steps (warmup 0), weight_decay=0.1, clip=1, "
        "betas=(0.9, 0.95), eps=1e-08, step=0)")
