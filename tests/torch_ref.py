"""An independent PyTorch implementation of smedjan's model (Hugging Face
Llama conventions: rotate-half RoPE, repeat_kv GQA, RMSNorm, SwiGLU, tied
head; and every architecture option) and of its training recipe, used as
the parity reference."""
import math

import numpy as np
import torch
import torch.nn.functional as F


def rope_freqs(cfg, T):
    """inv_freq (hd/2) and the cos/sin scale for a run of T tokens: RoPE
    scaling as transformers defines it (linear, dynamic NTK, YaRN), written
    out again here."""
    hd = cfg.head_dim
    base = cfg.rope_theta
    rs = cfg.rope_scaling or {"type": "default"}
    kind = rs["type"]
    exps = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
    if kind == "dynamic" and T > rs["original_max_seq_len"]:
        f, orig = rs["factor"], rs["original_max_seq_len"]
        base = base * ((f * T / orig) - (f - 1)) ** (hd / (hd - 2))
    inv = 1.0 / (base ** exps)
    if kind == "linear":
        return inv / rs["factor"], 1.0
    if kind != "yarn":
        return inv, 1.0
    f, orig = rs["factor"], rs["original_max_seq_len"]

    def dim_of(rotations):   # the dim whose wavelength makes `rotations` turns in orig
        return (hd * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(cfg.rope_theta))

    lo, hi = dim_of(rs["beta_fast"]), dim_of(rs["beta_slow"])
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, hd - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(hd // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv = (inv / f) * (1 - extrapolate) + inv * extrapolate
    mscale = rs.get("attention_factor") or (0.1 * math.log(f) + 1.0)
    return inv, mscale


class TorchLlama(torch.nn.Module):
    """The model with every option of smedjan's Config (fields read from it)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, H, KV, hd, Fd, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
        Ho = H // 2 if cfg.paired_heads else H
        P = lambda *s: torch.nn.Parameter(torch.empty(*s))
        self.p = torch.nn.ParameterDict()
        self.p["tok_emb"] = P(V, C)
        for i in range(cfg.n_layers):
            for name, shape in (("wq", (H * hd, C)), ("wk", (KV * hd, C)), ("wv", (KV * hd, C)),
                                ("wo", (C, Ho * hd)), ("w_gate", (Fd, C)), ("w_up", (Fd, C)),
                                ("w_down", (C, Fd)), ("attn_norm", (C,)), ("ffn_norm", (C,))):
                self.p[f"layers_{i}_{name}"] = P(*shape)
            if cfg.layer(i)["qk_norm"] == "weighted":
                self.p[f"layers_{i}_q_norm"] = P(hd)
                self.p[f"layers_{i}_k_norm"] = P(hd)
        self.p["final_norm"] = P(C)
        if not cfg.tied_head:
            self.p["lm_head"] = P(V, C)

    @staticmethod
    def key(name):
        return name.replace(".", "_")

    def load_from(self, model):
        with torch.no_grad():
            for name, view in model.params.items():
                self.p[self.key(name)].copy_(torch.from_numpy(np.array(view)))

    def named(self, name):
        return self.p[self.key(name)]

    def rms(self, x, w=None):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return y if w is None else y * w

    def rope(self, x, T):
        hd = x.shape[-1]
        inv, mscale = rope_freqs(self.cfg, T)
        f = torch.outer(torch.arange(T).float(), inv)
        emb = torch.cat((f, f), dim=-1)
        cos, sin = emb.cos() * mscale, emb.sin() * mscale
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, tokens):
        cfg = self.cfg
        B, T = tokens.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        pair = (lambda t: (t[:, 0::2] + t[:, 1::2]) / 2) if cfg.paired_heads else (lambda t: t)
        e = self.p["tok_emb"][tokens]
        x, v0 = e, None
        for i in range(cfg.n_layers):
            g = lambda n: self.p[f"layers_{i}_{n}"]
            kinds = cfg.layer(i)
            if i > 0 and cfg.embed_skip:
                x = x + cfg.embed_skip * e
            h = self.rms(x, g("attn_norm"))
            q = pair((h @ g("wq").T).view(B, T, H, hd).transpose(1, 2))
            k = pair((h @ g("wk").T).view(B, T, KV, hd).transpose(1, 2))
            v = pair((h @ g("wv").T).view(B, T, KV, hd).transpose(1, 2))
            if kinds["qk_norm"] != "none":
                w = kinds["qk_norm"] == "weighted"
                q, k = self.rms(q, g("q_norm") if w else None), self.rms(k, g("k_norm") if w else None)
            q, k = self.rope(q, T), self.rope(k, T)
            if i == 0:
                v0 = v
            elif cfg.value_mix:
                v = (1 - cfg.value_mix) * v + cfg.value_mix * v0
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            pos = torch.arange(T)
            hide = pos[None, :] > pos[:, None]
            if kinds["window"]:
                hide |= pos[None, :] <= pos[:, None] - kinds["window"]
            s = s.masked_fill(hide, float("-inf"))
            a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
            x = x + a @ g("wo").T
            x = x + self.ffn(g, kinds, self.rms(x, g("ffn_norm")))
        head = self.p["tok_emb"] if cfg.tied_head else self.p["lm_head"]
        return self.rms(x, self.p["final_norm"]) @ head.T

    def ffn(self, g, kinds, h):
        """The channel mixer of a layer (g: its parameters by short name)."""
        gate = h @ g("w_gate").T
        act = F.relu(gate) ** 2 if kinds["ffn"] == "relu2" else F.silu(gate)
        return (act * (h @ g("w_up").T)) @ g("w_down").T

    def loss(self, tokens, targets, ignore_index=-1):
        logits = self.forward(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=ignore_index)


def schedule(step, lr, min_lr, warmup, steps):
    """The recipe's learning rate, written out independently of the engine."""
    if step < warmup:
        return min_lr + (lr - min_lr) * step / warmup
    if step >= steps - 1:
        return min_lr
    progress = (step - warmup) / (steps - 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
