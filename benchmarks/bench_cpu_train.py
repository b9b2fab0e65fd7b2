"""Our CPU training step against PyTorch's on the same model, machine and
thread count (issue: >= 1.5x PyTorch's tok/s at no more peak memory).

Each side runs in its own process so that peak memory is its own: peak RSS
growth from just before the model is built to the end of the timed steps.
Usage: python benchmarks/bench_cpu_train.py [--threads N] [--size small]
       [--batch-size 4] [--seq-len 128] [--iters 20] [--warmup 3] [--out FILE.md]

Appends one row per run to benchmarks/results/cpu_train.jsonl (ours and
PyTorch side by side) and prints the Markdown table.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import (append_results, machine, median, peak_rss_bytes, report, rss_bytes,  # noqa: E402
                    run_child, today)


def ours(a):
    import numpy as np
    import smedjan
    smedjan.threads(a.threads)
    base = rss_bytes()
    model = smedjan.Model(a.size, seed=0)
    tr = smedjan.Trainer(model, lr=3e-4, warmup=0, steps=10_000)
    r = np.random.default_rng(0)
    x = r.integers(0, 8192, (a.batch_size, a.seq_len + 1)).astype(np.int32)
    xs, ys = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
    times = []
    for i in range(a.warmup + a.iters):
        t = time.perf_counter()
        tr.step(xs, ys)
        times.append(time.perf_counter() - t)
    return dict(step_s=median(times[a.warmup:]), peak_bytes=peak_rss_bytes() - base,
                engine_peak_bytes=model.memory()["peak_bytes"], params=model.n_params)


def theirs(a):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(a.threads)
    import smedjan
    c = smedjan.Config.preset(a.size)

    class Block(nn.Module):
        def __init__(s):
            super().__init__()
            s.n1, s.n2 = nn.RMSNorm(c.dim, eps=c.norm_eps), nn.RMSNorm(c.dim, eps=c.norm_eps)
            s.qkv = nn.Linear(c.dim, c.dim + 2 * c.n_kv_heads * c.head_dim, bias=False)
            s.o = nn.Linear(c.dim, c.dim, bias=False)
            s.gate_up = nn.Linear(c.dim, 2 * c.ffn_dim, bias=False)
            s.down = nn.Linear(c.ffn_dim, c.dim, bias=False)

        def forward(s, x, cos, sin):
            B, T, _ = x.shape
            H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
            q, k, v = s.qkv(s.n1(x)).split([H * hd, KV * hd, KV * hd], -1)
            q, k = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k))
            v = v.view(B, T, KV, hd).transpose(1, 2)
            rot = lambda t: torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1)
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            x = x + s.o(y.transpose(1, 2).reshape(B, T, -1))
            g, u = s.gate_up(s.n2(x)).chunk(2, -1)
            return x + s.down(F.silu(g) * u)

    class LM(nn.Module):
        def __init__(s):
            super().__init__()
            s.emb = nn.Embedding(c.vocab_size, c.dim)
            s.blocks = nn.ModuleList(Block() for _ in range(c.n_layers))
            s.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
            inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
            f = torch.outer(torch.arange(a.seq_len).float(), inv)
            s.cos, s.sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()

        def forward(s, idx):
            x = s.emb(idx)
            for b in s.blocks:
                x = b(x, s.cos, s.sin)
            return F.linear(s.norm(x), s.emb.weight)

    base = rss_bytes()
    torch.manual_seed(0)
    model = LM()
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-4)
    x = torch.randint(0, c.vocab_size, (a.batch_size, a.seq_len + 1))
    xs, ys = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    times = []
    for i in range(a.warmup + a.iters):
        t = time.perf_counter()
        loss = F.cross_entropy(model(xs).view(-1, c.vocab_size), ys.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return dict(step_s=median(times[a.warmup:]), peak_bytes=peak_rss_bytes() - base,
                params=sum(p.numel() for p in model.parameters()), torch=torch.__version__)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", choices=["ours", "torch"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--size", default="small")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="append no row to cpu_train.jsonl")
    p.add_argument("--out", default=None, help="also write the Markdown report to this file")
    a = p.parse_args()
    if a.child:
        print(json.dumps(ours(a) if a.child == "ours" else theirs(a)))
        return
    args = [f"--threads={a.threads}", f"--size={a.size}", f"--batch-size={a.batch_size}",
            f"--seq-len={a.seq_len}", f"--iters={a.iters}", f"--warmup={a.warmup}"]
    env = {"OMP_NUM_THREADS": str(a.threads), "SMEDJAN_THREADS": str(a.threads)}
    o = run_child(__file__, args + ["--child=ours"], env)
    t = run_child(__file__, args + ["--child=torch"], env)
    tok = a.batch_size * a.seq_len
    mib = 2 ** 20
    row = dict(size=a.size, batch_size=a.batch_size, seq_len=a.seq_len, threads=a.threads,
               iters=a.iters, warmup=a.warmup, params=o["params"], torch=t.get("torch"),
               ours_step_s=o["step_s"], ours_tok_s=tok / o["step_s"],
               ours_peak_mib=o["peak_bytes"] / mib, engine_peak_mib=o["engine_peak_bytes"] / mib,
               torch_step_s=t["step_s"], torch_tok_s=tok / t["step_s"],
               torch_peak_mib=t["peak_bytes"] / mib)
    row.update(ratio=row["ours_tok_s"] / row["torch_tok_s"],
               mem_ratio=row["ours_peak_mib"] / row["torch_peak_mib"])
    table = ("| side | step ms | tok/s | peak MiB (RSS growth) | params |\n|---|---:|---:|---:|---:|\n"
             + "".join(f"| {side} | {row[p + '_step_s'] * 1e3:.1f} | {row[p + '_tok_s']:,.0f} | "
                       f"{row[p + '_peak_mib']:,.0f} | {row['params']:,} |\n"
                       for side, p in (("smedjan", "ours"), ("torch", "torch")))
             + f"\nthroughput ratio smedjan/torch: **{row['ratio']:.2f}x**; peak memory ratio: "
               f"**{row['mem_ratio']:.2f}x** (engine's own peak accounting: "
               f"{row['engine_peak_mib']:,.0f} MiB)\n")
    header = (f"# CPU training step: smedjan vs PyTorch\n\n{today()}, {machine()}, "
              f"{a.threads} threads, torch {t.get('torch')}; preset {a.size}, batch "
              f"{a.batch_size}, seq {a.seq_len}, median of {a.iters} steps after {a.warmup} "
              f"warm-up.\nCommand: `python benchmarks/bench_cpu_train.py --threads {a.threads} "
              f"--size {a.size} --batch-size {a.batch_size} --seq-len {a.seq_len}`")
    report(header + "\n\n" + table, a.out)
    if not a.no_write:
        print("appended to", append_results("cpu_train", [row]))


if __name__ == "__main__":
    main()
