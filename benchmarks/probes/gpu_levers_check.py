"""GPU check of the memory levers (run on a CUDA machine; not part of the CPU
suite): each lever on CUDA fp32 and bf16 against the same device without
levers (checkpointing: bit-identical; fused CE: summation order; fp16
activations: fp16 storage rounding on fp32, a no-op on bf16), grad
accumulation and CUDA-graph train steps with levers on.

    python benchmarks/probes/gpu_levers_check.py
"""
import numpy as np, smedjan, sys
print(smedjan.build_info())
cfg = smedjan.Config.custom(128, 3, 4, 2, vocab_size=1000, max_seq_len=128)
r = np.random.default_rng(0)
x = r.integers(0, 1000, (4, 64)).astype(np.int32); y = r.integers(0, 1000, (4, 64)).astype(np.int32); y[0, :5] = -1
def grads(dev, dt, **lv):
    m = smedjan.Model(cfg, seed=1, device=dev, dtype=dt); m.set_levers(**lv)
    l = m.loss(x, y, backward=True)
    g = m.flat_grads if dev == "cpu" else m.flat_grads.numpy()
    return l, np.array(g)
l0, g0 = grads("cpu", "fp32")
for dt in ("fp32", "bf16"):
    lb, gb = grads("cuda", dt)
    for lv in (dict(gradient_checkpointing=True), dict(fused_ce=True), dict(fp16_activations=True), dict(gradient_checkpointing=True, fused_ce=True, fp16_activations=True)):
        l, g = grads("cuda", dt, **lv)
        err = float(np.abs(g - gb).max() / np.abs(gb).max())
        if lv == dict(gradient_checkpointing=True):
            assert np.array_equal(g, gb) and l == lb, (dt, "checkpointing must be bit-identical")
        assert err < (3e-2 if dt == "bf16" or lv.get("fp16_activations") else 1e-4), (dt, lv, err)
        print(dt, lv, "loss", l, "vs cuda-base", lb, "cpu", l0, "max|g-gbase|/max|gbase|", float(np.abs(g - gb).max() / np.abs(gb).max()), "bitwise-eq-base", np.array_equal(g, gb))
m = smedjan.Model(cfg, seed=1, device="cuda")
tr = smedjan.Trainer(m, lr=1e-3, steps=10, gradient_checkpointing=True, fused_ce=True, grad_accum=2)
for i in range(3): print("train step", tr.step(np.concatenate([x, x]), np.concatenate([y, y])))
tr2 = smedjan.Trainer(smedjan.Model(cfg, seed=1, device="cuda"), lr=1e-3, steps=10, gradient_checkpointing=True, fused_ce=True)
for i in range(3): print("graph train step", tr2.step(x, y))
assert np.isfinite(tr2.step(x, y).loss)
print("memory", m.memory())
