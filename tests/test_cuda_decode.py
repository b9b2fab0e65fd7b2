"""The GPU inference engine (device="cuda"): its fp32 mode equals the CPU
engine's fp32 logits (1e-4) at prefill and at every decode step, over
prompts of 1, 7 and 100 tokens, past 600 positions (split attention) and
on grids smaller than the GPU's;
bf16 stays near fp32; KV decode equals recomputing the whole sequence;
graph / persistent-kernel choices give the same bits; reset repeats; bad
arguments and a full cache raise clear errors. GPU tests skip with "no CUDA
GPU" only when the machine has none; the error tests at the end run
everywhere."""
import numpy as np
import pytest

import smedjan
from smedjan import _C
from smedjan.config import Config
from smedjan.generate import generate_recompute
from smedjan.infer import InferenceModel, from_model

import cuda_ref as ref
from conftest import assert_close, rel_err  # noqa: E402

HAVE_GPU = ref.gpu_present()


def gpu_test(f):
    """Marked gpu; skipped with "no CUDA GPU" only where the machine has none."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU")(f))

# GQA everywhere (n_kv_heads < n_heads); "odd" has dim 100 and head size 50: the
# scalar (non-16-byte) paths of the GEMV and of the attention.
CONFIGS = {
    "gqa64": Config.custom(dim=256, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=1024),
    "gqa32": Config.custom(dim=128, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=384, max_seq_len=1024),
    "odd": Config.custom(dim=100, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=300, max_seq_len=1024),
}


def make_model(name, seed=0, scale=0.08):
    m = smedjan.Model(CONFIGS[name], seed=seed)
    rng = np.random.default_rng(seed + 11)
    for k, v in m.params.items():   # sharper than init, never zeros: large greedy margins
        if v.ndim == 2:
            v[:] = rng.standard_normal(v.shape).astype(np.float32) * scale
        else:
            v[:] = 1.0 + 0.1 * rng.standard_normal(v.shape).astype(np.float32)
    return m


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return make_model(request.param)


def untied_gguf(model, path):
    """The model as an f32 GGUF with a separate (random) output.weight."""
    from smedjan.gguf import F32, _kv, write_gguf
    c = model.config
    hd, C = c.dim // c.n_heads, c.dim
    P = model.params

    def perm(w, nh):   # ours -> llama.cpp's interleaved rows (tests/infer_common.unpermute inverts it)
        return w.reshape(nh, 2, hd // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    kvs = [_kv("general.architecture", "llama"), _kv("llama.context_length", c.max_seq_len),
           _kv("llama.embedding_length", C), _kv("llama.block_count", c.n_layers),
           _kv("llama.feed_forward_length", c.ffn_dim), _kv("llama.attention.head_count", c.n_heads),
           _kv("llama.attention.head_count_kv", c.n_kv_heads),
           _kv("llama.rope.freq_base", float(c.rope_theta)),
           _kv("llama.attention.layer_norm_rms_epsilon", float(c.norm_eps))]
    T = lambda name, w: (name, F32, tuple(reversed(w.shape)), np.ascontiguousarray(w, np.float32).tobytes())
    out = np.random.default_rng(5).standard_normal((c.vocab_size, C)).astype(np.float32) * 0.08
    ts = [T("token_embd.weight", P["tok_emb"]), T("output.weight", out),
          T("output_norm.weight", P["final_norm"])]
    for i in range(c.n_layers):
        L = lambda n: P[f"layers.{i}.{n}"]
        ts += [T(f"blk.{i}.attn_q.weight", perm(L("wq"), c.n_heads)),
               T(f"blk.{i}.attn_k.weight", perm(L("wk"), c.n_kv_heads)),
               T(f"blk.{i}.attn_v.weight", L("wv")), T(f"blk.{i}.attn_output.weight", L("wo")),
               T(f"blk.{i}.ffn_gate.weight", L("w_gate")), T(f"blk.{i}.ffn_up.weight", L("w_up")),
               T(f"blk.{i}.ffn_down.weight", L("w_down")),
               T(f"blk.{i}.attn_norm.weight", L("attn_norm")), T(f"blk.{i}.ffn_norm.weight", L("ffn_norm"))]
    write_gguf(path, kvs, ts)


def check_against_cpu(gpu_m, cpu_m, rng, prompt_len, n_decode, tol, what):
    """Prefill logits of every position, then each decode step's logits."""
    V = cpu_m.config.vocab_size
    toks = rng.integers(0, V, prompt_len + n_decode).astype(np.int32)
    gpu_m.reset(), cpu_m.reset()
    assert_close(gpu_m.prefill(toks[:prompt_len], all_logits=True),
                 cpu_m.prefill(toks[:prompt_len], all_logits=True), tol, f"{what} prefill({prompt_len})")
    worst = 0.0
    for i, t in enumerate(toks[prompt_len:]):
        e = rel_err(gpu_m.decode(int(t)), cpu_m.decode(int(t)))
        assert e < tol, f"{what}: decode step {i} (position {prompt_len + i}): relative error {e:.3e}"
        worst = max(worst, e)
    assert gpu_m.pos == cpu_m.pos == prompt_len + n_decode
    return worst


# ---- fp32 parity with the CPU engine --------------------------------------------

@gpu_test
@pytest.mark.parametrize("prompt_len,n_decode", [(1, 40), (7, 30), (100, 20)])
def test_fp32_prefill_and_decode_equal_cpu(model, prompt_len, n_decode):
    g = from_model(model, "fp32", device="cuda")
    c = from_model(model, "fp32")
    check_against_cpu(g, c, np.random.default_rng(prompt_len), prompt_len, n_decode, 1e-4, "fp32")


@gpu_test
@pytest.mark.parametrize("warps", [8, 16])
def test_fp32_decode_past_600_positions_equals_cpu(model, warps, monkeypatch):
    """Long contexts use the most splits (MAXSPLIT) and keys per split > 32;
    16-warp blocks (clusters on Hopper) leave the clustered phase at 512."""
    monkeypatch.setenv("SMEDJAN_DECODE_WARPS", str(warps))
    g = from_model(model, "fp32", device="cuda")
    c = from_model(model, "fp32")
    check_against_cpu(g, c, np.random.default_rng(7), 130, 500, 1e-4, "fp32 long")


@gpu_test
@pytest.mark.parametrize("warps", [8, 16])
@pytest.mark.parametrize("blocks", [3, 50, 0])
def test_fp32_decode_equals_cpu_on_any_grid(model, blocks, warps, monkeypatch):
    """Both block sizes (8 warps are chosen for models that fit in L2, 16
    otherwise), on the whole GPU (0) and on fewer blocks as on GPUs with fewer
    SMs: several FFN rows per warp, fewer attention units than heads (3)."""
    monkeypatch.setenv("SMEDJAN_DECODE_WARPS", str(warps))
    if blocks:
        monkeypatch.setenv("SMEDJAN_DECODE_GRID", str(blocks))
    g = from_model(model, "fp32", device="cuda")
    c = from_model(model, "fp32")
    check_against_cpu(g, c, np.random.default_rng(blocks), 30, 30, 1e-4,
                      f"fp32, {warps} warps, grid {blocks or 'full'}")


@gpu_test
def test_untied_head_fp32_equals_cpu(tmp_path):
    m = make_model("gqa64")
    p = tmp_path / "untied.gguf"
    untied_gguf(m, p)
    c = InferenceModel.load_gguf(p, "fp32", tokenizer=False)
    tied = from_model(m, "fp32")
    toks = np.arange(1, 20, dtype=np.int32)
    assert rel_err(c.forward(toks), tied.forward(toks)) > 0.1        # the head really differs
    g = InferenceModel.load_gguf(p, "fp32", tokenizer=False, device="cuda")
    check_against_cpu(g, c, np.random.default_rng(3), 9, 20, 1e-4, "untied fp32")


@gpu_test
def test_model_on_gpu_converts_like_cpu_model():
    m = make_model("gqa32")
    toks = np.random.default_rng(2).integers(0, 384, 30).astype(np.int32)
    want = from_model(m, "fp32", device="cuda").forward(toks)
    m.to("cuda", "fp32")
    try:
        got = from_model(m, "fp32", device="cuda").forward(toks)
    finally:
        m.to("cpu")
    np.testing.assert_array_equal(got, want)


# ---- bf16 ----------------------------------------------------------------------------

@gpu_test
def test_bf16_near_fp32_and_greedy_agrees(model):
    V = model.config.vocab_size
    toks = np.random.default_rng(4).integers(0, V, 60).astype(np.int32)
    b = from_model(model, device="cuda")
    assert b.mode == "bf16"
    ref_lg = from_model(model, "fp32").forward(toks)
    assert_close(b.forward(toks), ref_lg, 2e-2, "bf16 prefill")
    b.reset()
    b.prefill(toks[:30])
    steps = np.stack([b.decode(int(t)) for t in toks[30:]])
    assert_close(steps, ref_lg[30:], 2e-2, "bf16 decode")
    # greedy choices, teacher-forced on the CPU fp32 continuation (one early
    # near-tie would otherwise change every later context)
    prompt = [5, 17, 42, 7]
    cont = list(from_model(model, "fp32").generate(prompt, 48, temperature=0))
    seq = np.array(prompt + cont, np.int32)
    agree = np.mean(np.argmax(b.forward(seq), -1) == np.argmax(from_model(model, "fp32").forward(seq), -1))
    assert agree >= 0.9, f"bf16 greedy choices agree with CPU fp32 on {agree:.2f} of positions"
    b.reset()
    b.prefill(seq[:len(prompt)])
    steps = [b.decode_greedy(int(t)) for t in seq[len(prompt):-1]]
    agree = np.mean(np.array(steps) == seq[len(prompt) + 1:])
    assert agree >= 0.9, f"bf16 device greedy agrees with CPU fp32 greedy on {agree:.2f} of steps"


# ---- KV decode == recompute ---------------------------------------------------------

@gpu_test
def test_kv_greedy_equals_full_recompute(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    g = from_model(model, "fp32", device="cuda")
    kv = list(g.generate(prompt, 40, temperature=0))
    assert kv == list(generate_recompute(model, prompt, 40, temperature=0))
    # and against the GPU's own batched forward of the whole sequence
    seq = np.array(prompt + kv[:-1], np.int32)
    assert list(np.argmax(g.forward(seq), -1)[len(prompt) - 1:]) == kv
    s = g.stats()
    assert s["device"] == "cuda" and s["generated_tokens"] == 40 and s["gen_tok_s"] > 0


@gpu_test
def test_model_generate_on_gpu_uses_the_gpu_engine():
    m = make_model("gqa32")
    prompt = [9, 8, 7]
    want = list(from_model(m, "bf16", device="cuda").generate(prompt, 12, temperature=0))
    assert list(smedjan.generate.generate(m, prompt, 12, temperature=0, device="cuda")) == want
    assert m._last_infer.device == "cuda"


# ---- execution paths -------------------------------------------------------------------

@gpu_test
@pytest.mark.parametrize("warps", [8, 16])
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_graph_and_persistent_paths_give_identical_bits(model, mode, warps, monkeypatch):
    """16-warp blocks: QKV and attention in thread-block clusters on Hopper."""
    monkeypatch.setenv("SMEDJAN_DECODE_WARPS", str(warps))
    V = model.config.vocab_size
    toks = np.random.default_rng(8).integers(0, V, 70).astype(np.int32)
    g = from_model(model, mode, device="cuda")
    runs = {}
    for graphs in (True, False):
        for persistent in (True, False):
            g.set_options(graphs=graphs, persistent=persistent)
            g.reset()
            g.prefill(toks[:20])
            runs[graphs, persistent] = np.stack([g.decode(int(t)) for t in toks[20:]])
    base = runs[True, True]
    for k, v in runs.items():
        assert np.array_equal(v, base), f"graphs={k[0]} persistent={k[1]} differs from the default path"


@gpu_test
def test_chained_greedy_equals_step_by_step(model):
    g = from_model(model, "bf16", device="cuda")
    prompt = np.array([11, 22, 33, 44, 55], np.int32)
    t0 = int(np.argmax(g.prefill(prompt)))
    steps, t = [], t0
    for _ in range(50):
        t = g.decode_greedy(t)
        steps.append(t)
    last = g.last_logits()
    g.reset()
    g.prefill(prompt)
    chained = g.greedy(t0, 50)
    assert list(chained) == steps
    assert np.array_equal(g.last_logits(), last)
    assert g.pos == len(prompt) + 50
    # device argmax == host argmax (smallest id of the maximum) on the last logits
    assert steps[-1] == int(np.argmax(last))


@gpu_test
def test_reset_then_same_prompt_is_identical(model):
    g = from_model(model, "bf16", device="cuda")
    a = list(g.generate([1, 2, 3, 4], 20, temperature=0.8, top_k=20, top_p=0.9, seed=3))
    la = g.last_logits()
    b = list(g.generate([1, 2, 3, 4], 20, temperature=0.8, top_k=20, top_p=0.9, seed=3))
    assert a == b and np.array_equal(la, g.last_logits())
    greedy = list(g.generate([1, 2, 3, 4], 10, temperature=0))
    assert list(g.generate([1, 2, 3, 4], 10, temperature=0.7, top_k=1, seed=1)) == greedy
    pen = list(g.generate([1, 2, 3, 4], 10, temperature=0, repetition_penalty=1.3))
    cpu_pen = list(from_model(model, "fp32").generate([1, 2, 3, 4], 10, temperature=0,
                                                      repetition_penalty=1.3))
    assert np.mean([x == y for x, y in zip(pen, cpu_pen)]) >= 0.9


@gpu_test
def test_full_cache_and_bad_tokens_raise_clearly():
    m = make_model("gqa32")
    g = from_model(m, "bf16", max_ctx=16, device="cuda")
    assert g.max_ctx == 16
    with pytest.raises(ValueError, match="exceed"):
        g.prefill(np.zeros(17, np.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        g.prefill([1, 384])
    g.prefill(np.arange(1, 15, dtype=np.int32))
    g.decode(3)
    g.decode(4)                                  # position 15: the last one
    with pytest.raises(ValueError, match="exceed"):
        g.decode(5)
    g.reset()
    g.prefill([1, 2])
    with pytest.raises(ValueError, match="exceed"):
        g.greedy(3, 15)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        g.decode(-1)
    assert g.pos == 2                            # nothing happened
    g.decode(3)                                  # and it still works
    assert np.isfinite(g.last_logits()).all()


@gpu_test
def test_q4_mode_on_gpu_is_refused():
    m = make_model("gqa32")
    with pytest.raises(ValueError, match="not available on the GPU"):
        from_model(m, "q4", device="cuda")


@gpu_test
def test_cpu_options_on_the_gpu_handle_are_refused_by_name(tmp_path):
    m = make_model("gqa32")
    with pytest.raises(ValueError, match="not available on cuda"):
        from_model(m, "bf16", device="cuda", kv_dtype="f16")
    g = from_model(m, "bf16", device="cuda")
    assert g.kv_dtype == "bf16" and g.device == "cuda"
    from smedjan.gguf import export_gguf
    with pytest.raises(ValueError, match="load it on the CPU"):
        export_gguf(g, tmp_path / "x.gguf", "f32")


@gpu_test
def test_memory_reports_gpu_bytes():
    m = make_model("gqa64")
    g = from_model(m, "bf16", device="cuda")
    f = from_model(m, "fp32", device="cuda")
    assert g.memory()["device"] == "cuda"
    assert f.memory()["weight_bytes"] > 1.9 * g.memory()["weight_bytes"]
    assert g.stats()["weight_mb"] > 0


# ---- everywhere: a clear error without CUDA or a GPU ----------------------------------

def test_cuda_device_without_a_gpu_or_cuda_build_is_a_clear_error():
    if HAVE_GPU and _C.HAVE_CUDA:
        pytest.skip("this machine has a GPU and a CUDA build")
    m = smedjan.Model("tiny", vocab_size=256)
    want = "no CUDA GPU" if _C.HAVE_CUDA else "no CUDA backend"
    with pytest.raises(RuntimeError, match=want):
        from_model(m, device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        from_model(m, device="tpu")

