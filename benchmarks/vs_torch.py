"""smedjan (CUDA, bf16) against PyTorch on the identical model in the same
process on the same GPU: eager and torch.compile (bf16 autocast, SDPA,
fused AdamW, grad clipping), median step time after warm-up, tok/s, ratio,
peak memory (ours from the engine's own accounting of every CUDA
allocation, torch from max_memory_allocated), MFU for the d768 config.

Appends its rows to benchmarks/results/vs_torch.jsonl (and $OUT/vs_torch.jsonl),
stamped with date, commit, machine and card, and prints the Markdown table last
(written to --out FILE too when given).

    python3 benchmarks/vs_torch.py [--quick] [--no-compile] [--only train-small-4x128,...] [--out FILE.md]
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import smedjan  # noqa: E402
from smedjan import _C  # noqa: E402
from common import append_results, report  # noqa: E402

VOCAB = 8192
H100_BF16_PEAK = 989e12   # dense bf16 tensor-core rate of an H100 SXM, for MFU

# (kind, name, config factory, B, T, target ratio vs torch.compile)
CONFIGS = [
    ("train", "small", lambda: smedjan.Config.preset("small", VOCAB), 4, 128, 4.0),
    ("train", "medium", lambda: smedjan.Config.preset("medium", VOCAB), 4, 128, 4.0),
    ("train", "tiny", lambda: smedjan.Config.preset("tiny", VOCAB), 64, 512, 1.3),
    ("train", "small", lambda: smedjan.Config.preset("small", VOCAB), 64, 512, 1.3),
    ("train", "medium", lambda: smedjan.Config.preset("medium", VOCAB), 32, 512, 1.3),
    ("train", "d768", lambda: smedjan.Config.custom(768, 12, 12, vocab_size=VOCAB, max_seq_len=1024),
     16, 1024, 1.2),
    # GPT-2 124M's shape with its real, unaligned vocabulary (SwiGLU hidden 2048)
    ("train", "gpt2", lambda: gpt2_shape(50257), 32, 1024, 1.8),
    ("train", "large", lambda: smedjan.Config.preset("large", VOCAB), 16, 2048, 1.3),
    ("train", "xl", lambda: smedjan.Config.preset("xl", VOCAB), 8, 2048, 1.3),   # head dim 96
    ("forward", "medium", lambda: smedjan.Config.preset("medium", VOCAB), 32, 512, 1.3),
]

def gpt2_shape(vocab):
    return smedjan.Config(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                          vocab_size=vocab, max_seq_len=1024, rope_theta=10000.0, norm_eps=1e-5)


def medium(**options):
    return smedjan.Config.preset("medium", VOCAB, **options)


def d768(**options):
    return smedjan.Config.custom(768, 12, 12, vocab_size=VOCAB, max_seq_len=1024, **options)


# The architecture options (issue 18): target 1.3x torch.compile of the same architecture.
SEED001 = dict(paired_heads=True, value_mix=0.1, embed_skip=0.1)
OPTIONS = [(name, mk, B, T, opts) for mk, B, T in ((medium, 32, 512), (d768, 16, 1024))
           for name, opts in (("window", dict(window=T // 4)), ("qk_norm", dict(qk_norm="weighted")),
                              ("seed001", SEED001), ("relu2", dict(ffn="relu2")),
                              ("yarn", dict(rope_scaling={"type": "yarn", "factor": 2.0,
                                                          "original_max_seq_len": T // 2})))]

# --sweep: rows of one kind (cliffs: target 1.0x compile; options: 1.3x)
SWEEPS = {
    "options": [("train", f"{mk.__name__}-{name}", (lambda mk=mk, o=o: mk(**o)), B, T, 1.3)
                for name, mk, B, T, o in OPTIONS],
    # the gpt2 row at the vocabularies users have
    "vocab": [("train", "gpt2", (lambda v=v: gpt2_shape(v)), 16, 1024, 1.0)
              for v in (50257, 50304, 32000, 49152, 128256, 151936)],
    # 8 heads of each size, 4 layers, 8 x 2048
    "head_dims": [("train", f"hd{hd}", (lambda hd=hd: smedjan.Config.custom(8 * hd, 4, 8, vocab_size=VOCAB,
                                                                             max_seq_len=2048)),
                   8, 2048, 1.0) for hd in (32, 64, 80, 96, 112, 128, 192, 256)],
}


# ---- the identical model in PyTorch ------------------------------------------------

def torch_model(cfg, T):
    """The same architecture, options included, written as a PyTorch user
    would: SDPA (flex_attention for sliding windows under torch.compile),
    fused QKV and gate/up projections."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, L, H, KV, Fd, V = cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size
    hd = C // H
    Ha, KVa = (H // 2, KV // 2) if cfg.paired_heads else (H, KV)   # heads attention runs at

    class RMSNorm(nn.Module):
        def __init__(self, n=C, gain=True):
            super().__init__()
            self.w = nn.Parameter(torch.ones(n)) if gain else None

        def forward(self, x):
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).type_as(x)
            return y if self.w is None else y * self.w

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from torch_ref import rope_freqs   # RoPE scaling as transformers defines it
    inv, mscale = rope_freqs(cfg, T)
    f = torch.outer(torch.arange(T).float(), inv)
    cos = (torch.cat((f, f), -1).cos() * mscale).cuda()
    sin = (torch.cat((f, f), -1).sin() * mscale).cuda()

    def rope(x):  # rotate-half, x: (B, heads, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos.to(x.dtype) + torch.cat((-x2, x1), -1) * sin.to(x.dtype)

    def pair(x):  # (B, heads, T, hd) -> adjacent heads averaged
        return (x[:, 0::2] + x[:, 1::2]) * 0.5 if cfg.paired_heads else x

    masks = {}

    def attend(q, k, v, window):
        if not window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KVa != Ha)
        if torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            if window not in masks:
                masks[window] = create_block_mask(
                    lambda b, h, qi, ki: (ki <= qi) & (ki > qi - window), None, None, T, T)
            return flex_attention(q, k, v, block_mask=masks[window], enable_gqa=KVa != Ha)
        i = torch.arange(T, device=q.device)
        keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=KVa != Ha)

    class Block(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.kinds = cfg.layer(layer)
            self.n1, self.n2 = RMSNorm(), RMSNorm()
            qk = self.kinds["qk_norm"]
            self.qn = RMSNorm(hd, qk == "weighted") if qk != "none" else None
            self.kn = RMSNorm(hd, qk == "weighted") if qk != "none" else None
            self.qkv = nn.Linear(C, (H + 2 * KV) * hd, bias=False)
            self.o = nn.Linear(Ha * hd, C, bias=False)
            self.gate_up = nn.Linear(C, 2 * Fd, bias=False)
            self.down = nn.Linear(Fd, C, bias=False)

        def forward(self, x, e, v0):
            B, T_, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).split([H * hd, KV * hd, KV * hd], -1)
            q = pair(q.view(B, T_, H, hd).transpose(1, 2))
            k = pair(k.view(B, T_, KV, hd).transpose(1, 2))
            v = pair(v.view(B, T_, KV, hd).transpose(1, 2))
            if self.qn is not None:
                q, k = self.qn(q), self.kn(k)
            q, k = rope(q), rope(k)
            if v0 is None:
                v0 = v
            elif cfg.value_mix:
                v = (1 - cfg.value_mix) * v + cfg.value_mix * v0
            y = attend(q, k, v, self.kinds["window"])
            x = x + self.o(y.transpose(1, 2).reshape(B, T_, Ha * hd))
            g, u = self.gate_up(self.n2(x)).chunk(2, -1)
            a = F.relu(g).square() if self.kinds["ffn"] == "relu2" else F.silu(g)
            return x + self.down(a * u), v0

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, C)
            self.blocks = nn.ModuleList(Block(i) for i in range(L))
            self.nf = RMSNorm()
            self.head = None if cfg.tied_head else nn.Linear(C, V, bias=False)
            nn.init.normal_(self.emb.weight, std=0.02)

        def forward(self, idx):
            e = x = self.emb(idx)
            v0 = None
            for i, b in enumerate(self.blocks):
                if i and cfg.embed_skip:
                    x = x + cfg.embed_skip * e
                x, v0 = b(x, e, v0)
            h = self.nf(x)
            return F.linear(h, self.emb.weight) if self.head is None else self.head(h)

    return LM().cuda()


def median_time(step, iters, warmup, sync):
    for _ in range(warmup):
        step()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_torch(kind, cfg, B, T, compiled, iters, warmup, cast=False):
    """cast (forward only): the model cast to bf16 weights, no fp32 master
    (not the issue's reference, which is bf16 autocast: reported beside it)."""
    import torch
    import torch.nn.functional as F
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = torch_model(cfg, T)
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    fwd = torch.compile(model) if compiled else model
    if kind == "forward":
        model.eval()
        if cast:
            model.to(torch.bfloat16)

        @torch.no_grad()
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not cast):
                fwd(x)
    else:
        decay = [p for p in model.parameters() if p.ndim == 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fwd(x)
                loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    t = median_time(step, iters, warmup, torch.cuda.synchronize)
    peak = torch.cuda.max_memory_allocated()
    del model, fwd
    gc.collect()
    torch.cuda.empty_cache()
    return t, peak


def bench_ours(kind, cfg, B, T, iters, warmup, levers=()):
    gc.collect()
    _C.cuda_memory(True)
    m = smedjan.Model(cfg, seed=0, device="cuda", dtype="bf16")
    if levers:
        m.set_levers(**{name: True for name in levers})
    r = np.random.default_rng(0)
    x = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = r.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    if kind == "forward":
        def step():
            m.forward_device(x)
    else:
        tr = smedjan.Trainer(m, lr=3e-4, min_lr=3e-4, steps=10 ** 6, weight_decay=0.1, clip=1.0)

        def step():
            tr.step(x, y)
    t = median_time(step, iters, warmup, lambda: None)   # engine calls return synchronised
    peak = _C.cuda_memory()[1]
    del m
    gc.collect()
    return t, peak


def flops_per_token(cfg, T, train):
    """PaLM's and llm.c's convention: 6N (every weight: 2 flops per
    multiply-add, x3 for backward) plus 12 * layers * dim * T for attention
    (QK^T and PV, forward and backward, counted unmasked); forward a third."""
    n = cfg.n_params
    attn = 12 * cfg.n_layers * cfg.dim * T
    return (6 * n + attn) if train else (6 * n + attn) / 3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--levers", default="", help="ours with memory levers on, comma list like "
                                                 "gradient_checkpointing,fused_ce (stated in each row)")
    ap.add_argument("--only", default="", help="comma list like train-small-4x128")
    ap.add_argument("--tag", default="", help="a label stored in each row")
    ap.add_argument("--sweep", choices=sorted(SWEEPS), help="these rows instead of the usual ones")
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    a = ap.parse_args()
    iters, warmup = (10, 3) if a.quick else (30, 8)
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d")
    rows = []
    for kind, name, mk, B, T, target in (SWEEPS[a.sweep] if a.sweep else CONFIGS):
        tag = f"{kind}-{name}-{B}x{T}"
        if a.only and tag not in a.only.split(","):
            continue
        cfg = mk()
        row = dict(kind=kind, config=name, B=B, T=T, params=cfg.n_params, vocab=cfg.vocab_size,
                   target=target,
                   device=dev, torch=torch.__version__, our_levers=a.levers)
        sides = [("ours", None)] + ([] if a.no_torch else [("eager", False)] +
                                    ([] if a.no_compile else [("compile", True)]))
        if kind == "forward" and not (a.no_torch or a.no_compile):
            sides.append(("cast", True))   # torch.compile on a bf16-cast copy, for reference
        for side, compiled in sides:
            try:
                if side == "ours":
                    t, peak = bench_ours(kind, cfg, B, T, iters, warmup,
                                         [x for x in a.levers.split(",") if x])
                else:
                    t, peak = bench_torch(kind, cfg, B, T, compiled, iters, warmup, side == "cast")
                row[f"{side}_ms"] = t * 1e3
                row[f"{side}_tok_s"] = B * T / t
                row[f"{side}_peak_mib"] = peak / 2 ** 20
                if kind == "train" or name == "d768":
                    row[f"{side}_mfu"] = flops_per_token(cfg, T, kind == "train") * B * T / t / H100_BF16_PEAK
            except Exception as e:   # keep going: a table with holes beats none
                row[f"{side}_error"] = repr(e)[:300]
        if "ours_tok_s" in row and "compile_tok_s" in row:
            row["ratio_vs_compile"] = row["ours_tok_s"] / row["compile_tok_s"]
            row["meets_target"] = row["ratio_vs_compile"] >= target
        if "ours_peak_mib" in row and "compile_peak_mib" in row:
            row["memory_ok"] = row["ours_peak_mib"] <= row["compile_peak_mib"]
        print(json.dumps(row), flush=True)
        rows.append(row)

    def f(r, k, fmt="{:,.0f}"):
        return fmt.format(r[k]) if k in r else ("err" if any(x.endswith("error") for x in r) else "-")

    lines = [f"# smedjan vs PyTorch, {dev}, torch {torch.__version__}, {stamp}", "",
             f"Median of {iters} steps after {warmup} warm-up; bf16; vocab {VOCAB} unless the "
             "row says. "
             "ratio = ours / torch.compile tok/s. Every torch side runs the fp32 model under bf16 "
             "autocast, as ours keeps fp32 master weights and computes in bf16; forward rows also "
             "show torch.compile on a bf16-cast copy (weights bf16 only) as 'cast'."
             + (f" Our levers: {a.levers}." if a.levers else ""), "",
             "| kind | config | B | T | ours tok/s | eager tok/s | compile tok/s | ratio | target | "
             "ours MiB | compile MiB | MFU ours / compile | cast tok/s, MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = (f"{r['ours_mfu']:.1%} / {r.get('compile_mfu', float('nan')):.1%}"
               if "ours_mfu" in r else "")
        lines.append(f"| {r['kind']} | {r['config']}{'' if r['vocab'] == VOCAB else ' V' + str(r['vocab'])} | {r['B']} | {r['T']} | {f(r, 'ours_tok_s')} | "
                     f"{f(r, 'eager_tok_s')} | {f(r, 'compile_tok_s')} | "
                     f"{f(r, 'ratio_vs_compile', '{:.2f}x')} | {r['target']}x | "
                     f"{f(r, 'ours_peak_mib')} | {f(r, 'compile_peak_mib')} | {mfu} | "
                     + (f"{f(r, 'cast_tok_s')}, {f(r, 'cast_peak_mib')} |" if r["kind"] == "forward" else " |"))
    errs = [f"- {r['kind']} {r['config']} {k}: {v}" for r in rows for k, v in r.items() if k.endswith("error")]
    text = "\n".join(lines + ([""] + errs if errs else [])) + "\n"
    if a.tag:
        for r in rows:
            r["tag"] = a.tag
    append_results("vs_torch", rows, dev)
    print()
    report(text, a.out)


if __name__ == "__main__":
    main()
