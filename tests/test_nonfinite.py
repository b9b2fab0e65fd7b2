"""Training fails safely on non-finite numbers. A step whose gradient norm is
NaN or infinite makes no update (weights, AdamW state and step count stay as
they were) and is counted: in StepResult, Trainer.skipped_steps, each
metrics.jsonl row and the progress line. After max_skipped_steps such skips
in a row (default 3) the step raises FloatingPointError naming it, instead of
skipping forever. A batch whose targets are all ignored does not step and
returns loss 0 over 0 tokens. Loss spikes are logged and recorded.

Non-finite gradients are injected through the model's own gradient buffer
(model.flat_grads, a view of the engine's): a step adds the batch's
gradients into what the model holds, so a NaN or Inf written there right
before a step reaches its norm. SMEDJAN_NONFINITE_STEPS and
SMEDJAN_NONFINITE_INJECT scale the counting test up (5000 and 1000 by hand)."""
import json
import logging
import math
import os

import numpy as np
import pytest

import smedjan
from smedjan.data import Batches, TokenFile, write_tokens
from smedjan.loop import fit

CFG = smedjan.Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=256,
                     max_seq_len=32)
BAD = (np.nan, np.inf, -np.inf)


@pytest.fixture
def tokens(tmp_path, text_bytes):
    p = tmp_path / "data.tok"
    write_tokens(p, [np.frombuffer(text_bytes[:200_000], np.uint8)])
    return TokenFile(p)


def poison(model, rng):
    """One NaN, +Inf or -Inf at a random place of the model's gradients."""
    g = model.flat_grads
    g[rng.integers(g.size)] = BAD[rng.integers(len(BAD))]


class Poisoning:
    """A loader that injects a non-finite gradient before the chosen draws (1-based)."""

    def __init__(self, inner, model, at, seed=0):
        self.inner, self.model, self.at = inner, model, set(at)
        self.rng, self.draws, self.injected = np.random.default_rng(seed), 0, 0

    def __next__(self):
        self.draws += 1
        if self.draws in self.at:
            poison(self.model, self.rng)
            self.injected += 1
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()


def spread(n, among, seed=0):
    """n distinct draws in 1..among, never three in a row (a row of three
    would stop the run under the default policy)."""
    chosen = set()
    for d in np.random.default_rng(seed).permutation(np.arange(1, among + 1)):
        d = int(d)
        if len(chosen) == n:
            break
        if any({d - 2 + k, d - 1 + k, d + k} - {d} <= chosen for k in range(3)):
            continue
        chosen.add(d)
    assert len(chosen) == n
    return sorted(chosen)


def test_injected_nonfinite_gradients_are_skipped_counted_and_never_reach_a_weight(tokens,
                                                                                     tmp_path):
    steps = int(os.environ.get("SMEDJAN_NONFINITE_STEPS", 200))
    n_bad = int(os.environ.get("SMEDJAN_NONFINITE_INJECT", 40))
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=3e-3, warmup=10, steps=steps)
    at = spread(n_bad, steps)
    train = Poisoning(Batches(tokens, 2, 16, seed=0), m, at)
    rows = fit(tr, train, checkpoint_dir=str(tmp_path), checkpoint_every=50, progress=False)
    assert train.injected == n_bad and train.draws == steps + n_bad
    assert tr.step_count == steps and tr.skipped_steps == n_bad
    bad = int(np.count_nonzero(~np.isfinite(m.flat_params)))
    assert bad == 0 and m.nonfinite_params() == [], bad
    assert np.isfinite(tr.exp_avg).all() and np.isfinite(tr.exp_avg_sq).all()
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(logged) == len(rows) == steps + n_bad
    skipped = [i + 1 for i, r in enumerate(logged) if r["skipped"]]
    assert skipped == at, "each injected draw is one skipped row"
    assert [r["skipped_steps"] for r in logged] == list(np.cumsum([r["skipped"] for r in logged]))
    for i in skipped:   # a skipped row names the step it tried; the next row makes it
        assert logged[i - 1]["step"] == logged[i]["step"], (logged[i - 1], logged[i])
        assert not math.isfinite(logged[i - 1]["grad_norm"])
    assert [r["step"] for r in logged if not r["skipped"]] == list(range(1, steps + 1))
    from smedjan.loop import _postfix   # the progress line
    assert _postfix(logged[-1])["skipped"] == str(n_bad)
    print(f"{steps} steps, {n_bad} injected, {tr.skipped_steps} skipped, final loss "
          f"{rows[-1]['loss']:.4f}, {bad} non-finite parameters")


def test_a_nan_weight_stops_training_after_three_skips_naming_the_step(tokens):
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=1e-3, steps=10)
    b = Batches(tokens, 2, 16, seed=0)
    for _ in range(2):
        tr.step(*next(b))
    m.params["layers.1.wv"][3, 5] = np.nan        # a NaN reaches a weight
    for k in (1, 2):
        r = tr.step(*next(b))
        assert r.skipped and r.skipped_steps == k and math.isnan(r.loss), r
    with pytest.raises(FloatingPointError, match=r"step 3: 3 updates in a row skipped for a "
                                                 r"non-finite gradient norm.*layers\.1\.wv") as e:
        tr.step(*next(b))
    assert e.value.step == 3 and e.value.result.skipped_steps == 3
    assert tr.step_count == 2 and tr.skipped_steps == 3


def test_max_skipped_steps_is_settable(tokens):
    b = Batches(tokens, 2, 16, seed=0)
    for limit, raises_at in ((5, 5), (1, 1), (None, None)):
        m = smedjan.Model(CFG, seed=0)
        tr = smedjan.Trainer(m, max_skipped_steps=limit)
        m.params["final_norm"][0] = np.inf
        for k in range(1, 8):
            if k == raises_at:
                with pytest.raises(FloatingPointError, match=f"step 1: {k} updates in a row"):
                    tr.step(*next(b))
                break
            assert tr.step(*next(b)).skipped
        assert tr.skipped_steps == (raises_at or 7)
    with pytest.raises(ValueError, match="max_skipped_steps must be >= 1 or None"):
        smedjan.Trainer(smedjan.Model(CFG), max_skipped_steps=0)


def test_a_finite_step_resets_the_run_of_skips(tokens):
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=1e-3, steps=20)
    b, rng = Batches(tokens, 2, 16, seed=0), np.random.default_rng(0)
    for _ in range(4):                # 2 skips, an update, 2 skips, an update: never 3 in a row
        for _ in range(2):
            poison(m, rng)
            assert tr.step(*next(b)).skipped
        assert not tr.step(*next(b)).skipped
    assert tr.step_count == 4 and tr.skipped_steps == 8


def test_optimizer_step_follows_the_same_policy(tokens):
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=1e-3, steps=10)
    x, y = next(Batches(tokens, 2, 16, seed=0))
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        m.loss(x, y, backward=True)
        poison(m, rng)
        if k < 3:
            assert not math.isfinite(tr.optimizer_step()[0]) and tr.skipped_steps == k
    with pytest.raises(FloatingPointError, match="step 1: 3 updates in a row"):
        tr.optimizer_step()
    assert m.nonfinite_params() == []


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_batch_whose_targets_are_all_ignored_does_not_step(tokens, grad_accum):
    """Loss 0.0 over tokens=0, no update (not even AdamW's weight decay and
    momentum), step_count unchanged, counted as skipped but never toward
    max_skipped_steps: the run goes on as if the batch had not come."""
    b = Batches(tokens, 2 * grad_accum, 16, seed=0)
    batches = [next(b) for _ in range(4)]
    ref_m = smedjan.Model(CFG, seed=0)
    ref = smedjan.Trainer(ref_m, lr=1e-3, warmup=2, steps=10, grad_accum=grad_accum)
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=1e-3, warmup=2, steps=10, grad_accum=grad_accum)
    for x, y in batches[:2]:
        assert ref.step(x, y) == tr.step(x, y)
    params, moments = m.flat_params.copy(), np.array(tr.exp_avg_sq)
    x, _ = batches[2]
    for k in range(1, 5):
        r = tr.step(x, np.full_like(x, -1))
        assert (r.loss, r.grad_norm, r.tokens, r.skipped, r.skipped_steps) == (0.0, 0.0, 0, True, k)
    assert tr.step_count == 2
    np.testing.assert_array_equal(m.flat_params, params)
    np.testing.assert_array_equal(tr.exp_avg_sq, moments)
    for x, y in batches[2:]:           # on as if they had never come, bit for bit
        ra, rb = ref.step(x, y), tr.step(x, y)
        assert ra == rb and rb.tokens == x.size and not rb.skipped
    np.testing.assert_array_equal(m.flat_params, ref_m.flat_params)


def test_step_result_unpacks_as_before_and_counts_tokens(tokens):
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, steps=4)
    x, y = next(Batches(tokens, 2, 16, seed=0))
    y[0, :3] = -1
    r = tr.step(x, y)
    loss, grad_norm, lr = r
    assert (loss, grad_norm, lr) == tuple(r) and r.tokens == x.size - 3 and not r.skipped


class Spiking:
    """A loader that scales the final norm's gain (so every logit) up at
    one draw and back at the next: a loss spike, on a model that lr=0 keeps
    as it is otherwise."""

    def __init__(self, inner, model, at):
        self.inner, self.model, self.at, self.draws = inner, model, at, 0
        self.gain = model.params["final_norm"].copy()

    def __next__(self):
        self.draws += 1
        self.model.params["final_norm"][:] = self.gain * (40.0 if self.draws == self.at else 1.0)
        return next(self.inner)

    def state_dict(self):
        return self.inner.state_dict()


def test_a_loss_spike_is_logged_and_recorded(tokens, tmp_path, caplog):
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=0.0, min_lr=0.0, steps=40, spike_window=25)
    with caplog.at_level(logging.WARNING, logger="smedjan"):
        rows = fit(tr, Spiking(Batches(tokens, 2, 16, seed=0), m, at=30), progress=False,
                   metrics_file=str(tmp_path / "m.jsonl"))
    logged = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [r["step"] for r in logged if r["spike"]] == [30], [r["loss_z"] for r in logged]
    assert logged[29]["loss_z"] > 6 and rows[29]["spike"]
    assert all(r["loss_z"] is None for r in logged[:20]) and abs(logged[25]["loss_z"]) < 6
    spikes = [rec for rec in caplog.records if "loss spike" in rec.getMessage()]
    assert len(spikes) == 1 and spikes[0].name == "smedjan" and "step 30" in spikes[0].getMessage()
    # threshold None: no spike, same losses
    m2 = smedjan.Model(CFG, seed=0)
    tr2 = smedjan.Trainer(m2, lr=0.0, min_lr=0.0, steps=40, spike_window=25,
                          spike_threshold=None)
    rows2 = fit(tr2, Spiking(Batches(tokens, 2, 16, seed=0), m2, at=30), progress=False)
    assert not any(r["spike"] for r in rows2) and [r["loss"] for r in rows2] == [r["loss"] for r in rows]


def test_fit_writes_the_row_of_the_step_that_gives_up(tokens, tmp_path):
    m = smedjan.Model(CFG, seed=0)
    tr = smedjan.Trainer(m, lr=1e-3, steps=20)
    train = Poisoning(Batches(tokens, 2, 16, seed=0), m, at=[5, 6, 7])
    with pytest.raises(FloatingPointError, match="step 5: 3 updates in a row"):
        fit(tr, train, metrics_file=str(tmp_path / "m.jsonl"), progress=False)
    logged = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in logged[-3:]] == \
        [(5, True, 1), (5, True, 2), (5, True, 3)]
    assert "step 5: 3 updates in a row" in logged[-1]["error"]


def test_train_cli_takes_the_policy_flags(tmp_path, capsys):
    from smedjan.cli import build_parser, main
    from smedjan.commands import guard_options
    data = str(tmp_path / "d.tok")
    write_tokens(data, [np.random.default_rng(0).integers(0, 256, 10_000)], dtype="uint16")
    base = ["train", "--data", data, "--vocab-size", "256", "--size", "custom", "--dim", "32",
            "--layers", "2", "--heads", "4", "--seq-len", "16", "--batch-size", "2",
            "--steps", "2", "--warmup", "1", "--val-fraction", "0"]
    args = build_parser().parse_args(base)
    assert guard_options(args) == dict(max_skipped_steps=3, spike_window=100, spike_threshold=6.0)
    args = build_parser().parse_args(base + ["--max-skipped-steps", "0", "--spike-threshold", "0",
                                             "--spike-window", "50"])
    assert guard_options(args) == dict(max_skipped_steps=None, spike_window=50,
                                       spike_threshold=None)
    assert main(base + ["--max-skipped-steps", "7", "--spike-window", "10"]) == 0
    assert "step 2: loss" in capsys.readouterr().out
