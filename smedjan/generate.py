"""Model.generate: sampling as a streaming Python iterator.

Generation runs on the inference engine's KV cache (smedjan.infer: one
batched prefill of the prompt, then one decode per token, sampling in C), on
the CPU or, for a model on a GPU (or device="cuda"), on the GPU engine.
generate_recompute is the original path, kept as the reference the KV-cache
path is tested against (and used for models on a GPU): without a KV cache
each new token reruns the forward pass over the whole context. The context is padded at the end to a small set of bucket lengths:
attention is causal, so padding never changes the logits of the real
positions, and the engine reuses one planned tape per bucket instead of
planning one per length."""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Union

import numpy as np


def _bucket(n: int, max_len: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return min(b, max_len)


def generate(model, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, seed: Optional[int] = None,
             stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
             tokenizer=None, repetition_penalty: float = 1.0,
             device: Optional[str] = None, draft=None, draft_k: int = 4,
             draft_lookup: int = 0) -> Iterator[int]:
    """Stream up to max_new_tokens token ids after prompt (text needs a
    tokenizer: the model's own when it came from a checkpoint). Generation
    ends early at a stop token id or once the decoded text ends with a stop
    string; the stop token itself is not yielded. A context longer than
    max_seq_len slides (the last max_seq_len tokens). repetition_penalty
    applies once per distinct token of prompt and output.

    Arguments out of range are refused by name before any work
    (ValueError): max_new_tokens < 0, temperature < 0, top_k < 0, top_p
    outside (0, 1], repetition_penalty <= 0, or a tokenizer with more
    tokens than the model's vocab_size. A tokenizer with fewer tokens is
    fine: only its ids are sampled, so everything generated decodes.

    This runs on the KV-cache engine (weights copied at the call): on the
    model's device, or on device ("cpu", "cuda") when given; the GPU engine
    computes in the model's dtype (bf16 for a CPU model, and for an fp16
    model: the GPU engine has fp32 and bf16 weights only).

    Speculative decoding: draft (a smedjan Model, an InferenceModel or a
    checkpoint path, sharing the tokenizer) or draft_lookup=N (prompt
    lookup n-grams) proposes up to draft_k tokens that the model verifies
    in one batched forward; greedy output is plain greedy's, sampled output
    has plain sampling's distribution (smedjan.infer._Speculator). The
    acceptance statistics: model._last_infer.stats().

    >>> # for t in model.generate("def main", 32, temperature=0.8, seed=0): ...
    """
    from .infer import check_sampling, check_vocab
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    check_vocab(tok, model.config.vocab_size)
    dev = device or getattr(model, "device", "cpu")
    if dev not in ("cpu", "cuda") or not hasattr(model, "_h"):
        if repetition_penalty != 1.0:
            raise ValueError("repetition_penalty needs the CPU KV-cache engine")
        if draft is not None or draft_lookup:
            raise ValueError("speculative decoding (draft, draft_lookup) needs the KV-cache engine")
        return generate_recompute(model, prompt, max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                                  tokenizer=tokenizer)
    from .infer import InferenceModel, _generate
    ids = _prompt_ids(prompt, tok)
    stops = [] if stop is None else [stop] if isinstance(stop, (int, str)) else list(stop)
    if any(isinstance(s, str) for s in stops) and tok is None:
        raise ValueError("stop strings need a tokenizer")
    if dev == "cuda":
        # the GPU engine's modes are fp32 and bf16: an fp16 model decodes in bf16
        mode = "fp32" if getattr(model, "dtype", "bf16") == "fp32" and model.device == "cuda" else "bf16"
        im = InferenceModel.from_model(model, mode, model.config.max_seq_len, device="cuda")
    else:
        im = InferenceModel.from_model(model, "fp32", model.config.max_seq_len)
    im.tokenizer = tok
    model._last_infer = im          # stats() of the last run: model._last_infer.stats()
    return _generate(im, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     repetition_penalty=repetition_penalty, seed=seed, stop=stop, tokenizer=tok,
                     window=model.config.max_seq_len, draft=draft, draft_k=draft_k,
                     draft_lookup=draft_lookup)


def _prompt_ids(prompt, tok):
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError("prompt is text but the model has no tokenizer: pass tokenizer= "
                             "or token ids")
        ids = list(np.asarray(tok.encode(prompt, allowed_special="all")))
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("prompt is empty: generation needs at least one token")
    return [int(t) for t in ids]


def generate_recompute(model, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64, *,
                       temperature: float = 1.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None, seed: Optional[int] = None,
                       stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
                       tokenizer=None) -> Iterator[int]:
    """The reference path: every token reruns the full forward over the
    context (no KV cache); sampling as the engine samples (the same seed
    draws the same tokens from the same logits)."""
    from .infer import check_sampling, check_vocab
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    check_vocab(tok, model.config.vocab_size)
    ids = _prompt_ids(prompt, tok)
    stops = [] if stop is None else [stop] if isinstance(stop, (int, str)) else list(stop)
    stop_ids = {s for s in stops if isinstance(s, int)}
    stop_strs = [s for s in stops if isinstance(s, str)]
    if stop_strs and tok is None:
        raise ValueError("stop strings need a tokenizer")
    from . import _C
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    V, max_len = model.config.vocab_size, model.config.max_seq_len
    n_emit = V if tok is None else len(tok)     # only ids the tokenizer can decode
    sampler = _C.Sampler(n_emit, int(seed) & ((1 << 64) - 1))
    temp, k, p = float(temperature), int(top_k or 0), float(top_p if top_p is not None else 1.0)
    new = []
    for _ in range(max_new_tokens):
        ctx = ids[-max_len:]
        L = _bucket(len(ctx), max_len)
        x = np.zeros((1, L), np.int32)
        x[0, :len(ctx)] = ctx
        logits = model.forward(x)[0, len(ctx) - 1]
        t = sampler.sample(np.ascontiguousarray(logits[:n_emit], np.float32), temp, k, p, 1.0, None)
        if t in stop_ids:
            return
        ids.append(t)
        new.append(t)
        yield t
        if stop_strs and any(tok.decode(new, errors="replace").endswith(s) for s in stop_strs):
            return
