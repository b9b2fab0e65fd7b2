"""Batch-1 greedy decode on one GPU: smedjan's GPU inference engine (bf16,
persistent decode kernel, the 128 steps chained on the device in one CUDA
graph replay) against PyTorch (bf16, static KV cache, the whole greedy loop
of 128 tokens captured as one CUDA graph, as ../shared/anchors/
torch_llama_baseline.py's bench_decode does it; copied here because the GPU
machine only has this repository). Same random weights on both sides (ours
copied into the torch model), a 16-token prompt, then 128 generated tokens.

Weights are random: decode speed does not depend on their values (the
SmolLM2-135M row has the real model's shape; its ~100 MB GGUF is not shipped).

    python3 benchmarks/bench_decode_gpu.py [--reps 7] [--gen 128] [--out benchmarks/results]
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smedjan  # noqa: E402
from smedjan.config import Config  # noqa: E402
from smedjan.infer import from_model  # noqa: E402

SHAPES = {
    "small": Config.preset("small", 8192),
    "medium": Config.preset("medium", 8192),
    "smollm2-135m": Config(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           vocab_size=49152, max_seq_len=2048, rope_theta=100000.0),
}
# PyTorch, H100, the anchor's numbers (tok/s), for the record beside ours
ANCHOR = {"small": 2109, "medium": 953}


# ---- the PyTorch side: the anchor's model with rotate-half RoPE and GQA ------------

class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.w


def rotate_half_rope(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[None, None], sin[None, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kvh, self.hd = c.n_heads, c.n_kv_heads, c.dim // c.n_heads
        self.n1, self.n2 = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        self.qkv = nn.Linear(c.dim, (self.h + 2 * self.kvh) * self.hd, bias=False)
        self.o = nn.Linear(c.dim, c.dim, bias=False)
        self.gate_up = nn.Linear(c.dim, 2 * c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x, cos, sin, cache, pos):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, T, self.kvh, self.hd).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.hd).transpose(1, 2)
        q, k = rotate_half_rope(q, cos[pos:pos + T], sin[pos:pos + T]), rotate_half_rope(k, cos[pos:pos + T], sin[pos:pos + T])
        kc, vc = cache
        kc[:, :, pos:pos + T] = k
        vc[:, :, pos:pos + T] = v
        k, v = kc[:, :, :pos + T], vc[:, :, :pos + T]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.kvh != self.h)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, D))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class LM(nn.Module):
    def __init__(self, c, max_t):
        super().__init__()
        self.emb = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.nf = RMSNorm(c.dim, c.norm_eps)
        hd = c.dim // c.n_heads
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, device="cuda").float() / hd))
        f = torch.outer(torch.arange(max_t, device="cuda").float(), inv)
        self.register_buffer("cos", f.cos(), persistent=False)
        self.register_buffer("sin", f.sin(), persistent=False)

    def forward(self, idx, caches, pos):
        x = self.emb(idx)
        for i, b in enumerate(self.blocks):
            x = b(x, self.cos, self.sin, caches[i], pos)
        return F.linear(self.nf(x), self.emb.weight)   # tied head


def torch_copy(model, max_t):
    """A bf16 torch LM holding the smedjan model's weights."""
    c, P = model.config, model.params
    lm = LM(c, max_t).cuda()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        lm.emb.weight.copy_(t(P["tok_emb"]))
        lm.nf.w.copy_(t(P["final_norm"]))
        for i, b in enumerate(lm.blocks):
            L = lambda n: P[f"layers.{i}.{n}"]
            b.qkv.weight.copy_(t(np.concatenate([L("wq"), L("wk"), L("wv")])))
            b.o.weight.copy_(t(L("wo")))
            b.gate_up.weight.copy_(t(np.concatenate([L("w_gate"), L("w_up")])))
            b.down.weight.copy_(t(L("w_down")))
            b.n1.w.copy_(t(L("attn_norm")))
            b.n2.w.copy_(t(L("ffn_norm")))
    return lm.to(torch.bfloat16).eval()


@torch.no_grad()
def torch_decode(lm, c, prompt, gen, reps):
    """The anchor's bench_decode(graphs=True): the greedy loop of gen tokens as one graph."""
    max_t = len(prompt) + gen + 1
    hd = c.dim // c.n_heads
    caches = [(torch.zeros(1, c.n_kv_heads, max_t, hd, device="cuda", dtype=torch.bfloat16),
               torch.zeros(1, c.n_kv_heads, max_t, hd, device="cuda", dtype=torch.bfloat16))
              for _ in range(c.n_layers)]
    idx = torch.tensor([prompt], device="cuda")
    tok = lm(idx, caches, 0)[:, -1:].argmax(-1)
    P = len(prompt)
    static_tok = tok.clone()
    outs = []
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        t_ = static_tok
        for i in range(gen):
            t_ = lm(t_, caches, P + i)[:, -1:].argmax(-1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        t_ = static_tok
        for i in range(gen):
            t_ = lm(t_, caches, P + i)[:, -1:].argmax(-1)
            outs.append(t_)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = [int(o.item()) for o in outs]
    return statistics.median(times), int(tok.item()), tokens


def ours_decode(m, prompt, gen, reps):
    """Chained greedy steps (one graph replay per call), and step by step
    (one graph replay + a 4-byte read-back per token). Returns seconds per gen tokens."""
    p = np.asarray(prompt, np.int32)
    first = int(np.argmax(m.prefill(p)))
    m.greedy(first, gen)                       # captures the graph
    times, step_times = [], []
    for _ in range(reps):
        m.reset()
        m.prefill(p)
        t0 = time.perf_counter()
        toks = m.greedy(first, gen)
        times.append(time.perf_counter() - t0)
    for _ in range(max(2, reps // 2)):
        m.reset()
        m.prefill(p)
        t, t0 = first, time.perf_counter()
        for _ in range(gen):
            t = m.decode_greedy(t)
        step_times.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(step_times), first, [int(x) for x in toks]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="small,medium,smollm2-135m")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="directory for decode_gpu_<date>.md/.jsonl")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    rows = []
    for name in a.shapes.split(","):
        c = SHAPES[name]
        model = smedjan.Model(c, seed=1)
        prompt = np.random.default_rng(0).integers(0, c.vocab_size, a.prompt).tolist()
        m = from_model(model, "bf16", max_ctx=a.prompt + a.gen + 1, device="cuda")
        t_ours, t_step, first, ours_toks = ours_decode(m, prompt, a.gen, a.reps)
        info = m._h.info()
        lm = torch_copy(model, a.prompt + a.gen + 1)
        t_torch, first_t, torch_toks = torch_decode(lm, c, prompt, a.gen, a.reps)
        same = sum(x == y for x, y in zip(ours_toks, torch_toks))
        r = dict(shape=name, dim=c.dim, layers=c.n_layers, heads=c.n_heads, kv_heads=c.n_kv_heads,
                 ffn=c.ffn_dim, vocab=c.vocab_size, prompt=a.prompt, gen=a.gen, device=dev,
                 torch=torch.__version__, persistent=info["persistent"],
                 ours_tok_s=a.gen / t_ours, ours_ms_tok=1e3 * t_ours / a.gen,
                 ours_step_tok_s=a.gen / t_step, torch_tok_s=a.gen / t_torch,
                 torch_ms_tok=1e3 * t_torch / a.gen, ratio=t_torch / t_ours,
                 first_token_equal=first == first_t, greedy_tokens_equal=same,
                 weight_mb=info["weight_bytes"] / 1e6, anchor_torch_tok_s=ANCHOR.get(name))
        print(json.dumps(r), flush=True)
        rows.append(r)
        del lm
        torch.cuda.empty_cache()
    lines = [f"# GPU decode, batch 1: smedjan vs PyTorch ({dev}, torch {torch.__version__})", "",
             f"{a.prompt}-token prompt, {a.gen} greedy tokens, bf16 both sides, median of {a.reps} runs. "
             "Random weights (speed does not depend on their values). Ours: persistent decode kernel, "
             f"the {a.gen} steps chained on the device in one graph replay; 'ours step' = one "
             "replay + token read-back per step. PyTorch: static KV cache, the whole greedy loop "
             "captured as one CUDA graph.", "",
             "| shape | ours tok/s | ours ms/tok | ours step tok/s | torch tok/s | torch ms/tok | ratio | "
             "greedy = torch (of gen) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['ours_tok_s']:,.0f} | {r['ours_ms_tok']:.3f} | "
                     f"{r['ours_step_tok_s']:,.0f} | {r['torch_tok_s']:,.0f} | {r['torch_ms_tok']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['greedy_tokens_equal']}/{a.gen} |")
    table = "\n".join(lines)
    print("\n" + table)
    if a.out:
        import datetime
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.join(a.out, f"decode_gpu_{datetime.date.today().isoformat()}")
        with open(stem + ".md", "w") as f:
            f.write(table + "\n")
        with open(stem + ".jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {stem}.md and .jsonl")


if __name__ == "__main__":
    main()
