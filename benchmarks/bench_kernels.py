"""Per-kernel device time of the CUDA backend at the GPU profile's shapes
(benchmarks/results/gpu_profile.jsonl, rows tagged "before"), next to each
kernel's floor: bytes moved once at the measured HBM rate, or tensor-core FLOPs.

Each kernel runs through the test hook `_C.cuda_op(..., reps)`: inputs are
uploaded once, one warm-up run, then `reps` runs between CUDA events on the
same device buffers (so a working set under the 50 MB L2 can look faster
than in a train step). bf16 unless --dtype fp16 or fp32. Appends one row
per kernel to benchmarks/results/kernels.jsonl and prints Markdown tables.

    python3 benchmarks/bench_kernels.py                 # all three configs
    python3 benchmarks/bench_kernels.py small --reps 50
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from smedjan import _C  # noqa: E402
from common import append_results  # noqa: E402

HBM_GBS = 3000.0      # H100 SXM device-to-device copy, read + write (KINDS.md)
MMA_TFLOPS = 660.0    # H100 dense bf16 mma.sync/wgmma peak, order of magnitude

# name: (B, T, dim, H, KV, ffn, vocab)
CONFIGS = {
    "small": (64, 512, 256, 4, 4, 768, 8192),
    "medium": (32, 512, 512, 8, 8, 1536, 8192),
    "d768": (16, 1024, 768, 12, 12, 2304, 8192),
}
# per-call microseconds measured before this work (gpu_profile.jsonl, tag "before")
BEFORE_US = {
    "small": {"rmsnorm_backward": 3527 / 13 + 209 / 13, "rmsnorm_forward": 180 / 13,
              "rope": 954 / 12, "attention_forward": 820 / 6, "attention_backward": (2346 + 1206) / 6,
              "swiglu_forward": 543 / 6, "swiglu_backward": 668 / 6, "add": 286 / 12, "copy": 387 / 24,
              "cross_entropy_forward": 568, "cross_entropy_backward": 794},
    "medium": {"rmsnorm_backward": (7707 + 457 + 290) / 25, "rmsnorm_forward": 390 / 25,
               "rope": 1609 / 24, "attention_forward": 1649 / 12, "attention_backward": (4724 + 2423) / 12,
               "swiglu_forward": 1079 / 12, "swiglu_backward": 1354 / 12, "add": 577 / 24, "copy": 790 / 48,
               "cross_entropy_forward": 293, "cross_entropy_backward": 396},
    "d768": {"rmsnorm_backward": (9824 + 666 + 307) / 25, "rmsnorm_forward": 597 / 25, "rope": 2231 / 24,
             "attention_forward": 3922 / 12, "attention_backward": (11637 + 5168) / 12,
             "swiglu_forward": 1593 / 12, "swiglu_backward": 2023 / 12, "add": 879 / 24, "copy": 1340 / 48,
             "cross_entropy_backward": 397},
}


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)


def bench_config(name, dtype, reps, rng):
    B, T, C, H, KV, F, V = CONFIGS[name]
    hd = C // H
    N = B * T
    es = 2 if dtype != "fp32" else 4
    W = (H + 2 * KV) * hd
    rows = []

    def run(label, op, arrays, ints, floats=(), nbytes=None, flops=None, key=None):
        out = _C.cuda_op(op, dtype, arrays, tuple(int(i) for i in ints),
                         tuple(float(f) for f in floats), reps)
        ms = out["ms"]
        before = BEFORE_US.get(name, {}).get(key or op)
        if flops:
            rate, floor_ms = flops / ms / 1e9, flops / (MMA_TFLOPS * 1e12) * 1e3
            rows.append((label, ms * 1e3, f"{rate:7.1f} TFLOP/s", floor_ms * 1e3, before))
        else:
            rate, floor_ms = nbytes / ms / 1e6, nbytes / (HBM_GBS * 1e9) * 1e3
            rows.append((label, ms * 1e3, f"{rate:7.0f} GB/s", floor_ms * 1e3, before))

    x = rnd(rng, N, C)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    rstd = np.ones(N, np.float32)
    run("rmsnorm_forward", "rmsnorm_forward", {"out": x.copy(), "rstd": rstd, "x": x, "w": w},
        (N, C), (1e-5,), nbytes=2 * N * C * es)
    for accum in (0, 1):
        run(f"rmsnorm_backward accum={accum}", "rmsnorm_backward",
            {"dx": x.copy(), "dw": np.zeros(C, np.float32), "dout": rnd(rng, N, C), "x": x, "w": w,
             "rstd": rstd}, (N, C, accum), nbytes=(3 + accum) * N * C * es, key="rmsnorm_backward")
    qkv = rnd(rng, B, T, W)
    run("rope_forward (q,k rotated, v copied)", "rope_forward", {"out": qkv.copy(), "in": qkv},
        (B, T, H + 2 * KV, H + KV, hd, 0), (10000.0,), nbytes=2 * N * W * es, key="rope")
    run("rope_backward", "rope_backward", {"din": qkv.copy(), "dout": qkv},
        (B, T, H + 2 * KV, H + KV, hd, 0, 0), (10000.0,), nbytes=2 * N * W * es, key="rope")
    if dtype != "fp32":
        causal_flops = 4.0 * B * H * (T * (T + 1) / 2) * hd   # QK^T and PV over the causal half
        f = _C.cuda_op("attention_forward", dtype, {"out": np.zeros((B, T, H * hd), np.float32),
                                                    "lse": np.zeros((B, H, T), np.float32), "qkv": qkv},
                       (B, T, H, KV, hd, 0), (), 0)
        run("attention_forward", "attention_forward",
            {"out": f["out"], "lse": f["lse"], "qkv": qkv}, (B, T, H, KV, hd, 0), flops=causal_flops)
        run("attention_backward (dkv + dq)", "attention_backward",
            {"dqkv": qkv.copy(), "dout": rnd(rng, B, T, H * hd), "qkv": qkv, "out": f["out"], "lse": f["lse"]},
            (B, T, H, KV, hd, 0, 0), flops=2.5 * causal_flops)
    gu = rnd(rng, N, 2 * F)
    run("swiglu_forward", "swiglu_forward", {"h": rnd(rng, N, F), "gu": gu}, (N, F), nbytes=3 * N * F * es)
    run("swiglu_backward", "swiglu_backward", {"dgu": gu.copy(), "dh": rnd(rng, N, F), "gu": gu},
        (N, F, 0), nbytes=5 * N * F * es)
    n = N * C
    run("add (residual)", "add", {"out": x.ravel().copy(), "a": x.ravel(), "b": x.ravel()}, (n,),
        nbytes=3 * n * es)
    run("copy", "copy", {"dst": x.ravel().copy(), "src": x.ravel()}, (n, 0), nbytes=2 * n * es)
    run("copy accum=1", "copy", {"dst": x.ravel().copy(), "src": x.ravel()}, (n, 1), nbytes=3 * n * es,
        key="none")
    logits = rnd(rng, N, V, scale=2.0)
    tgt = rng.integers(0, V, N).astype(np.int32)
    f = _C.cuda_op("cross_entropy_forward", dtype, {"losses": np.zeros(N, np.float32),
                                                    "lse": np.zeros(N, np.float32),
                                                    "logits": logits, "targets": tgt}, (N, V, -1), (), 0)
    run("cross_entropy_forward", "cross_entropy_forward",
        {"losses": f["losses"], "lse": f["lse"], "logits": logits, "targets": tgt}, (N, V, -1),
        nbytes=N * V * es)
    # in place, as in a train step (repeated runs keep rewriting the same buffer)
    run("cross_entropy_backward (in place)", "cross_entropy_backward",
        {"dlogits": logits, "logits": logits, "lse": f["lse"], "targets": tgt,
         "scale": np.array([1.0 / N], np.float32)}, (N, V, -1, 0, 1), nbytes=2 * N * V * es)
    del logits

    print(f"\n## {name}: B={B} T={T} dim={C} heads={H}/{KV} hd={hd} ffn={F} vocab={V} ({dtype}, "
          f"{reps} reps)")
    print("| kernel | us/call | achieved | floor us | x floor | before us | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, us, rate, floor_us, before in rows:
        b = f"{before:.0f}" if before else ""
        sp = f"{before / us:.1f}x" if before else ""
        print(f"| {label} | {us:.1f} | {rate} | {floor_us:.1f} | {us / floor_us:.1f} | {b} | {sp} |")
    sys.stdout.flush()
    return [dict(config=name, dtype=dtype, reps=reps, kernel=label, us=us, achieved=rate.strip(),
                 floor_us=floor_us, before_us=before) for label, us, rate, floor_us, before in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    a = ap.parse_args()
    info = _C.cuda_info()
    if not info["devices"]:
        sys.exit("bench_kernels: no CUDA GPU")
    print(f"# smedjan CUDA kernels on {info['names'][0]}; floors: {HBM_GBS:.0f} GB/s, "
          f"{MMA_TFLOPS:.0f} TFLOP/s bf16; 'before' = per-call time in the 2026-11-23 profile "
          "(rmsnorm_backward: dx + dw kernels; attention_backward: dkv + dq)")
    rng = np.random.default_rng(0)
    rows = [r for c in a.configs for r in bench_config(c, a.dtype, a.reps, rng)]
    print("appended to", append_results("kernels", rows, info["names"][0]))


if __name__ == "__main__":
    main()
