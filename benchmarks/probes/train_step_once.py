"""A few CUDA train steps of a small model (graph capture, then replays),
a loss and a forward: the workload compute-sanitizer checks in
benchmarks/gpu_check.sh. Exits non-zero on any engine error.

    compute-sanitizer --tool memcheck python3 benchmarks/probes/train_step_once.py [bf16|fp32|fp16] [lever,...]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import smedjan  # noqa: E402


def main():
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    cfg = smedjan.Config.custom(128, 2, 4, 2, vocab_size=512, max_seq_len=128)
    levers = {name: True for name in (sys.argv[2].split(",") if len(sys.argv) > 2 else [])}
    m = smedjan.Model(cfg, seed=0, device="cuda", dtype=dtype)
    tr = smedjan.Trainer(m, lr=1e-3, steps=10, **levers)
    r = np.random.default_rng(0)
    x = r.integers(0, 512, (2, 100)).astype(np.int32)   # T not a multiple of the 64 tile
    y = r.integers(0, 512, (2, 100)).astype(np.int32)
    for _ in range(3):
        res = tr.step(x, y)
    loss = m.loss(x, y)
    logits = m.forward(x[:, :17])
    assert np.isfinite(res.loss) and np.isfinite(loss) and np.isfinite(logits).all()
    print(f"train_step_once[{dtype}]: loss {res.loss:.4f} norm {res.grad_norm:.4f} eval {loss:.4f}")


if __name__ == "__main__":
    main()
