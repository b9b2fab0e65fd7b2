"""The engine's forward, loss, gradients and training trajectory equal an
independent PyTorch implementation on the same weights (fp32, CPU)."""
import numpy as np
import pytest
import torch

import smedjan
from conftest import text_batches
from conftest import rel_err
from torch_ref import TorchLlama, schedule

torch.set_num_threads(max(1, smedjan.threads()))

SHAPES = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab=97, B=2, T=16),
    "gqa": dict(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab=300, B=3, T=21),
    "mqa-long-head": dict(dim=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab=64, B=1, T=33),
}


def make(shape, seed=0):
    s = SHAPES[shape]
    cfg = smedjan.Config.custom(s["dim"], s["n_layers"], s["n_heads"], s["n_kv_heads"],
                                vocab_size=s["vocab"], max_seq_len=64)
    model = smedjan.Model(cfg, seed=seed)
    ref = TorchLlama(cfg)
    # Norm gains at 1.0 would hide a wrong gain gradient: randomise them.
    r = np.random.default_rng(seed)
    for name, v in model.params.items():
        if v.ndim == 1:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    ref.load_from(model)
    tokens = r.integers(0, s["vocab"], (s["B"], s["T"])).astype(np.int32)
    targets = r.integers(0, s["vocab"], (s["B"], s["T"])).astype(np.int32)
    return model, ref, tokens, targets


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_torch(shape):
    model, ref, tokens, _ = make(shape)
    ours = model.forward(tokens)
    theirs = ref.forward(torch.from_numpy(tokens).long()).detach().numpy()
    assert rel_err(ours, theirs) < 1e-5, rel_err(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_every_grad_match_torch(shape):
    model, ref, tokens, targets = make(shape)
    targets[0, :3] = -1   # ignored positions count neither in the loss nor its gradient
    loss = model.loss(tokens, targets, backward=True)
    tl = ref.loss(torch.from_numpy(tokens).long(), torch.from_numpy(targets).long())
    tl.backward()
    assert abs(loss - tl.item()) / abs(tl.item()) < 1e-5, (loss, tl.item())
    for name, g in model.grads.items():
        tg = ref.named(name).grad.numpy()
        assert rel_err(g, tg) < 1e-4, (name, rel_err(g, tg))


def test_uint16_tokens_give_the_same_loss():
    model, _, tokens, targets = make("gqa")
    a = model.loss(tokens, targets)
    b = model.loss(tokens.astype(np.uint16), targets.astype(np.uint16))
    assert a == b


def test_grads_accumulate_across_backward_calls():
    model, _, tokens, targets = make("mha")
    model.loss(tokens, targets, backward=True)
    once = model.flat_grads.copy()
    model.loss(tokens, targets, backward=True)
    np.testing.assert_allclose(model.flat_grads, 2 * once, rtol=2e-5, atol=1e-8)
    model.zero_grad()
    assert not model.flat_grads.any()


def test_twenty_training_steps_match_torch(text_bytes):
    """AdamW + warm-up/cosine schedule + clipping on real text: every
    step's loss, and the reported unclipped grad norm, match PyTorch."""
    cfg = smedjan.Config.custom(64, 2, 4, 2, vocab_size=256, max_seq_len=64)
    model = smedjan.Model(cfg, seed=3)
    ref = TorchLlama(cfg)
    ref.load_from(model)
    recipe = dict(lr=3e-3, min_lr=3e-4, warmup=5, steps=20)
    tr = smedjan.Trainer(model, weight_decay=0.1, clip=0.5, betas=(0.9, 0.95), eps=1e-8, **recipe)
    decay = [p for n, p in ref.p.items() if p.ndim == 2]
    no_decay = [p for n, p in ref.p.items() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe["lr"], betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step, (x, y) in enumerate(text_batches(text_bytes, 4, 32, 20)):
        ours = tr.step(x, y)
        for g in opt.param_groups:
            g["lr"] = schedule(step, **recipe)
        opt.zero_grad()
        tl = ref.loss(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        tl.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        assert abs(ours.lr - g["lr"]) <= 1e-6 * g["lr"], (step, ours.lr, g["lr"])
        assert abs(ours.loss - tl.item()) / tl.item() < 1e-4, (step, ours.loss, tl.item())
        assert abs(ours.grad_norm - norm.item()) / norm.item() < 1e-3, (step, ours.grad_norm, norm.item())
    assert ours.loss < 5.0   # it learned something from bytes (ln 256 = 5.55)


def test_schedule_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, steps=101)
    assert smedjan.lr_at(0, **kw) == pytest.approx(0.1)
    assert smedjan.lr_at(5, **kw) == pytest.approx(0.55)
    assert smedjan.lr_at(10, **kw) == pytest.approx(1.0)
    assert smedjan.lr_at(55, **kw) == pytest.approx(0.55)
    assert smedjan.lr_at(100, **kw) == pytest.approx(0.1)
    for s in range(101):
        assert smedjan.lr_at(s, **kw) == pytest.approx(schedule(s, **kw), rel=1e-6)
