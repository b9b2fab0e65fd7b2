"""Speculative decoding on the GPU engine: the handle's rewind and the
verify prefill (every position's logits) are the CPU engine's verbs, so
greedy output with a draft model or prompt lookup equals the GPU's plain
greedy output token for token in fp32 (in bf16 the batched verify and the
one-token step round differently, so a near tie may resolve either way:
not tested), and sampling
runs with both verdicts reached. Skipped with "no CUDA GPU" where the machine has none."""
import numpy as np
import pytest

import smedjan
from smedjan.config import Config
from smedjan.infer import from_model

import cuda_ref as ref

HAVE_GPU = ref.gpu_present()


def gpu_test(f):
    """Marked gpu; skipped with "no CUDA GPU" only where the machine has none."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAVE_GPU, reason="no CUDA GPU")(f))


def varied_model(seed, vocab_size=64):
    """Greedy output that varies (a fresh init only repeats its last token)."""
    m = smedjan.Model(Config.custom(64, 2, 4, 2, vocab_size=vocab_size, max_seq_len=128), seed=seed)
    m.flat_params[:] = np.random.default_rng(seed).normal(0, 0.3, m.flat_params.size)
    return m


PROMPTS = [[1, 2, 3], [7], [30, 4, 4, 9, 12, 0, 5], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


@gpu_test
def test_gpu_speculative_greedy_equals_plain_greedy():
    target = from_model(varied_model(1), "fp32", device="cuda")
    drafts = {"same": from_model(varied_model(1), "fp32", device="cuda"),
              "other": from_model(varied_model(2), "fp32", device="cuda")}
    for prompt in PROMPTS:
        plain = list(target.generate(prompt, 48, temperature=0))
        for name, d in drafts.items():
            got = list(target.generate(prompt, 48, temperature=0, draft=d, draft_k=4))
            s = target.stats()
            assert got == plain, (name, prompt)
            assert s["draft_tokens"] > 0
            if name == "same":
                assert s["acceptance_rate"] > 0.9
        assert list(target.generate(prompt, 48, temperature=0, draft_lookup=3)) == plain


@gpu_test
def test_gpu_rewind_forgets_exactly_the_later_tokens():
    target = from_model(varied_model(1), "fp32", device="cuda")
    a, b = [3, 1, 4, 1, 5], [9, 2, 6]
    target.reset()
    target.prefill(a)
    target.prefill([7, 7, 7, 7])
    target.rewind(len(a))
    assert target.pos == len(a)
    np.testing.assert_allclose(target.prefill(b, all_logits=True), target.forward(a + b)[len(a):],
                               atol=1e-4, rtol=1e-4)


@gpu_test
def test_gpu_speculative_sampling_reaches_both_verdicts():
    target = from_model(varied_model(1, 8), "fp32", device="cuda")
    draft = from_model(varied_model(2, 8), "fp32", device="cuda")
    proposed = accepted = 0
    for seed in range(50):
        out = list(target.generate([1, 2, 3], 8, temperature=1.0, seed=seed, draft=draft, draft_k=3))
        assert len(out) == 8
        proposed += target.stats()["draft_tokens"]
        accepted += target.stats()["accepted_tokens"]
    assert 0 < accepted < proposed
