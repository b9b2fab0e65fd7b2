"""Where a GPU decode step spends its time, phase by phase: the step runs as
one kernel per phase (the non-persistent path, same phase code as the
persistent kernel), CUPTI (through torch.profiler) times each kernel, and the
kernels are attributed to phases by their order (per layer A, B, B2, D; then
F, the head, and G, the pick). A kernel's time includes its launch ramp and
drain, which the persistent kernel replaces by a grid barrier (~1.2 us).
Usage: python benchmarks/probes/profile_decode_gpu.py [--shapes small,medium,smollm2-135m] [--steps 32]"""
import argparse
import os
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(BENCH))
import smedjan  # noqa: E402
from smedjan.infer import from_model  # noqa: E402

sys.path.insert(0, BENCH)
from bench_decode_gpu import SHAPES  # noqa: E402

PHASES = ["A qkv", "B attn+oproj", "B2 (long ctx)", "D ffn"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="small,medium,smollm2-135m")
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    print(f"# GPU decode, time per phase ({torch.cuda.get_device_name()}), one kernel per phase\n")
    for name in a.shapes.split(","):
        c = SHAPES[name]
        m = from_model(smedjan.Model(c, seed=1), "bf16", max_ctx=64 + a.steps, device="cuda")
        m.set_options(graphs=False, persistent=False)
        t = int(np.argmax(m.prefill(np.arange(1, 17, dtype=np.int32))))
        t = m.decode_greedy(t)                      # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                t = m.decode_greedy(t)
            torch.cuda.synchronize()
        ks = [e for e in prof.events() if e.device_type.name == "CUDA" and "step_" in e.name]
        ks.sort(key=lambda e: e.time_range.start)
        per_step = 4 * c.n_layers + 2
        assert len(ks) == per_step * a.steps, (len(ks), per_step * a.steps)
        us = np.array([e.time_range.elapsed_us() for e in ks], float).reshape(a.steps, per_step)
        layer = us[:, :4 * c.n_layers].reshape(a.steps, c.n_layers, 4)
        print(f"## {name}: {us.sum(1).mean():.1f} us of kernels per step "
              f"({c.n_layers} layers)\n\n| phase | us each (median) | us per step |\n|---|---:|---:|")
        for i, ph in enumerate(PHASES):
            print(f"| {ph} | {np.median(layer[:, :, i]):.2f} | {layer[:, :, i].sum(1).mean():.1f} |")
        print(f"| F head | {np.median(us[:, -2]):.2f} | {us[:, -2].mean():.1f} |")
        print(f"| G pick | {np.median(us[:, -1]):.2f} | {us[:, -1].mean():.1f} |\n")


if __name__ == "__main__":
    main()
