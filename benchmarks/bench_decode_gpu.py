"""Batch-1 greedy decode on one GPU: smedjan's GPU inference engine (bf16,
persistent decode kernel, the 128 steps chained on the device in one CUDA
graph replay) against PyTorch (bf16, static KV cache, the whole greedy loop
of 128 tokens captured as one CUDA graph, as ../shared/anchors/
torch_llama_baseline.py's bench_decode does it; copied here because the GPU
machine only has this repository). Same random weights on both sides (ours
copied into the torch model), a 16-token prompt, then 128 generated tokens.

Weights are random: decode speed does not depend on their values (the
SmolLM2-135M row has the real model's shape; its ~100 MB GGUF is not shipped).

The medium-<option> rows (`--shapes options` names them all) run the medium
shape with one architecture option set, the PyTorch model carrying the same
option (the math of tests/torch_ref.py). A sliding window keeps PyTorch's
full static cache and attends to the slice of it inside the window (the
masked keys are not read). RoPE tables come from torch_ref.rope_freqs for
the whole context; dynamic NTK is left out of the rows because our engine
takes its frequencies from max_ctx instead. Note that with the default
16 + 128 tokens a 256-token window covers the whole context: pass a longer
--prompt to time a window that bites.

Both sides are bf16, so greedy tokens may part after a near tie: each row
reports how many of the generated tokens agree, and the agreeing prefix.
Rows are appended to benchmarks/results/decode_gpu.jsonl (and $OUT/decode_gpu.jsonl);
the Markdown table is printed, and written to --out FILE when given.

    python3 benchmarks/bench_decode_gpu.py [--shapes small,medium,options] [--reps 7] [--gen 128] [--out FILE.md]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import smedjan  # noqa: E402
from smedjan.config import Config  # noqa: E402
from smedjan.infer import from_model  # noqa: E402
from torch_ref import rope_freqs  # noqa: E402
from common import append_results, report  # noqa: E402

# medium with one architecture option each
OPTIONS = {
    "medium-window": dict(window=256),
    "medium-qk_norm": dict(qk_norm="weighted"),
    "medium-seed001": dict(paired_heads=True, value_mix=0.1, embed_skip=0.1),
    "medium-relu2": dict(ffn="relu2"),
    "medium-yarn": dict(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_seq_len": 512}),
    "medium-untied": dict(tied_head=False),
}
SHAPES = {
    "small": Config.preset("small", 8192),
    "medium": Config.preset("medium", 8192),
    "smollm2-135m": Config(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           vocab_size=49152, max_seq_len=2048, rope_theta=100000.0),
    **{name: Config.preset("medium", 8192, **o) for name, o in OPTIONS.items()},
}
# PyTorch, H100, the anchor's numbers (tok/s), for the record beside ours
ANCHOR = {"small": 2109, "medium": 953}
TARGET_RATIO = 5.0


# ---- the PyTorch side: the anchor's model with rotate-half RoPE and GQA, -----------
# ---- and smedjan's architecture options -------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d, eps, gains=True):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d)) if gains else None
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return y if self.w is None else y * self.w


def rotate_half_rope(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[None, None], sin[None, None]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


class Block(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        kinds = c.layer(i)
        self.h, self.kvh, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.paired = c.paired_heads
        self.ha = self.h // 2 if self.paired else self.h      # heads attention runs at
        self.kva = self.kvh // 2 if self.paired else self.kvh
        self.value_mix = c.value_mix if i > 0 else 0.0
        self.window, self.relu2 = kinds["window"], kinds["ffn"] == "relu2"
        self.n1, self.n2 = RMSNorm(c.dim, c.norm_eps), RMSNorm(c.dim, c.norm_eps)
        self.qn = self.kn = None
        if kinds["qk_norm"] != "none":
            weighted = kinds["qk_norm"] == "weighted"
            self.qn = RMSNorm(self.hd, c.norm_eps, weighted)
            self.kn = RMSNorm(self.hd, c.norm_eps, weighted)
        self.qkv = nn.Linear(c.dim, (self.h + 2 * self.kvh) * self.hd, bias=False)
        self.o = nn.Linear(self.ha * self.hd, c.dim, bias=False)
        self.gate_up = nn.Linear(c.dim, 2 * c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def heads(self, t, n):
        """(B, T, n * hd) -> (B, n or n/2 paired, T, hd)."""
        t = t.view(*t.shape[:2], n, self.hd)
        if self.paired:
            t = (t[:, :, 0::2] + t[:, :, 1::2]) / 2
        return t.transpose(1, 2)

    def forward(self, x, cos, sin, cache, pos, v0):
        """x after this block, and its v (layer 0's is every later layer's v0)."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], -1)
        q, k, v = self.heads(q, self.h), self.heads(k, self.kvh), self.heads(v, self.kvh)
        if self.qn is not None:
            q, k = self.qn(q), self.kn(k)
        q, k = rotate_half_rope(q, cos[pos:pos + T], sin[pos:pos + T]), rotate_half_rope(k, cos[pos:pos + T], sin[pos:pos + T])
        if self.value_mix:
            v = (1 - self.value_mix) * v + self.value_mix * v0
        kc, vc = cache
        kc[:, :, pos:pos + T] = k
        vc[:, :, pos:pos + T] = v
        first = max(0, pos + 1 - self.window) if self.window else 0   # oldest key a query sees
        ks, vs = kc[:, :, first:pos + T], vc[:, :, first:pos + T]
        gqa = self.kva != self.ha
        if T > 1 and self.window:
            t = torch.arange(pos, pos + T, device=x.device)[:, None]
            s = torch.arange(first, pos + T, device=x.device)[None]
            y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=(s <= t) & (s > t - self.window),
                                               enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, ks, vs, is_causal=T > 1, enable_gqa=gqa)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, self.ha * self.hd))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        act = F.relu(g).square() if self.relu2 else F.silu(g)
        return x + self.down(act * u), v


class LM(nn.Module):
    def __init__(self, c, max_t):
        super().__init__()
        self.emb = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.nf = RMSNorm(c.dim, c.norm_eps)
        self.head = None if c.tied_head else nn.Linear(c.dim, c.vocab_size, bias=False)
        self.embed_skip = c.embed_skip
        inv, mscale = rope_freqs(c, max_t)
        f = torch.outer(torch.arange(max_t).float(), inv)
        self.register_buffer("cos", f.cos() * mscale, persistent=False)
        self.register_buffer("sin", f.sin() * mscale, persistent=False)

    def forward(self, idx, caches, pos):
        e = self.emb(idx)
        x, v0 = e, None
        for i, b in enumerate(self.blocks):
            if i and self.embed_skip:
                x = x + self.embed_skip * e
            x, v = b(x, self.cos, self.sin, caches[i], pos, v0)
            if i == 0:
                v0 = v
        return F.linear(self.nf(x), self.emb.weight if self.head is None else self.head.weight)


def static_caches(lm, max_t, device="cuda", dtype=torch.bfloat16):
    """Per layer (k, v), each (1, kv heads attention runs at, max_t, hd), zeroed."""
    return [tuple(torch.zeros(1, b.kva, max_t, b.hd, device=device, dtype=dtype) for _ in range(2))
            for b in lm.blocks]


def torch_copy(model, max_t, device="cuda", dtype=torch.bfloat16):
    """A torch LM (bf16 on the GPU by default) holding the smedjan model's weights."""
    c, P = model.config, model.params
    lm = LM(c, max_t)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        lm.emb.weight.copy_(t(P["tok_emb"]))
        lm.nf.w.copy_(t(P["final_norm"]))
        if lm.head is not None:
            lm.head.weight.copy_(t(P["lm_head"]))
        for i, b in enumerate(lm.blocks):
            L = lambda n: P[f"layers.{i}.{n}"]
            b.qkv.weight.copy_(t(np.concatenate([L("wq"), L("wk"), L("wv")])))
            b.o.weight.copy_(t(L("wo")))
            b.gate_up.weight.copy_(t(np.concatenate([L("w_gate"), L("w_up")])))
            b.down.weight.copy_(t(L("w_down")))
            b.n1.w.copy_(t(L("attn_norm")))
            b.n2.w.copy_(t(L("ffn_norm")))
            if b.qn is not None and b.qn.w is not None:
                b.qn.w.copy_(t(L("q_norm")))
                b.kn.w.copy_(t(L("k_norm")))
    return lm.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def torch_decode(lm, prompt, gen, reps):
    """The anchor's bench_decode(graphs=True): the greedy loop of gen tokens as one graph."""
    caches = static_caches(lm, len(prompt) + gen + 1)
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
    ap.add_argument("--shapes", default="small,medium,smollm2-135m",
                    help=f"names of {', '.join(SHAPES)}; 'options' stands for every medium-<option>")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    a = ap.parse_args()
    dev = torch.cuda.get_device_name()
    rows = []
    names = [n for name in a.shapes.split(",") for n in (OPTIONS if name == "options" else [name])]
    for name in names:
        c = SHAPES[name]
        model = smedjan.Model(c, seed=1)
        prompt = np.random.default_rng(0).integers(0, c.vocab_size, a.prompt).tolist()
        m = from_model(model, "bf16", max_ctx=a.prompt + a.gen + 1, device="cuda")
        t_ours, t_step, first, ours_toks = ours_decode(m, prompt, a.gen, a.reps)
        info = m._h.info()
        lm = torch_copy(model, a.prompt + a.gen + 1)
        t_torch, first_t, torch_toks = torch_decode(lm, prompt, a.gen, a.reps)
        same = sum(x == y for x, y in zip(ours_toks, torch_toks))
        prefix = 0   # generated tokens agreeing before the first divergence
        if first == first_t:
            while prefix < a.gen and ours_toks[prefix] == torch_toks[prefix]:
                prefix += 1
        r = dict(shape=name, dim=c.dim, layers=c.n_layers, heads=c.n_heads, kv_heads=c.n_kv_heads,
                 ffn=c.ffn_dim, vocab=c.vocab_size, prompt=a.prompt, gen=a.gen, device=dev,
                 torch=torch.__version__, persistent=info["persistent"],
                 ours_tok_s=a.gen / t_ours, ours_ms_tok=1e3 * t_ours / a.gen,
                 ours_step_tok_s=a.gen / t_step, torch_tok_s=a.gen / t_torch,
                 torch_ms_tok=1e3 * t_torch / a.gen, ratio=t_torch / t_ours,
                 first_token_equal=first == first_t, greedy_tokens_equal=same,
                 greedy_prefix_equal=prefix, target_ratio=TARGET_RATIO,
                 meets_target=t_torch / t_ours >= TARGET_RATIO, options=OPTIONS.get(name, {}),
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
             f"greedy = torch (of gen) | agreeing prefix | >= {TARGET_RATIO:g}x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['ours_tok_s']:,.0f} | {r['ours_ms_tok']:.3f} | "
                     f"{r['ours_step_tok_s']:,.0f} | {r['torch_tok_s']:,.0f} | {r['torch_ms_tok']:.3f} | "
                     f"{r['ratio']:.2f}x | {r['greedy_tokens_equal']}/{a.gen} | "
                     f"{r['greedy_prefix_equal']}/{a.gen} | {'yes' if r['meets_target'] else 'no'} |")
    print()
    report("\n".join(lines), a.out)
    print("appended to", append_results("decode_gpu", rows, dev))


if __name__ == "__main__":
    main()
