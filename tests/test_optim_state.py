"""Optimizer state stored as bf16 (stochastic rounding, seeded) or in 8 bits
(blocks of 256 coded by the dynamic map of Dettmers et al. 2021 with an f32
absmax each): the codecs, 200 steps of training beside fp32 state on real
text, exact resume, the refusal of a resume with another state dtype, and
the bytes the state takes.

The codecs are driven through SGD's first step (cuda_op "sgd_state" on the
CPU backend), which stores the gradient itself: the stored bits are the
codec's alone. Training runs on one thread: these models are small enough
that the thread pool only adds waiting on a shared machine, and the bits
do not depend on it (test_resume_is_bit_identical resumes on two)."""
import os

import numpy as np
import pytest

import smedjan
from smedjan import _C
from smedjan.checkpoint import load_checkpoint, restore, save_checkpoint
from smedjan.io import bf16_to_f32

from conftest import stdlib_text, text_batches

DTYPES = {"fp32": 0, "bf16": 1, "8bit": 2}
BLOCK = 256
#: the tiny preset's architecture, narrowed so that 15 runs of 200 steps fit a test
SMALL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=256)
KINDS = {"adamw": dict(lr=3e-3), "lion": dict(lr=3e-4), "sgd": dict(lr=0.3, momentum=0.9),
         "adafactor": dict(lr=1e-2), "muon": dict(lr=2e-2)}
SHAKESPEARE = "/work/shared/data/corpora/tinyshakespeare.txt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = smedjan.threads()
    smedjan.threads(1)
    yield
    smedjan.threads(before)


@pytest.fixture(scope="module")
def corpus():
    """Shakespeare where the shared data is present, else the standard
    library's sources (real text on every machine)."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, "rb") as f:
            return f.read()
    return stdlib_text(1_000_000)


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7,
    total_bits=8), from its formula: 7 decades 1e-6 .. 1, each the midpoints
    of linspace(0.1, 1) in 2^i (signed, both signs) or 2^(i+1) steps; 0; 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = np.linspace(0.1, 1, (2 ** i if signed else 2 ** (i + 1)) + 1)
        mids = list(10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2)
        values += mids + ([-v for v in mids] if signed else [])
    assert len(values) == 256
    return np.sort(np.array(values)).astype(np.float32)


def store(g, dtype, signed=True, seed=7, step=1):
    """The state bits SGD's first step stores for gradient g: (codes or bf16
    bits or f32, absmax per block)."""
    n = len(g)
    arrays = dict(p=np.zeros(n, np.float32), g=np.asarray(g, np.float32),
                  buf=np.zeros(n, np.float32),   # room for f32; bf16 and 8-bit use part
                  absmax=np.zeros(max(1, (n + BLOCK - 1) // BLOCK), np.float32))
    out = _C.cuda_op("sgd_state", "cpu", arrays, [n, DTYPES[dtype], int(signed), seed, step],
                     [0.0, 0.9])
    raw = out["buf"].view(np.uint8)
    kept = {"fp32": raw.view(np.float32), "bf16": raw.view(np.uint16), "8bit": raw}[dtype]
    return kept[:n], out["absmax"]


def decode_q8(codes, absmax, signed=True):
    scale = np.repeat(absmax, BLOCK)[:len(codes)]
    return dynamic_map(signed)[codes] * scale


def test_the_8bit_maps_are_the_dynamic_maps():
    """Each value of the map, in a block whose absmax is 1, is coded as
    itself: the engine's tables are the formula's, code for code."""
    for signed in (True, False):
        codes, absmax = store(dynamic_map(signed), "8bit", signed)
        assert absmax[0] == 1.0
        np.testing.assert_array_equal(codes, np.arange(256))


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_round_trip_error_is_within_half_a_code_gap(signed, rng):
    """Every value comes back within half the widest gap between
    neighbouring codes times its block's absmax: 0.00703 (signed map) or
    0.00352 (unsigned) of the absmax, up to f32 rounding; the largest |value| of a block comes
    back exactly when positive."""
    n = 40 * BLOCK + 77   # a partial last block too
    g = rng.standard_normal(n).astype(np.float32) * np.repeat(
        10.0 ** rng.uniform(-6, 2, n // BLOCK + 1), BLOCK)[:n].astype(np.float32)
    if not signed:
        g = g * g
    codes, absmax = store(g, "8bit", signed)
    blocks = np.split(np.abs(g), np.arange(BLOCK, n, BLOCK))
    np.testing.assert_array_equal(absmax, [b.max() for b in blocks])
    half_gap = np.diff(dynamic_map(signed).astype(np.float64)).max() / 2
    assert half_gap == pytest.approx(0.00703 if signed else 0.00352, abs=1e-5)
    scale = np.repeat(absmax, BLOCK)[:n].astype(np.float64)
    err = np.abs(decode_q8(codes, absmax, signed) - g) / scale
    assert err.max() <= half_gap + 2 ** -23, err.max()   # + f32 rounding of x / absmax
    top = [i * BLOCK + int(np.argmax(b)) for i, b in enumerate(blocks)]
    positive = [i for i in top if g[i] > 0]
    np.testing.assert_array_equal(decode_q8(codes, absmax, signed)[positive], g[positive])


def test_bf16_stochastic_rounding_is_unbiased_and_seeded(rng):
    """bf16 state: each value is stored as one of its two bf16 neighbours,
    the upper with probability of its distance from the lower, so the mean
    over many elements is the value itself; the bits are a function of
    (seed, step, element): the same again, others at another seed or step."""
    ulp = 2.0 ** -7                             # bf16's at 1
    x = np.float32(1.0 + 0.625 * ulp)           # 0.625 of the way from 1 to 1 + ulp
    g = np.full(1 << 16, x, np.float32)
    bits, _ = store(g, "bf16")
    values = bf16_to_f32(bits)
    assert set(np.unique(values).tolist()) == {1.0, 1.0 + ulp}
    # the mean of 65536 draws: within 4 standard deviations (0.0019 ulp each)
    assert values.astype(np.float64).mean() == pytest.approx(float(x), abs=0.008 * ulp)
    np.testing.assert_array_equal(store(g, "bf16")[0], bits)
    for other in (dict(seed=8), dict(step=2)):
        assert (store(g, "bf16", **other)[0] != bits).mean() > 0.3
    exact = rng.standard_normal(1000).astype(np.float32)
    exact = bf16_to_f32((exact.view(np.uint32) >> 16).astype(np.uint16))
    np.testing.assert_array_equal(bf16_to_f32(store(exact, "bf16")[0]), exact)


def test_fp32_state_is_the_value_itself(rng):
    g = rng.standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(store(g, "fp32")[0], g)


def train(optimizer, dtype, batches, seed=0, **kw):
    m = smedjan.Model("tiny", seed=seed, **SMALL)
    tr = smedjan.Trainer(m, optimizer=optimizer, warmup=10, steps=200, optim_state_dtype=dtype,
                         **{**KINDS[optimizer], **kw})
    return m, tr, [tr.step(x, y).loss for x, y in batches]


@pytest.fixture(scope="module")
def fp32_curves(corpus):
    return {k: train(k, "fp32", text_batches(corpus, 2, 32, 200))[2] for k in KINDS}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "8bit"])
@pytest.mark.parametrize("optimizer", KINDS)
def test_200_steps_stay_beside_fp32_state(optimizer, dtype, corpus, fp32_curves):
    """200 steps on real text (warm-up 10, cosine): the loss curve with
    bf16 or 8-bit state stays within 0.1 of fp32 state's in every window of
    20 steps, and ends (last 20 steps' mean) within 0.05 of it, out of about
    3. Adafactor keeps its statistics fp32: its run is fp32's, bit for bit."""
    ref = np.array(fp32_curves[optimizer])
    got = np.array(train(optimizer, dtype, text_batches(corpus, 2, 32, 200))[2])
    if optimizer == "adafactor":
        np.testing.assert_array_equal(got, ref)
        return
    windows = np.abs(got.reshape(10, 20).mean(1) - ref.reshape(10, 20).mean(1))
    assert ref[-20:].mean() < ref[:10].mean() - 1.0, "fp32 did not learn: the bound says nothing"
    assert windows.max() <= 0.1, (windows, got[-20:].mean(), ref[-20:].mean())
    assert windows[-1] <= 0.05, (windows, got[-20:].mean(), ref[-20:].mean())


def state_bits(tr):
    """A copy of every state buffer's stored bits."""
    return {k: np.asarray(v).copy() for k, v in tr.optimizer_state().items()}


@pytest.mark.parametrize("dtype", ["bf16", "8bit"])
@pytest.mark.parametrize("optimizer", KINDS)
def test_resume_is_bit_identical(optimizer, dtype, corpus, tmp_path):
    """Save after 3 steps, load into a fresh model and Trainer, go on for 3
    more (on two threads): weights, state and losses are those of the 6
    steps run in one go, bit for bit."""
    batches = list(text_batches(corpus, 2, 16, 6, seed=3))
    m, tr, whole = train(optimizer, dtype, batches)
    m1, tr1, first = train(optimizer, dtype, batches[:3])
    path = tmp_path / "half.safetensors"
    save_checkpoint(path, m1, tr1, step=3)
    m2 = smedjan.Model("tiny", seed=1, **SMALL)
    tr2 = smedjan.Trainer(m2, **load_checkpoint(path).trainer)
    restore(load_checkpoint(path), m2, tr2)
    smedjan.threads(2)
    try:
        second = [tr2.step(x, y).loss for x, y in batches[3:]]
    finally:
        smedjan.threads(1)
    assert first + second == whole
    for name, view in m.params.items():
        np.testing.assert_array_equal(np.asarray(m2.params[name]), np.asarray(view), err_msg=name)
    a, b = state_bits(tr2), state_bits(tr)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_checkpoints_keep_the_stored_bits(corpus, tmp_path):
    """bf16 state is saved as BF16, 8-bit as U8 codes with F32 scales."""
    batches = list(text_batches(corpus, 2, 16, 2))
    for dtype, want in (("bf16", {"optim.exp_avg": "BF16", "optim.exp_avg_sq": "BF16"}),
                        ("8bit", {"optim.exp_avg.q8": "U8", "optim.exp_avg.scale": "F32",
                                  "optim.exp_avg_sq.q8": "U8", "optim.exp_avg_sq.scale": "F32"})):
        m, tr, _ = train("adamw", dtype, batches)
        save_checkpoint(tmp_path / f"{dtype}.safetensors", m, tr, step=2)
        ck = load_checkpoint(tmp_path / f"{dtype}.safetensors")
        assert {k: ck.tensors.dtypes[k] for k in ck.tensors if k.startswith("optim.")} == want
        assert ck.trainer["optim_state_dtype"] == dtype


def test_a_resume_with_another_state_dtype_is_refused(tmp_path):
    """The refusal names both dtypes; reset_optimizer starts the new state afresh."""
    m = smedjan.Model("tiny", **SMALL)
    tr = smedjan.Trainer(m, optim_state_dtype="bf16")
    save_checkpoint(tmp_path / "c.safetensors", m, tr, step=5)
    for dtype in ("fp32", "8bit"):
        other = smedjan.Trainer(smedjan.Model("tiny", **SMALL), optim_state_dtype=dtype)
        with pytest.raises(ValueError, match=r"adamw \(bf16 state\).*this Trainer's is adamw"
                                             r".*reset_optimizer=True"):
            restore(load_checkpoint(tmp_path / "c.safetensors"), other.model, other)
        restore(load_checkpoint(tmp_path / "c.safetensors"), other.model, other,
                reset_optimizer=True)
        assert other.step_count == 5
    with pytest.raises(ValueError, match="optim_state_dtype must be one of fp32, bf16, 8bit"):
        smedjan.Trainer(m, optim_state_dtype="fp16")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_device_code_path_stores_the_same_bits(optimizer, corpus):
    """cpu-staged (the CPU kernels behind the device code path) trains to
    the state bits of the plain CPU path with bf16 and 8-bit state."""
    batches = list(text_batches(corpus, 2, 16, 4))
    for dtype in ("bf16", "8bit"):
        runs = []
        for device in ("cpu", "cpu-staged"):
            m = smedjan.Model("tiny", device=device, **SMALL)
            tr = smedjan.Trainer(m, optimizer=optimizer, optim_state_dtype=dtype, steps=10,
                                 **KINDS[optimizer])
            runs.append(([tr.step(x, y).loss for x, y in batches], state_bits(tr)))
        assert runs[0][0] == runs[1][0]
        for k in runs[0][1]:
            np.testing.assert_array_equal(runs[0][1][k], runs[1][1][k], err_msg=k)


def test_bf16_state_halves_and_8bit_quarters_the_bytes():
    """On the tiny preset (2.1M parameters): AdamW's state is 8 bytes a
    parameter in fp32, 4 in bf16 and 2 + 8/256 in 8 bits (a code each and
    an f32 absmax a block of 256, each tensor's run padded to whole
    blocks); planned and held (Model.memory, its peak included) alike.
    (Each buffer is rounded up to 256 bytes.)"""
    n = smedjan.Model("tiny").n_params
    state = {}
    for dtype in DTYPES:
        m = smedjan.Model("tiny")
        m.reset_peak()
        before = m.memory()
        plan = m.plan_memory(2, 16, "train", optimizer="adamw", optim_state_dtype=dtype)
        tr = smedjan.Trainer(m, optim_state_dtype=dtype)
        after = m.memory()
        state[dtype] = after["bytes"] - before["bytes"]   # a step's gradients live in its arena
        assert after["peak_bytes"] - before["peak_bytes"] == after["bytes"] - before["bytes"]
        assert plan["fixed_bytes"] == after["bytes"], dtype
        del tr
    assert 8 * n <= state["fp32"] < 8 * n + 2 * 256
    assert state["fp32"] / state["bf16"] == pytest.approx(2, rel=1e-3)
    assert 3.85 < state["fp32"] / state["8bit"] < 4
