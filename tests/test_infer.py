"""The inference engine on smedjan's own models: the KV-cache path equals
the full-recompute reference, its fp32 logits equal the training model's,
quantised kernels equal their scalar reference, and sampling is seeded,
filtered and penalised as specified."""
import numpy as np
import pytest

import smedjan
from smedjan import _C
from smedjan.generate import generate, generate_recompute
from smedjan.infer import from_model
from infer_common import beaten


@pytest.fixture(scope="module")
def model():
    m = smedjan.Model("tiny", vocab_size=512, seed=3, max_seq_len=64)
    rng = np.random.default_rng(0)
    for name, v in m.params.items():      # sharper weights than init: less tie-prone greedy paths
        if v.ndim == 2:
            v[:] = rng.standard_normal(v.shape).astype(np.float32) * 0.08
    return m


def test_fp32_engine_logits_equal_training_forward(model):
    toks = np.random.default_rng(1).integers(0, 512, 50).astype(np.int32)
    ref = model.forward(toks[None])[0]
    ours = from_model(model, "fp32").forward(toks)
    err = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert err < 1e-5, err


def test_kv_cache_greedy_equals_full_recompute(model):
    prompt = [5, 17, 300, 42, 7]
    kv = list(generate(model, prompt, 40, temperature=0))
    ref = list(generate_recompute(model, prompt, 40, temperature=0))
    assert kv == ref


def test_kv_cache_sampling_equals_full_recompute(model):
    """One sampler: the same seed draws the same tokens from the same logits."""
    prompt = [5, 17, 300, 42, 7]
    kw = dict(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    assert list(generate(model, prompt, 40, **kw)) == list(generate_recompute(model, prompt, 40, **kw))


def test_kv_cache_slides_past_max_seq_len_like_recompute(model):
    prompt = list(range(1, 60))
    kv = list(generate(model, prompt, 12, temperature=0))
    ref = list(generate_recompute(model, prompt, 12, temperature=0))
    assert kv == ref


@pytest.mark.parametrize("mode", ["bf16", "q8", "q4"])
def test_quantised_modes_track_fp32(model, mode):
    toks = np.random.default_rng(2).integers(0, 512, 40).astype(np.int32)
    ref = from_model(model, "fp32").forward(toks)
    q = from_model(model, mode)
    out = q.forward(toks)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < {"bf16": 0.02, "q8": 0.06, "q4": 0.5}[mode], (mode, err)
    q.reset()
    q.prefill(toks[:10])
    step = np.stack([q.decode(t) for t in toks[10:]])
    assert np.linalg.norm(step - out[10:]) / np.linalg.norm(out[10:]) < 1e-5


@pytest.mark.parametrize("isa", ["avx2", "avx512vnni"])
def test_simd_kernels_equal_scalar_reference(isa):
    """Each ISA's Q8/Q4 kernels on random data: odd row counts, odd block
    counts, 1 .. 70 tokens (decode tiles and prefill tiles)."""
    try:
        _C.infer_kernel_check(0, isa)
    except ValueError as e:
        pytest.skip(str(e))
    for seed in range(3):
        err, _ = _C.infer_kernel_check(seed, isa)
        assert err < 1e-5, (seed, isa, err)


SAME_LOGITS = """
import sys, numpy as np, smedjan
from smedjan.infer import from_model
m = smedjan.Model("tiny", vocab_size=512, seed=3, max_seq_len=64)
toks = np.random.default_rng(1).integers(0, 512, 40).astype(np.int32)
out = []
for mode in ("q8", "q4"):
    e = from_model(m, mode)
    out.append(e.forward(toks)[1:])                         # prefill tiles
    e.reset(); e.prefill(toks[:1])
    out.append(np.stack([e.decode(t) for t in toks[1:]]))   # decode GEMV
np.save(sys.argv[1], np.stack(out))
print(e._h.info()["isa"])
"""


def test_forced_isas_give_the_scalar_logits(tmp_path):
    """SMEDJAN_ISA=avx2 (or scalar) forces a kernel set on any machine; the
    whole engine (prefill tiles and decode GEMV) then tracks the scalar one."""
    import os
    import subprocess
    import sys
    res = {}
    for isa in ("scalar", "avx2", ""):
        f = tmp_path / f"{isa or 'best'}.npy"
        env = dict(os.environ, SMEDJAN_ISA=isa, SMEDJAN_THREADS="2")
        got = subprocess.run([sys.executable, "-c", SAME_LOGITS, str(f)], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert isa in ("", got) or got == "scalar", (isa, got)   # capped at what the CPU has
        res[isa] = np.load(f)
    # Float sums in another order move a few activations across an 8-bit
    # rounding boundary, and this sharp random model amplifies each such flip
    # (measured 4e-3): close in norm and in greedy choices, not bit-equal.
    # The kernels themselves are held to 1e-5 by the test above. A logit
    # moves by up to 0.005 (measured), so a top-1 that differs from the
    # scalar one where the scalar one leads by more than 0.05 is an error.
    for isa in ("avx2", ""):
        err = np.linalg.norm(res[isa] - res["scalar"]) / np.linalg.norm(res["scalar"])
        bad, gap = beaten(res[isa], res["scalar"], 0.05)
        assert err < 2e-2 and bad.size == 0, (isa or "best", err, bad, gap[bad])


def test_resident_memory_by_mode(model):
    mb = {m: from_model(model, m).memory()["weight_bytes"] for m in ("fp32", "bf16", "q8", "q4")}
    assert mb["fp32"] > mb["bf16"] > mb["q8"] > mb["q4"], mb


def test_sampling_is_seeded_and_filtered(model):
    p = [1, 2, 3]
    a = list(generate(model, p, 20, temperature=1.0, seed=5))
    assert a == list(generate(model, p, 20, temperature=1.0, seed=5))
    assert a != list(generate(model, p, 20, temperature=1.0, seed=6))
    greedy = list(generate(model, p, 10, temperature=0))
    assert list(generate(model, p, 10, temperature=0.7, top_k=1, seed=1)) == greedy
    assert list(generate(model, p, 10, temperature=0.7, top_p=1e-6, seed=1)) == greedy
    stop = greedy[3]
    assert list(generate(model, p, 10, temperature=0, stop=stop)) == greedy[:greedy.index(stop)]


def test_sampler_distribution_top_p_and_penalty():
    V = 4
    s = _C.Sampler(V, 0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = np.array([s.sample(logits, 1.0, 0, 1.0, 1.0, None) for _ in range(4000)])
    freq = np.bincount(draws, minlength=V) / draws.size
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.03, freq
    nucleus = {s.sample(logits, 1.0, 0, 0.7, 1.0, None) for _ in range(500)}
    assert nucleus == {0, 1}                           # 0.5 + 0.3 >= 0.7
    assert {s.sample(logits, 1.0, 2, 1.0, 1.0, None) for _ in range(500)} == {0, 1}
    # penalty once per DISTINCT token: [2, 1, -1] with history [0, 0, 2], penalty 2 -> [1, 1, -2]
    l2 = np.array([2.0, 1.0, -1.0, -5.0], np.float32)
    hist = np.array([0, 0, 2], np.int32)
    assert s.sample(l2, 0.0, 0, 1.0, 2.0, hist) == 0     # tie 1 vs 1 -> smallest id
    assert s.sample(l2, 0.0, 0, 1.0, 2.01, hist) == 1
    with pytest.raises(ValueError):
        s.sample(np.zeros(3, np.float32), 1.0, 0, 1.0, 1.0, None)


def test_engine_errors_are_clear(model):
    m = from_model(model, "q8", max_ctx=16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.prefill([1, 512])
    with pytest.raises(ValueError, match="exceed"):
        m.prefill(np.zeros(17, np.int32))
    with pytest.raises(ValueError, match="mode"):
        from_model(model, "q3")
    with pytest.raises(ValueError, match="empty"):
        list(m.generate([], 3))


def test_greedy_verbs_choose_the_argmax_of_each_step(model):
    """decode_greedy and greedy (the GPU's device-side verbs) run on the CPU
    too, choosing on the host what np.argmax chooses from the step's logits."""
    m = from_model(model, "q8")
    prompt = np.array([9, 80, 301, 4], np.int32)
    t0 = int(np.argmax(m.prefill(prompt)))
    steps, t = [], t0
    for _ in range(12):
        t = int(np.argmax(m.decode(t)))
        steps.append(t)
    m.reset()
    m.prefill(prompt)
    assert [m.decode_greedy(t) for t in [t0] + steps[:-1]] == steps
    m.reset()
    m.prefill(prompt)
    assert list(m.greedy(t0, 12)) == steps and m.pos == len(prompt) + 12


def test_one_handle_refuses_the_other_devices_options_by_name(model):
    m = from_model(model, "fp32", max_ctx=8)
    assert m.device == "cpu" and m.kv_dtype == "f32"
    with pytest.raises(ValueError, match="not available on cpu"):
        m.set_options(graphs=False)
    m.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="exceed"):
        m.greedy(4, 6)                      # 3 + 6 > 8: refused before any step
    with pytest.raises(ValueError, match="non-empty"):
        m.greedy(4, 0)
    assert m.pos == 3
    assert len(m.greedy(4, 5)) == 5 and m.pos == 8


def test_untied_head_goes_through_gguf_and_back(tmp_path):
    """lm_head is written as GGUF's output.weight and read back from it (the
    engine's name table), q/k rows permuted both ways."""
    from smedjan.config import Config
    from smedjan.gguf import export_gguf, read_gguf
    from smedjan.infer import InferenceModel
    m = smedjan.Model(Config.custom(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                                    max_seq_len=64, tied_head=False), seed=1)
    toks = np.arange(1, 30, dtype=np.int32)
    want = m.forward(toks[None])[0]
    export_gguf(from_model(m, "fp32"), tmp_path / "untied.gguf", "f32")
    assert "output.weight" in read_gguf(tmp_path / "untied.gguf").tensors
    got = InferenceModel.load_gguf(tmp_path / "untied.gguf", "fp32", tokenizer=False).forward(toks)
    assert np.abs(got - want).max() < 1e-5


def test_generate_cli_streams(tmp_path, model):
    from smedjan.infer import InferenceModel
    m = InferenceModel.from_model(model, "fp32")
    out = list(m.generate([3, 4], 5, temperature=0))
    s = m.stats()
    assert len(out) == 5 and s["generated_tokens"] == 5 and s["ttft_s"] > 0 and s["gen_tok_s"] > 0


@pytest.mark.parametrize("mode", ["q8", "q4"])
def test_a_nan_weight_has_no_quantised_form_and_is_refused(mode):
    """A NaN or Inf weight cannot be quantised (the cast to an integer is
    undefined): the engine names the tensor and row instead of storing garbage."""
    m = smedjan.Model("tiny", vocab_size=512, seed=3, max_seq_len=64)
    m.params["layers.1.w_up"][5, 7] = np.nan
    with pytest.raises(ValueError, match=r"layers\.1\.w_up: row 5 holds NaN or Inf"):
        from_model(m, mode)
    m.params["layers.1.w_up"][5, 7] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        from_model(m, mode)
    from_model(m, "fp32")   # unquantised, the value is kept as it is
