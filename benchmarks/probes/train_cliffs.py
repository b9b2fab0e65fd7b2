"""Train tok/s of the shapes that fell off cliffs (issue 20): GPT-2's shape at
vocabularies 50257, 50304, 32000; the xl preset (head dim 96); 8 heads of
64, 96 and 128 (4 layers, 8 x 2048). '@fused' runs the head and loss as
one fused node over all rows (its GEMMs at the padded vocabulary). A trailing '+' profiles that shape per
kernel (run with SMEDJAN_GRAPHS=0 to see each kernel by name). Appends one
row per shape to benchmarks/results/train_cliffs.jsonl.

    python3 benchmarks/probes/train_cliffs.py gpt2-50257 gpt2-50304 xl hd96 gpt2-50257+
"""
import os, sys, time, statistics
os.environ.setdefault("SMEDJAN_GRAPHS", "1")
import numpy as np, torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smedjan
from common import append_results
from vs_torch import H100_BF16_PEAK, flops_per_token

def cfg_for(name):
    if name.startswith("gpt2"):
        V = int(name.split("-")[1])
        return smedjan.Config(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                              vocab_size=V, max_seq_len=1024, rope_theta=10000.0, norm_eps=1e-5), 16, 1024
    if name == "xl":
        return smedjan.Config.preset("xl", 8192), 8, 2048
    if name.startswith("hd"):
        hd = int(name[2:]); return smedjan.Config.custom(hd * 8, 4, 8, vocab_size=8192, max_seq_len=2048), 8, 2048

def run(name, prof):
    base, _, head = name.partition("@")
    cfg, B, T = cfg_for(base)
    m = smedjan.Model(cfg, seed=0, device="cuda", dtype="bf16")
    if head == "fused":   # the LM head and loss as one node over all rows (padded-vocab GEMMs)
        m.set_levers(fused_ce=True, ce_rows=B * T)
    tr = smedjan.Trainer(m, lr=3e-4, min_lr=3e-4, steps=10**6, weight_decay=0.1, clip=1.0)
    r = np.random.default_rng(0)
    x = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32); y = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    for _ in range(3): tr.step(x, y)
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); tr.step(x, y); ts.append(time.perf_counter() - t0)
    t = statistics.median(ts)
    print(f"{name}: {B*T/t:,.0f} tok/s, {t*1e3:.1f} ms/step, params {cfg.n_params:,}", flush=True)
    row = dict(command=f"python3 benchmarks/probes/train_cliffs.py {name}", shape=name, B=B, T=T,
               params=cfg.n_params, ours_tok_s=B * T / t,
               mfu=flops_per_token(cfg, T, True) * B * T / t / H100_BF16_PEAK,
               note="bf16, AdamW, clip 1.0, CUDA graph; median of 10 steps after 3")
    if prof:
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3): tr.step(x, y)
            torch.cuda.synchronize()
        rows = {}
        for e in p.events():
            if e.device_type.name == "CUDA":
                rows.setdefault(e.name, [0.0, 0]); rows[e.name][0] += e.device_time_total; rows[e.name][1] += 1
        tot = sum(v[0] for v in rows.values())
        for k, (tt, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:12]:
            print(f"   {tt/3/1e3:8.2f} ms {100*tt/tot:5.1f}% x{n//3:4d} {k[:110]}")
    del tr, m
    return row

rows = []
for a in sys.argv[1:]:
    name, prof = a.rstrip("+"), a.endswith("+")
    try: rows.append(run(name, prof))
    except Exception as e: print(name, "ERROR", repr(e)[:300])
if rows:
    print("appended to", append_results("train_cliffs", rows, torch.cuda.get_device_name()))
