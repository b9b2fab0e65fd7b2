"""RoPE scaling (linear, dynamic NTK, YaRN) as transformers 5.x computes it:
the inverse frequencies and the cos/sin scale (attention_scaling) that
every smedjan kernel applies, from _C.rope_freqs(config, seq_len), against
transformers' own functions on a LlamaConfig, at head dims 64, 128 and 96.

smedjan follows transformers' float32 arithmetic step for step; the one
step that differs is base ** e, which smedjan rounds correctly (libm in
double) and torch's CPU kernel (SLEEF) gets within 1 ulp. With torch's pow
made correctly rounded the two agree bit for bit; as torch ships, within
2 ulp (about 1 entry in 100 is 1 ulp off before the reciprocal)."""
import contextlib
import math
import warnings

import numpy as np
import pytest

import smedjan
from smedjan import Config, _C

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

HEAD_DIMS = [64, 128, 96]

# (name, smedjan rope_scaling, transformers rope_parameters, original context, seq_len)
CASES = [("default", None, {"rope_type": "default"}, None, 100)]
CASES += [(f"linear{f}", {"type": "linear", "factor": f},
           {"rope_type": "linear", "factor": f}, None, 100) for f in (2.0, 4.0)]
CASES += [(f"dynamic2-seq{n}", {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 2048},
           {"rope_type": "dynamic", "factor": 2.0}, 2048, n) for n in (1000, 2048, 2049, 4096, 10000)]
YARN_OPTIONS = {   # smedjan's spelling, transformers' spelling
    "defaults": ({}, {}),
    "beta_fast16": ({"beta_fast": 16.0}, {"beta_fast": 16.0}),
    "attention_factor": ({"attention_factor": 0.8}, {"attention_factor": 0.8}),
    "untruncated": ({"truncate": False}, {"truncate": False}),
    "untruncated-beta_fast16": ({"truncate": False, "beta_fast": 16.0},
                                {"truncate": False, "beta_fast": 16.0}),
}
CASES += [(f"yarn{f:g}-{opt}", {"type": "yarn", "factor": f, "original_max_seq_len": 2048, **ours},
           {"rope_type": "yarn", "factor": f, "original_max_position_embeddings": 2048, **theirs},
           2048, 100)
          for f in (2.0, 4.0, 8.0) for opt, (ours, theirs) in YARN_OPTIONS.items()]
THETAS = [10000.0, 500000.0]


def smedjan_rope(hd, theta, scaling, seq_len):
    cfg = Config(dim=4 * hd, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=256, vocab_size=64,
                 max_seq_len=16384, rope_theta=theta, rope_scaling=scaling)
    inv, mscale = _C.rope_freqs(cfg.to_dict(), seq_len)
    return np.array(inv, np.float32), np.float32(mscale)


def hf_config(hd, theta, params, original):
    # transformers' dynamic scaling grows past max_position_embeddings; YaRN's
    # factor is also the ratio of max_position_embeddings to the original
    rp = {"rope_theta": theta, **params}
    max_pos = (original if params["rope_type"] == "dynamic"
               else int(params["factor"] * original) if original else 4096)
    return LlamaConfig(hidden_size=4 * hd, num_attention_heads=4, max_position_embeddings=max_pos,
                       rope_parameters=rp)


def transformers_rope(hd, theta, params, original, seq_len):
    """inv_freq and attention_scaling as LlamaRotaryEmbedding gets them for a
    run of seq_len positions: dynamic_rope_update calls the init function with
    seq_len = max(position_ids) + 1, a tensor, once seq_len passes the original
    context; below it, the frequencies from init (those of the original)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = hf_config(hd, theta, params, original)
        kind = params["rope_type"]
        if kind == "default":
            inv, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
        elif kind == "dynamic" and seq_len > original:
            inv, scale = ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=torch.tensor(seq_len))
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[kind](cfg, None)
    return inv.numpy(), np.float32(scale)


@contextlib.contextmanager
def correctly_rounded_pow():
    """torch's float32 pow through float64, rounded once: what smedjan's
    base ** e is (torch's own CPU pow is SLEEF's, within 1 ulp)."""
    pow_, rpow = torch.Tensor.__pow__, torch.Tensor.__rpow__

    def exact(base, e):
        return (base.double() ** e.double()).float()

    def tensor_pow(a, b):
        f32 = torch.float32
        if isinstance(b, torch.Tensor) and a.dtype == f32 and b.dtype == f32:
            return exact(a, b)
        return pow_(a, b)

    def scalar_pow(b, a):   # a ** b with a a Python number: torch rounds a to float32 first
        if isinstance(a, (int, float)) and b.dtype == torch.float32:
            return exact(torch.tensor(a, dtype=torch.float32), b)
        return rpow(b, a)

    torch.Tensor.__pow__, torch.Tensor.__rpow__ = tensor_pow, scalar_pow
    try:
        yield
    finally:
        torch.Tensor.__pow__, torch.Tensor.__rpow__ = pow_, rpow


def ids(case):
    return case[0]


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("hd", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_frequencies_are_transformers_float32_arithmetic_bit_for_bit(case, hd, theta):
    _, ours_cfg, params, original, seq_len = case
    inv, mscale = smedjan_rope(hd, theta, ours_cfg, seq_len)
    with correctly_rounded_pow():
        want, want_scale = transformers_rope(hd, theta, params, original, seq_len)
    np.testing.assert_array_equal(inv, want)
    assert mscale == want_scale, (mscale, want_scale)


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize("hd", HEAD_DIMS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_frequencies_match_transformers_as_it_ships(case, hd, theta):
    _, ours_cfg, params, original, seq_len = case
    inv, mscale = smedjan_rope(hd, theta, ours_cfg, seq_len)
    want, want_scale = transformers_rope(hd, theta, params, original, seq_len)
    rel = np.abs(np.float64(inv) - want) / want
    assert rel.max() < 2.5e-7, f"worst relative difference {rel.max():.3e} at pair {rel.argmax()}"
    assert np.mean(inv == want) > 0.9, f"only {np.mean(inv == want):.0%} of the pairs are equal"
    assert mscale == want_scale, (mscale, want_scale)


def test_yarn_attention_scaling_is_the_paper_temperature_unless_given():
    for f in (2.0, 4.0, 8.0):
        _, mscale = smedjan_rope(64, 10000.0, {"type": "yarn", "factor": f,
                                               "original_max_seq_len": 2048}, 100)
        assert mscale == np.float32(0.1 * math.log(f) + 1.0)
        _, given = smedjan_rope(64, 10000.0, {"type": "yarn", "factor": f, "original_max_seq_len": 2048,
                                              "attention_factor": 0.8}, 100)
        assert given == np.float32(0.8)


def test_dynamic_grows_only_past_the_original_context_as_the_rotary_embedding_does():
    """LlamaRotaryEmbedding's dynamic update, run: the frequencies it holds
    after a run of n positions are smedjan's for seq_len n."""
    hd, params = 64, {"rope_type": "dynamic", "factor": 2.0}
    default, _ = smedjan_rope(hd, 10000.0, None, 100)
    for n in (1000, 2048, 2049, 4096):
        rotary = LlamaRotaryEmbedding(hf_config(hd, 10000.0, params, 2048))
        rotary(torch.zeros(1), torch.arange(n)[None])
        inv, mscale = smedjan_rope(hd, 10000.0, {"type": "dynamic", "factor": 2.0,
                                                 "original_max_seq_len": 2048}, n)
        rel = np.abs(np.float64(inv) - rotary.inv_freq.numpy()) / rotary.inv_freq.numpy()
        assert rel.max() < 2.5e-7, (n, rel.max())
        assert mscale == 1.0
        assert (inv == default).all() == (n <= 2048), n


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 4.0},
    {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 512},
    {"type": "yarn", "factor": 4.0, "original_max_seq_len": 512},
    {"type": "yarn", "factor": 8.0, "original_max_seq_len": 256, "attention_factor": 1.3,
     "beta_fast": 16.0, "truncate": False},
], ids=["linear", "dynamic", "yarn", "yarn-options"])
def test_model_logits_match_transformers_rope_over_thousands_of_positions(scaling):
    """A model's logits at 2048 positions against the PyTorch reference whose
    cos and sin come from transformers' LlamaRotaryEmbedding."""
    from conftest import rel_err
    from torch_ref import TorchLlama
    T = 2048
    cfg = Config.custom(128, 1, 2, 1, vocab_size=64, max_seq_len=T, rope_scaling=scaling)
    model = smedjan.Model(cfg, seed=0)
    ref = TorchLlama(cfg)
    ref.load_from(model)
    tokens = np.random.default_rng(0).integers(0, 64, (1, T)).astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ref.forward(torch.from_numpy(tokens).long()).detach().numpy()
    assert rel_err(model.forward(tokens), theirs) < 1e-5, rel_err(model.forward(tokens), theirs)


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 2.0},
    {"type": "dynamic", "factor": 2.0, "original_max_seq_len": 16},
    {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "attention_factor": 1.3},
], ids=["linear", "dynamic", "yarn"])
def test_generation_engine_turns_as_a_run_of_its_whole_context(scaling):
    """The CPU generation engine's cos/sin tables are RoPE at its whole
    context (one set of frequencies for every cached key): its logits equal
    the training forward's over a run of that length."""
    from smedjan.infer import from_model
    T = 64
    model = smedjan.Model(Config.custom(128, 1, 2, 1, vocab_size=64, max_seq_len=T,
                                        rope_scaling=scaling), seed=0)
    tokens = np.random.default_rng(1).integers(0, 64, T).astype(np.int32)
    want = model.forward(tokens[None])[0]
    got = from_model(model, "fp32", max_ctx=T).forward(tokens)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-5, err
