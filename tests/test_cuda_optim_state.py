"""bf16 and 8-bit optimizer state on the GPU: the stored bits are the CPU
engine's for the same f32 values (the codecs through SGD, whose first step
stores the gradient itself and whose second decodes, updates with fmaf and
codes again: the same arithmetic on both); every optimizer trains beside
the CPU engine with each state dtype; the captured step equals eager bit
for bit; resume is bit-identical; the state's bytes halve and quarter."""
import numpy as np
import pytest

import smedjan
from smedjan import _C
from conftest import text_batches
import cuda_ref as ref
from smedjan.checkpoint import load_checkpoint, restore, save_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ref.gpu_present(), reason="no CUDA GPU")]

STATE = {"fp32": 0, "bf16": 1, "8bit": 2}
BYTES = {"fp32": 4, "bf16": 2, "8bit": 1}
BLOCK = 256
CFG = smedjan.Config(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=320, vocab_size=256,
                     max_seq_len=128, tied_head=False)
KINDS = {"adamw": dict(lr=3e-3), "lion": dict(lr=3e-4, weight_decay=0.1),
         "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
         "muon": dict(lr=0.02, adamw_lr=3e-3)}


def sgd_state(backend, g, dtype, signed, steps):
    """SGD (lr 0.01, momentum 0.9) for `steps` steps on gradient g over a
    state of `dtype`: (weights, the state's stored bytes, its absmax)."""
    n = len(g)
    arrays = dict(p=np.zeros(n, np.float32), g=g, buf=np.zeros(n, np.float32),
                  absmax=np.zeros((n + BLOCK - 1) // BLOCK, np.float32))
    for step in range(1, steps + 1):
        out = _C.cuda_op("sgd_state", backend, arrays, [n, STATE[dtype], int(signed), 11, step],
                         [0.01, 0.9])
        arrays.update(p=out["p"], buf=out["buf"], absmax=out["absmax"])
    return arrays["p"], arrays["buf"].view(np.uint8)[:n * BYTES[dtype]], arrays["absmax"]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", ["bf16", "8bit"])
def test_the_gpu_stores_the_cpu_bits(dtype, signed, steps):
    r = np.random.default_rng(5)
    n = 37 * BLOCK + 101
    g = (r.standard_normal(n) * 10.0 ** r.uniform(-5, 1, n)).astype(np.float32)
    if not signed:
        g = np.abs(g)
    cpu = sgd_state("cpu", g, dtype, signed, steps)
    gpu = sgd_state("fp32", g, dtype, signed, steps)
    for what, a, b in zip(("weights", "state", "absmax"), cpu, gpu):
        np.testing.assert_array_equal(b, a, err_msg=what)


def model(device, dtype="fp32", seed=3):
    return smedjan.Model(CFG, seed=seed, device=device, dtype=dtype)


def train(optimizer, state, text_bytes, device="cuda", dtype="fp32", graphs=True, steps=6):
    m = model(device, dtype)
    if device == "cuda":
        m._h.set_graphs(graphs)
    tr = smedjan.Trainer(m, optimizer=optimizer, warmup=2, steps=steps, clip=0.5,
                         optim_state_dtype=state, **KINDS[optimizer])
    out = [tr.step(x, y).loss for x, y in text_batches(text_bytes, 4, 64, steps)]
    return m, tr, out


def state_bits(tr):
    return {k: np.asarray(v) for k, v in tr.optimizer_state().items()}


@pytest.mark.parametrize("state", ["bf16", "8bit"])
@pytest.mark.parametrize("optimizer", KINDS)
def test_fp32_training_is_beside_the_cpu_engine(optimizer, state, text_bytes):
    """Six steps in fp32: the losses within 1e-3 of the CPU engine's (f32
    rounding differs where nvcc fuses a multiply-add; a code or a bf16
    rounding may then differ in one element)."""
    _, _, on_cpu = train(optimizer, state, text_bytes, device="cpu")
    _, _, on_gpu = train(optimizer, state, text_bytes)
    for step, (a, b) in enumerate(zip(on_cpu, on_gpu)):
        assert abs(a - b) <= 1e-3 * a, (step, a, b)


@pytest.mark.parametrize("state", ["bf16", "8bit"])
@pytest.mark.parametrize("optimizer", KINDS)
def test_graph_replay_equals_eager(optimizer, state, text_bytes):
    ga, ta, ra = train(optimizer, state, text_bytes, dtype="bf16", graphs=True)
    gb, tb, rb = train(optimizer, state, text_bytes, dtype="bf16", graphs=False)
    assert ra == rb, (ra, rb)
    np.testing.assert_array_equal(np.asarray(ga.flat_params), np.asarray(gb.flat_params))
    a, b = state_bits(ta), state_bits(tb)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("state", ["bf16", "8bit"])
@pytest.mark.parametrize("optimizer", KINDS)
def test_resume_on_the_gpu_is_bit_identical(optimizer, state, tmp_path, text_bytes):
    batches = list(text_batches(text_bytes, 4, 64, 6))
    whole_model, whole, _ = train(optimizer, state, text_bytes, dtype="bf16")
    m = model("cuda", "bf16")
    tr = smedjan.Trainer(m, optimizer=optimizer, warmup=2, steps=6, clip=0.5,
                         optim_state_dtype=state, **KINDS[optimizer])
    for x, y in batches[:3]:
        tr.step(x, y)
    p = tmp_path / "ck.safetensors"
    save_checkpoint(p, m, tr, step=tr.step_count)
    c = load_checkpoint(p)
    m2 = model("cuda", "bf16", seed=9)
    tr2 = smedjan.Trainer(m2, **c.trainer)
    restore(c, m2, tr2)
    for x, y in batches[3:]:
        tr2.step(x, y)
    np.testing.assert_array_equal(np.asarray(m2.flat_params), np.asarray(whole_model.flat_params))
    a, b = state_bits(tr2), state_bits(whole)
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bf16_state_halves_and_8bit_quarters_the_gpu_bytes():
    """AdamW's state on the GPU, held and at peak (Model.memory): fp32 8
    bytes a parameter, bf16 4, 8-bit 2 + 8/256."""
    held = {}
    for state in STATE:
        m = model("cuda", "bf16")
        m.reset_peak()
        before = m.memory()
        tr = smedjan.Trainer(m, optim_state_dtype=state)
        after = m.memory()
        held[state] = after["bytes"] - before["bytes"]
        assert after["peak_bytes"] - before["peak_bytes"] == held[state]
        del tr
    assert held["fp32"] / held["bf16"] == pytest.approx(2, rel=1e-2)
    assert 3.8 < held["fp32"] / held["8bit"] < 4
