"""Presets, exact sizes and determinism."""
import numpy as np
import pytest

import smedjan

EXPECTED = {  # name: (dim, layers, heads, ffn, max_seq, params at vocab 8192 as in DESIGN.md)
    "tiny": (128, 4, 4, 512, 512, "2.1M"),
    "small": (256, 6, 4, 768, 512, "7.2M"),
    "medium": (512, 12, 8, 1536, 1024, "45.1M"),
    "large": (1024, 16, 16, 2816, 2048, "213.9M"),
    "xl": (1536, 20, 16, 4352, 2048, "602.5M"),
    "max": (2048, 24, 16, 5632, 2048, "1.25B"),
    "huge": (2560, 32, 20, 6912, 4096, "2.56B"),
    "8b": (4096, 32, 32, 11008, 8192, "6.51B"),
}


def count(dim, layers, ffn, vocab=8192):
    """Embedding (tied head) + per layer 4 attention matrices, 3 SwiGLU
    matrices and 2 norm gains, + the final norm."""
    return vocab * dim + layers * (4 * dim * dim + 3 * dim * ffn + 2 * dim) + dim


def rounded(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def test_sizes_match_the_preset_table():
    rows = {r["name"]: r for r in smedjan.sizes(8192)}
    assert list(rows) == list(EXPECTED)
    for name, (dim, layers, heads, ffn, max_seq, approx) in EXPECTED.items():
        r = rows[name]
        assert (r["dim"], r["n_layers"], r["n_heads"], r["ffn_dim"], r["max_seq_len"]) == \
            (dim, layers, heads, ffn, max_seq), name
        assert r["params"] == count(dim, layers, ffn), (name, r["params"])
        assert rounded(r["params"]) == approx, (name, r["params"])


def test_small_and_medium_are_the_documented_sizes():
    rows = {r["name"]: r["params"] for r in smedjan.sizes(8192)}
    assert rows["small"] == 7_212_288 and rows["medium"] == 45_101_568


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_equals_allocated(name):
    m = smedjan.Model(name)
    d = EXPECTED[name]
    assert m.n_params == count(d[0], d[1], d[3]) == m.config.n_params


def test_custom_config_with_gqa():
    c = smedjan.Config.custom(dim=384, n_layers=3, n_heads=6, n_kv_heads=2, ffn_mult=3.0,
                              vocab_size=1000)
    assert c.ffn_dim == 1280 and c.head_dim == 64   # 3.0 * 384 = 1152, rounded up to 256s
    m = smedjan.Model(c)
    assert m.params["layers.0.wk"].shape == (128, 384)
    assert m.n_params == c.n_params


def test_same_seed_same_weights_any_thread_count():
    a = smedjan.Model("tiny", seed=7).flat_params.copy()
    n = smedjan.threads()
    try:
        smedjan.threads(1)
        b = smedjan.Model("tiny", seed=7).flat_params.copy()
    finally:
        smedjan.threads(n)
    c = smedjan.Model("tiny", seed=8).flat_params
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_init_statistics():
    m = smedjan.Model("small", seed=0)
    assert m.params["tok_emb"].std() == pytest.approx(0.02, rel=0.02)
    assert m.params["layers.0.wo"].std() == pytest.approx(0.02 / np.sqrt(12), rel=0.05)
    assert (m.params["final_norm"] == 1).all()


def test_losses_are_bitwise_deterministic_across_thread_counts():
    m = smedjan.Model(smedjan.Config.custom(64, 2, 4, 2, vocab_size=300, max_seq_len=64), seed=1)
    x = np.random.default_rng(0).integers(0, 300, (3, 40)).astype(np.int32)
    a = m.loss(x, x, backward=True)
    ga = m.flat_grads.copy()
    m.zero_grad()
    n = smedjan.threads()
    try:
        smedjan.threads(1)
        b = m.loss(x, x, backward=True)
    finally:
        smedjan.threads(n)
    assert a == b
    np.testing.assert_array_equal(ga, m.flat_grads)


def test_poisoned_arena_gives_the_same_answers(tmp_path):
    """With every arena byte set to NaN before planning, nothing reads memory
    that the step did not write first."""
    import subprocess, sys, os
    code = ("import numpy as np, smedjan; "
            "m = smedjan.Model(smedjan.Config.custom(64, 2, 4, 2, vocab_size=300, max_seq_len=64), seed=1); "
            "x = np.random.default_rng(0).integers(0, 300, (3, 40)).astype(np.int32); "
            "print(repr(m.loss(x, x, backward=True)), repr(float(np.abs(m.flat_grads).sum())), "
            "repr(float(m.forward(x).sum())))")
    env = dict(os.environ)
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    env["SMEDJAN_POISON"] = "1"
    poisoned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and poisoned.returncode == 0, poisoned.stderr
    assert "nan" not in poisoned.stdout and plain.stdout == poisoned.stdout


@pytest.mark.parametrize("fused_ce", [False, True], ids=["logits", "fused_ce"])
def test_an_odd_vocabulary_trains_bit_for_bit_with_aligned_logit_rows(fused_ce, monkeypatch):
    """Loss and train runs keep the logits' rows a multiple of 64 apart (an
    odd vocabulary such as GPT-2's 50257 would cost the head's GEMMs and the
    cross-entropy their aligned paths); the columns past the vocabulary are
    never read, so loss, gradients and the returned logits equal the packed
    layout's bit for bit."""
    cfg = smedjan.Config.custom(64, 2, 4, 2, vocab_size=1001, max_seq_len=32)
    r = np.random.default_rng(0)
    tokens = r.integers(0, 1001, (3, 17)).astype(np.int32)
    targets = r.integers(0, 1001, (3, 17)).astype(np.int32)
    targets[0, :4] = -1
    runs, arenas = [], []
    for align in ("1", "64"):
        monkeypatch.setenv("SMEDJAN_VOCAB_ALIGN", align)
        m = smedjan.Model(cfg, seed=3)
        m.set_levers(fused_ce=fused_ce, ce_rows=26)
        loss = m.loss(tokens, targets, backward=True)
        grads = m.flat_grads.copy()
        tr = smedjan.Trainer(m, lr=1e-2, steps=10)
        steps = [tr.step(tokens, targets).loss for _ in range(3)]
        runs.append((loss, grads, steps, m.flat_params.copy(), m.forward(tokens)))
        arenas.append(m.plan_memory(3, 17, "loss")["arena_bytes"])
    assert fused_ce or arenas[1] > arenas[0]   # the aligned rows are in use
    (l1, g1, s1, p1, f1), (l64, g64, s64, p64, f64) = runs
    assert l1 == l64 and s1 == s64, (l1, l64, s1, s64)
    np.testing.assert_array_equal(g1, g64)
    np.testing.assert_array_equal(p1, p64)
    np.testing.assert_array_equal(f1, f64)
    assert f64.shape == (3, 17, 1001)
