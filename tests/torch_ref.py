"""An independent PyTorch implementation of smedjan's model (Hugging Face
Llama conventions: rotate-half RoPE, repeat_kv GQA, RMSNorm, SwiGLU, tied
head) and of its training recipe, used as the parity reference."""
import math

import numpy as np
import torch
import torch.nn.functional as F


def hf_llama_config(cfg):
    """transformers' LlamaConfig for the shape and RoPE of a smedjan Config.
    Dynamic scaling grows past max_position_embeddings: the original context."""
    from transformers import LlamaConfig
    rs, max_pos = cfg.rope_scaling or {"type": "default"}, cfg.max_seq_len
    rp = {"rope_type": rs["type"], "rope_theta": cfg.rope_theta}
    if rs["type"] != "default":
        rp["factor"] = rs["factor"]
    if rs["type"] == "dynamic":
        max_pos = rs["original_max_seq_len"]
    if rs["type"] == "yarn":
        rp.update(original_max_position_embeddings=rs["original_max_seq_len"],
                  beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"], truncate=rs["truncate"])
        if rs["attention_factor"]:
            rp["attention_factor"] = rs["attention_factor"]
    return LlamaConfig(hidden_size=cfg.dim, num_attention_heads=cfg.n_heads,
                       num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=max_pos,
                       rope_parameters=rp)


class TorchLlama(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, H, KV, hd, Fd, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
        P = lambda *s: torch.nn.Parameter(torch.empty(*s))
        self.p = torch.nn.ParameterDict()
        self.p["tok_emb"] = P(V, C)
        for i in range(cfg.n_layers):
            for name, shape in (("wq", (H * hd, C)), ("wk", (KV * hd, C)), ("wv", (KV * hd, C)),
                                ("wo", (C, H * hd)), ("w_gate", (Fd, C)), ("w_up", (Fd, C)),
                                ("w_down", (C, Fd)), ("attn_norm", (C,)), ("ffn_norm", (C,))):
                self.p[f"layers_{i}_{name}"] = P(*shape)
        self.p["final_norm"] = P(C)

    @staticmethod
    def key(name):
        return name.replace(".", "_")

    def load_from(self, model):
        with torch.no_grad():
            for name, view in model.params.items():
                self.p[self.key(name)].copy_(torch.from_numpy(np.array(view)))

    def named(self, name):
        return self.p[self.key(name)]

    def rms(self, x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps) * w

    def rope(self, x, T):
        hd = x.shape[-1]
        if self.cfg.rope_scaling:   # scaled: transformers' own rotary embedding
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
            cos, sin = LlamaRotaryEmbedding(hf_llama_config(self.cfg))(x, torch.arange(T)[None])
        else:
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            f = torch.outer(torch.arange(T).float(), inv)
            emb = torch.cat((f, f), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, tokens):
        cfg = self.cfg
        B, T = tokens.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = self.p["tok_emb"][tokens]
        for i in range(cfg.n_layers):
            g = lambda n: self.p[f"layers_{i}_{n}"]
            h = self.rms(x, g("attn_norm"))
            q = (h @ g("wq").T).view(B, T, H, hd).transpose(1, 2)
            k = (h @ g("wk").T).view(B, T, KV, hd).transpose(1, 2)
            v = (h @ g("wv").T).view(B, T, KV, hd).transpose(1, 2)
            q, k = self.rope(q, T), self.rope(k, T)
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            a = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
            x = x + a @ g("wo").T
            h = self.rms(x, g("ffn_norm"))
            x = x + (F.silu(h @ g("w_gate").T) * (h @ g("w_up").T)) @ g("w_down").T
        return self.rms(x, self.p["final_norm"]) @ self.p["tok_emb"].T

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


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
