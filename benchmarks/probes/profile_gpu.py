"""Where our GPU train step spends its time: per-kernel totals from CUPTI
(through torch.profiler, which records every kernel in the process, ours
included). Graphs are turned off so each kernel is seen by name.
Usage: python benchmarks/probes/profile_gpu.py [config ...]   (small-64x512 d768-16x1024 forward-medium-32x512 ...)"""
import os
import sys

os.environ["SMEDJAN_GRAPHS"] = "0"
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import smedjan  # noqa: E402

CONFIGS = {
    "small-64x512": (dict(preset="small"), 64, 512),
    "medium-32x512": (dict(preset="medium"), 32, 512),
    "d768-16x1024": (dict(dim=768, n_layers=12, n_heads=12), 16, 1024),
    "forward-medium-32x512": (dict(preset="medium"), 32, 512),
}


def model_for(spec):
    if "preset" in spec:
        return smedjan.Model(spec["preset"], device="cuda", dtype="bf16")
    c = smedjan.Config.custom(spec["dim"], spec["n_layers"], spec["n_heads"], ffn_mult=3.0,
                              vocab_size=8192, max_seq_len=2048)
    return smedjan.Model(c, device="cuda", dtype="bf16")


for name in sys.argv[1:] or list(CONFIGS):
    spec, B, T = CONFIGS[name]
    m, tr = model_for(spec), None
    x = np.random.default_rng(0).integers(0, 8192, (B, T + 1)).astype(np.int32)
    xs, ys = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
    if name.startswith("forward"):
        def step():
            m.forward_device(xs)
    else:
        tr = smedjan.Trainer(m, lr=3e-4, steps=1000)

        def step():
            tr.step(xs, ys)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            rows.setdefault(e.name, [0.0, 0])
            rows[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            rows[e.name][1] += 1
    total = sum(v[0] for v in rows.values())
    print(f"\n## {name}: {total / 5 / 1e3:.2f} ms of kernel time per step")
    print("| kernel | ms/step | % | calls/step |\n|---|---:|---:|---:|")
    for k, (t, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:22]:
        print(f"| {k[:90]} | {t / 5 / 1e3:.3f} | {100 * t / total:.1f} | {n // 5} |")
    step = tr = m = None
