"""The CPU generation engine with every architecture option, alone and
mixed: its fp32 logits equal the PyTorch reference (tests/torch_ref.py, the
spec), greedy generation on its KV cache equals full recomputation (with
sliding windows shorter than the prompt, their ring-buffer caches wrapping
many times), a windowed layer's cache is `window` rows, and the quantised
modes track fp32."""
import numpy as np
import pytest
import torch

import smedjan
from test_architectures import OPTIONS as ALL_OPTIONS
from smedjan.gguf import export_gguf
from smedjan.infer import InferenceModel
from conftest import rel_err
from torch_ref import TorchLlama

torch.set_num_threads(max(1, smedjan.threads()))

# Every option of the training tests, but dynamic NTK scaling: its
# frequencies depend on the length of the run, so a cache of keys turned at
# earlier lengths cannot equal a recomputation (engines turn by max_ctx's).
OPTIONS = {k: v for k, v in ALL_OPTIONS.items() if k != "rope-dynamic"}
# head size 16 runs the portable attention loops; 64 the AVX-512 kernels
# (grouped decode, prefill tiles) where the CPU has them
SHAPES = {"hd16": dict(dim=64, n_heads=4, n_kv_heads=2), "hd64": dict(dim=256, n_heads=4, n_kv_heads=2)}
V = 97


def make(options, shape="hd16", max_seq_len=256, seed=0):
    """A 3-layer model with sharp random weights (few near-ties for greedy
    paths), gains away from 1, and the torch reference holding the same."""
    s = SHAPES[shape]
    cfg = smedjan.Config.custom(s["dim"], 3, s["n_heads"], s["n_kv_heads"], vocab_size=V,
                                max_seq_len=max_seq_len, **options)
    model = smedjan.Model(cfg, seed=seed)
    r = np.random.default_rng(seed)
    for name, v in model.params.items():
        if v.ndim == 2:
            v[:] = r.standard_normal(v.shape).astype(np.float32) * (0.5 / np.sqrt(v.shape[1]) + 0.05)
        else:
            v[:] = r.uniform(0.5, 1.5, v.shape)
    ref = TorchLlama(cfg)
    ref.load_from(model)
    return model, ref


def torch_logits(ref, tokens):
    with torch.no_grad():
        return ref.forward(torch.tensor(np.asarray(tokens)[None], dtype=torch.long))[0].numpy()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_fp32_logits_equal_torch(option, shape):
    """A 150-token prompt: longer than every window and than one prefill
    chunk (128), so windowed attention crosses a chunk boundary."""
    model, ref = make(OPTIONS[option], shape)
    toks = np.random.default_rng(1).integers(0, V, 150).astype(np.int32)
    ours = InferenceModel.from_model(model, "fp32").forward(toks)
    theirs = torch_logits(ref, toks)
    assert rel_err(ours, theirs) < 1e-5, rel_err(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_cached_greedy_generation_equals_full_recompute(option, shape):
    """Prefill 20 tokens, then 64 greedy decode steps: every step's logits
    and choice equal a full forward over the sequence so far. A window of 6
    wraps its ring buffer more than ten times."""
    model, ref = make(OPTIONS[option], shape, max_seq_len=128)
    seq = [int(t) for t in np.random.default_rng(2).integers(0, V, 20)]
    m = InferenceModel.from_model(model, "fp32")
    logits = m.prefill(seq)
    for step in range(64):
        full = torch_logits(ref, seq)[-1]
        assert rel_err(logits, full) < 1e-5, (step, rel_err(logits, full))
        assert int(np.argmax(logits)) == int(np.argmax(full)), step
        seq.append(int(np.argmax(logits)))
        logits = m.decode(seq[-1])
    assert m.pos == 20 + 64


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("chunks", [[150], [1] * 30 + [120], [5, 7, 3, 135]])
def test_any_split_into_prefills_and_decodes_gives_the_same_logits(chunks, kv_dtype):
    """Windowed layers take the prompt in any pieces (one token, fewer than
    the window, more): the same logits as one prefill, on both cache types."""
    model, _ = make(OPTIONS["mixed"], "hd64")
    toks = np.random.default_rng(3).integers(0, V, sum(chunks)).astype(np.int32)
    m = InferenceModel.from_model(model, "fp32", kv_dtype=kv_dtype)
    whole = m.forward(toks)
    m.reset()
    parts, at = [], 0
    for n in chunks:
        parts.append(m.prefill(toks[at:at + n], all_logits=True))
        at += n
    # f32: what batched and one-row matmuls differ by; f16: a cache entry may
    # round the other way after such a difference
    assert rel_err(np.concatenate(parts), whole) < (1e-5 if kv_dtype == "f32" else 3e-4)


def test_a_windowed_layers_cache_is_window_rows():
    """K and V of a layer with window 6 take 6 rows, not max_ctx, so long
    generation keeps a bounded cache."""
    def cache_bytes(window, max_ctx):
        model, _ = make(dict(window=window), max_seq_len=4096)
        return InferenceModel.from_model(model, "fp32", max_ctx=max_ctx).memory()["cache_bytes"]
    row = 2 * 2 * 16 * 4   # K and V, n_kv_heads * head_dim f32 values each
    full = cache_bytes(0, 4096)
    assert full - cache_bytes([6, 0, 6], 4096) == 2 * (4096 - 6) * row
    assert full - cache_bytes(6, 4096) == 3 * (4096 - 6) * row
    # a window as long as the context hides nothing: a whole-context cache
    assert cache_bytes(64, 64) == cache_bytes(0, 64)


@pytest.mark.parametrize("mode, tol", [("bf16", 0.02), ("q8", 0.06), ("q4", 0.5)])
def test_quantised_modes_track_fp32(mode, tol):
    model, _ = make(OPTIONS["mixed"], "hd64")
    toks = np.random.default_rng(4).integers(0, V, 40).astype(np.int32)
    ref = InferenceModel.from_model(model, "fp32").forward(toks)
    q = InferenceModel.from_model(model, mode)
    out = q.forward(toks)
    assert rel_err(out, ref) < tol, (mode, rel_err(out, ref))
    q.reset()
    q.prefill(toks[:10])
    step = np.stack([q.decode(t) for t in toks[10:]])
    assert rel_err(step, out[10:]) < 1e-5


@pytest.mark.parametrize("option, name", [("window", "window"), ("qk-norm", "qk_norm"), ("relu2", "ffn"),
                                          ("paired-heads", "paired_heads"), ("value-mix", "value_mix"),
                                          ("embed-skip", "embed_skip"), ("rope-yarn", "rope_scaling")])
def test_gguf_export_refuses_options_llama_gguf_cannot_say(option, name, tmp_path):
    model, _ = make(OPTIONS[option])
    with pytest.raises(ValueError, match=name):
        export_gguf(model, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_export_keeps_an_untied_head(tmp_path):
    model, ref = make(OPTIONS["untied-head"])
    export_gguf(model, tmp_path / "m.gguf", "f32")
    toks = np.arange(30, dtype=np.int32)
    back = InferenceModel.load_gguf(tmp_path / "m.gguf", "fp32", tokenizer=False).forward(toks)
    assert rel_err(back, torch_logits(ref, toks)) < 1e-5
