"""Sliding-window attention's cost grows linearly in T: forward and backward
device time of the training attention kernels (bf16, B=1, H=16, head_dim 64;
on Hopper the wgmma kernels) at T = 1024..8192, with window 1024 and with
the full causal window (0). Each kernel runs through the test hook
`_C.cuda_op(..., reps)` (one warm-up, then reps runs between CUDA events).
'x prev' is the time over the previous T's: about 2 when linear, 4 when
quadratic.

    python3 benchmarks/probes/attention_window.py [--reps 20]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from smedjan import _C

B, H, HD = 1, 16, 64
TS = (1024, 2048, 4096, 8192)
WINDOWS = (1024, 0)


def time_fwd_bwd(T, window, reps, rng):
    W = 3 * H * HD
    qkv = rng.standard_normal((B, T, W), dtype=np.float32)
    dims = (B, T, H, H, HD, window)
    f = _C.cuda_op("attention_forward", "bf16", {"out": np.zeros((B, T, H * HD), np.float32),
                                                 "lse": np.zeros((B, H, T), np.float32), "qkv": qkv},
                   dims, (), reps)
    b = _C.cuda_op("attention_backward", "bf16", {"dqkv": np.zeros_like(qkv), "qkv": qkv, "out": f["out"],
                                                  "lse": f["lse"],
                                                  "dout": rng.standard_normal((B, T, H * HD), dtype=np.float32)},
                   dims + (0,), (), reps)
    return f["ms"], b["ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"attention forward + backward, bf16, B={B} H={H} head_dim={HD}, {_C.cuda_info()['names'][0]}")
    print(f"{'window':>7} {'T':>6} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'us / token':>11} {'x prev':>7}")
    for window in WINDOWS:
        prev = None
        for T in TS:
            fwd, bwd = time_fwd_bwd(T, window, args.reps, rng)
            total = fwd + bwd
            growth = f"{total / prev:7.2f}" if prev else f"{'':>7}"
            print(f"{window or 'full':>7} {T:>6} {fwd:8.3f} {bwd:8.3f} {total:9.3f} {1e3 * total / T:11.3f} {growth}",
                  flush=True)
            prev = total


if __name__ == "__main__":
    main()
