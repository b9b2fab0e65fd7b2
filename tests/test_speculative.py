"""Speculative decoding (generate(..., draft=...) / draft_lookup=N) changes
how fast tokens come, never which: greedy output equals plain greedy token
for token (the target itself as draft, an unrelated draft, prompt lookup,
with a repetition penalty, a sliding context, stops and max_new_tokens);
sampled output has plain sampling's distribution (chi-square against the
exact distribution of the first three tokens, computed from the target's
logits). The cache verb under it, rewind, forgets exactly the rewound
tokens, and is refused for models whose cache cannot move back."""
import numpy as np
import pytest

import smedjan
from smedjan import _C
from smedjan.config import Config
from smedjan.generate import generate
from smedjan.infer import from_model, lookup_proposals


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a call's thread hand-offs would cost more than its work."""
    before = smedjan.threads()
    smedjan.threads(1)
    yield
    smedjan.threads(before)


def varied_model(seed, vocab_size=32, **options):
    """A small model whose greedy output varies (a fresh init only repeats
    its last token): weights drawn N(0, 0.3)."""
    m = smedjan.Model(Config.custom(64, 2, 4, 2, vocab_size=vocab_size, max_seq_len=64, **options),
                      seed=seed)
    m.flat_params[:] = np.random.default_rng(seed).normal(0, 0.3, m.flat_params.size)
    return m


@pytest.fixture(scope="module")
def target():
    return from_model(varied_model(1))


@pytest.fixture(scope="module")
def same_draft():
    """The target's weights in a second engine (a draft keeps its own cache)."""
    return from_model(varied_model(1))


@pytest.fixture(scope="module")
def other_draft():
    return from_model(varied_model(2))


PROMPTS = [[1, 2, 3], [7], [30, 4, 4, 9, 12, 0, 5], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]


def greedy(m, prompt, n=40, **kw):
    return list(m.generate(prompt, n, temperature=0, **kw))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_the_target_as_its_own_draft_is_plain_greedy_and_accepts_everything(
        target, same_draft, prompt):
    plain = greedy(target, prompt)
    assert greedy(target, prompt, draft=same_draft, draft_k=4) == plain
    s = target.stats()
    assert s["acceptance_rate"] == 1.0
    assert s["accepted_tokens"] == s["draft_tokens"] > 0
    assert s["mean_accepted_length"] == s["accepted_tokens"] / s["verify_steps"]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_with_an_unrelated_draft_is_plain_greedy(target, other_draft, prompt, k):
    spec = greedy(target, prompt, draft=other_draft, draft_k=k)
    s = target.stats()
    assert spec == greedy(target, prompt)
    assert s["draft_tokens"] > 0 and 0 <= s["acceptance_rate"] < 1


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_greedy_with_prompt_lookup_is_plain_greedy(target, prompt, n):
    assert greedy(target, prompt, draft_lookup=n) == greedy(target, prompt)


@pytest.mark.parametrize("options", [dict(mixer="mla"), dict(ffn="moe", moe={"n_experts": 4, "top_k": 2,
                                                                             "expert_dim": 32}),
                                     dict(mixer=["mla", "attention"], ffn=["moe", "swiglu"],
                                          moe={"n_experts": 4, "top_k": 1, "expert_dim": 32})],
                         ids=["mla", "moe", "mla-moe-hybrid"])
def test_latent_caches_and_experts_rewind_like_kv_caches(options):
    """mla caches a latent per position and MoE keeps nothing: both roll back."""
    m = from_model(varied_model(3, **options))
    for prompt in PROMPTS[:2]:
        assert greedy(m, prompt, draft_lookup=2) == greedy(m, prompt)


def test_prompt_lookup_proposes_what_followed_the_last_occurrence_of_the_longest_suffix():
    assert lookup_proposals([1, 2, 3, 9, 1, 2, 3], 3, 2) == [9, 1]
    assert lookup_proposals([5, 1, 2, 7, 7, 2, 8, 1, 2], 2, 3) == [7, 7, 2]   # [1, 2] before [2]
    assert lookup_proposals([5, 1, 2, 7, 7, 2, 8, 1, 2], 1, 3) == [8, 1, 2]
    assert lookup_proposals([1, 5, 1, 6, 1], 4, 9) == [6, 1]                   # the last occurrence
    assert lookup_proposals([1, 2, 3], 3, 4) == []
    assert lookup_proposals([4], 2, 4) == []


def test_greedy_with_a_repetition_penalty_is_plain_greedy(target, other_draft):
    for prompt in PROMPTS:
        plain = greedy(target, prompt, repetition_penalty=1.3)
        assert greedy(target, prompt, repetition_penalty=1.3, draft=other_draft) == plain
        assert greedy(target, prompt, repetition_penalty=1.3, draft_lookup=2) == plain


def test_a_context_that_slides_past_max_seq_len_gives_plain_greedy():
    m, d = varied_model(1), varied_model(2)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 32, 50)]
    plain = list(generate(m, prompt, 40, temperature=0))
    assert list(generate(m, prompt, 40, temperature=0, draft=d, draft_k=5)) == plain
    assert list(generate(m, prompt, 40, temperature=0, draft_lookup=3)) == plain
    assert m._last_infer.stats()["draft_tokens"] > 0


@pytest.mark.parametrize("n", [0, 1, 2, 5, 13])
def test_max_new_tokens_is_exact(target, same_draft, other_draft, n):
    for prompt in PROMPTS[:2]:
        plain = greedy(target, prompt, n)
        assert len(plain) == n
        assert greedy(target, prompt, n, draft=same_draft) == plain
        assert greedy(target, prompt, n, draft=other_draft) == plain
        assert greedy(target, prompt, n, draft_lookup=2) == plain


def test_a_stop_token_ends_generation_where_plain_greedy_ends(target, same_draft, other_draft):
    for prompt in PROMPTS:
        full = greedy(target, prompt)
        stop = full[len(full) // 2]
        plain = greedy(target, prompt, stop=stop)
        assert plain == full[:full.index(stop)]
        for kw in (dict(draft=same_draft), dict(draft=other_draft), dict(draft_lookup=3)):
            assert greedy(target, prompt, stop=stop, **kw) == plain


def test_a_draft_can_be_a_model_or_a_checkpoint(tmp_path, target):
    from smedjan.checkpoint import save_checkpoint
    d = varied_model(2)
    path = tmp_path / "draft.safetensors"
    save_checkpoint(path, d, step=0)
    plain = greedy(target, PROMPTS[0])
    assert greedy(target, PROMPTS[0], draft=d) == plain
    assert greedy(target, PROMPTS[0], draft=str(path)) == plain
    assert target.stats()["draft_tokens"] > 0


# ---- sampling ------------------------------------------------------------------------

def sampler_reference(logits, temperature, top_k, top_p, penalty, history):
    """The sampler's distribution, written from its definition (float64)."""
    z = logits.astype(np.float64).copy()
    for t in set(history):
        z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    z = z / temperature
    order = np.lexsort((np.arange(z.size), -z))          # descending, ties by id
    p = np.exp(z - z.max())
    keep = order[:top_k] if top_k else order
    p_keep = p[keep] / p[keep].sum()
    if top_p < 1:
        last = int(np.searchsorted(np.cumsum(p_keep), top_p))
        keep, p_keep = keep[:last + 1], p_keep[:last + 1]
    out = np.zeros(z.size)
    out[keep] = p_keep / p_keep.sum()
    return out


@pytest.mark.parametrize("params", [(1.0, 0, 1.0, 1.0), (0.8, 5, 0.9, 1.3), (1.2, 0, 0.7, 1.0)])
def test_sampler_probs_are_the_distribution_it_draws_from(params):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 16).astype(np.float32)
    hist = np.array([3, 3, 7, 0], np.int32)
    s = _C.Sampler(16, 5)
    probs = np.empty(16, np.float32)
    s.probs(logits, probs, *params, hist)
    np.testing.assert_allclose(probs, sampler_reference(logits, *params, hist), atol=1e-6)
    s.probs(logits, probs, 0.0, 0, 1.0, 1.0, None)
    assert probs[np.argmax(logits)] == 1 and probs.sum() == 1
    assert 0 <= s.uniform() < 1


def chi_square_bound(df, z=3.89):
    """The chi-square quantile at upper tail probability ~5e-5 (z: its normal
    quantile), by Wilson-Hilferty: a false alarm once in 20000 runs."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def exact_first_tokens(m, prompt, n, params):
    """The probability of every sequence of n first tokens under plain sampling."""
    dist = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in dist.items():
            ctx = prompt + list(seq)
            p = sampler_reference(m.forward(ctx)[-1], *params, ctx if params[3] != 1 else [])
            for t in np.flatnonzero(p):
                nxt[seq + (int(t),)] = pr * p[t]
        dist = nxt
    return dist


@pytest.mark.parametrize("params", [(1.0, 0, 1.0, 1.0), (0.9, 5, 0.95, 1.3)],
                         ids=["plain", "top-k-top-p-penalty"])
def test_sampled_first_tokens_have_plain_samplings_distribution(params):
    V, n_tok, runs = 6, 3, 6000
    m = from_model(varied_model(1, V))
    drafts = {"draft": dict(draft=from_model(varied_model(2, V)), draft_k=2),
              "self": dict(draft=from_model(varied_model(1, V)), draft_k=3),
              "lookup": dict(draft_lookup=2)}
    prompt = [1, 2, 1, 2, 1]            # lookup proposes 2 then 1 ...
    exact = exact_first_tokens(m, prompt, n_tok, params)
    temp, top_k, top_p, pen = params
    for name, kw in [("plain", {})] + list(drafts.items()):
        counts, proposed, accepted = {}, 0, 0
        for seed in range(runs):
            seq = tuple(m.generate(prompt, n_tok, temperature=temp, top_k=top_k, top_p=top_p,
                                   repetition_penalty=pen, seed=seed, **kw))
            counts[seq] = counts.get(seq, 0) + 1
            proposed += m.stats().get("draft_tokens", 0)
            accepted += m.stats().get("accepted_tokens", 0)
        assert set(counts) <= set(exact), name
        # chi-square over sequences expected at least 5 times; the rest pooled into one bin
        big = [s for s in exact if exact[s] * runs >= 5]
        expected = [exact[s] * runs for s in big] + [runs * (1 - sum(exact[s] for s in big))]
        observed = [counts.get(s, 0) for s in big] + [runs - sum(counts.get(s, 0) for s in big)]
        if expected[-1] < 5:
            expected[-2] += expected.pop()
            observed[-2] += observed.pop()
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        assert chi2 < chi_square_bound(len(expected) - 1), (name, chi2, len(expected))
        if name == "self":              # p == q: every proposal is accepted
            assert 0 < accepted == proposed
        elif name != "plain":           # proposals were made, and both verdicts reached
            assert 0 < accepted < proposed, name


# ---- the cache verb and the refusals ----------------------------------------------------

def test_rewind_forgets_exactly_the_later_tokens(target):
    a, b = [3, 1, 4, 1, 5], [9, 2, 6]
    target.reset()
    target.prefill(a)
    target.prefill([7, 7, 7, 7])
    target.rewind(len(a))
    assert target.pos == len(a)
    np.testing.assert_array_equal(target.prefill(b, all_logits=True), target.forward(a + b)[len(a):])
    with pytest.raises(ValueError, match="outside 0..8"):
        target.rewind(9)


def test_a_draft_with_another_vocabulary_is_refused(target):
    with pytest.raises(ValueError, match="vocab_size 48 differs from the target's 32"):
        target.generate([1, 2], 4, draft=from_model(varied_model(2, 48)))


@pytest.mark.parametrize("options, named", [
    (dict(mixer="linear", linear={"feature": "elu1", "normalize": True, "decay": "gated"}), "mixer linear"),
    (dict(mixer="mamba2", ffn="none", ssm={"d_state": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 8}), "mixer mamba2"),
    (dict(window=[8, 0]), "sliding window"),
])
def test_caches_that_cannot_move_back_are_refused_by_name(target, options, named):
    other = from_model(varied_model(3, **options))
    with pytest.raises(ValueError, match=f"target whose cache moves back: rewind: layer 0's {named}"):
        other.generate([1, 2], 4, draft_lookup=2)
    with pytest.raises(ValueError, match=f"draft whose cache moves back: rewind: layer 0's {named}"):
        target.generate([1, 2], 4, draft=other)
    with pytest.raises(ValueError, match=named):
        other.rewind(0)


def test_bad_speculation_arguments_are_refused_by_name(target, other_draft):
    with pytest.raises(ValueError, match="draft_k must be an integer >= 1"):
        target.generate([1], 4, draft=other_draft, draft_k=0)
    with pytest.raises(ValueError, match="draft_lookup must be an integer >= 0"):
        target.generate([1], 4, draft_lookup=-1)
    with pytest.raises(ValueError, match="not both"):
        target.generate([1], 4, draft=other_draft, draft_lookup=2)
    with pytest.raises(TypeError, match="draft must be"):
        target.generate([1], 4, draft=3.5)
    with pytest.raises(ValueError, match="needs its own KV cache"):
        target.generate([1], 4, draft=target)


def test_the_cli_prints_plain_greedy_output_and_the_acceptance(tmp_path, capsys):
    from smedjan.checkpoint import save_checkpoint
    from smedjan.cli import main
    save_checkpoint(tmp_path / "target.safetensors", varied_model(1), step=0)
    save_checkpoint(tmp_path / "draft.safetensors", varied_model(2), step=0)
    run = ["generate", "--checkpoint", str(tmp_path / "target.safetensors"), "--prompt", "1 2 3",
           "--temperature", "0", "--max-new-tokens", "20"]
    assert main(run) == 0
    plain = capsys.readouterr().out
    assert len(plain.split()) == 20
    for extra in (["--draft", str(tmp_path / "draft.safetensors"), "--draft-k", "3"],
                  ["--draft-lookup", "2"]):
        assert main(run + extra) == 0
        out = capsys.readouterr()
        assert out.out == plain
        assert "proposed tokens accepted" in out.err
