"""Checkpoints: what is saved comes back bit for bit, a resumed run is
bit-identical to one that never stopped, and every broken file is refused
with a message naming the file (and tensor)."""
import json
import os
import struct

import numpy as np
import pytest

import safetensors.numpy as stn
import smedjan
from smedjan.checkpoint import (load_checkpoint, model_from_checkpoint, restore, save_checkpoint,
                                save_weights)
from smedjan.data import Batches, TokenFile, write_tokens
from smedjan.io import load_safetensors, save_safetensors

CFG = smedjan.Config(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=256,
                     max_seq_len=32)
TRAIN = dict(lr=3e-3, min_lr=3e-4, warmup=2, steps=20, weight_decay=0.1, clip=1.0,
             betas=(0.9, 0.95), eps=1e-8)


@pytest.fixture
def tokens(tmp_path, text_bytes):
    p = tmp_path / "data.tok"
    write_tokens(p, [np.frombuffer(text_bytes[:200_000], np.uint8)])
    return TokenFile(p)


def trained(tokens, n_steps, seed=0):
    m = smedjan.Model(CFG, seed=seed)
    tr = smedjan.Trainer(m, **TRAIN)
    b = Batches(tokens, 2, 16, seed=7)
    for _ in range(n_steps):
        tr.step(*next(b))
    return m, tr, b


def test_checkpoint_round_trip_restores_weights_moments_and_step(tmp_path, tokens):
    m, tr, b = trained(tokens, 3)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, tr, step=tr.step_count, rng_state={"numpy": 123}, extra={"run": "x"},
                    loader_state=b.state_dict())
    ck = load_checkpoint(p)
    assert ck.step == 3 and ck.config == CFG and ck.extra == {"run": "x"} and ck.rng == {"numpy": 123}
    # the optimizer, its parameter groups and state dtype travel with the schedule
    assert ck.trainer == {**TRAIN, "optimizer": "adamw", "param_groups": [],
                          "decay_embedding": True, "optim_state_dtype": "fp32",
                          "optim_state_seed": 0}
    assert ck.metadata["format"] == "smedjan-checkpoint" and ck.metadata["format_version"] == "1"
    assert json.loads(ck.metadata["config"]) == CFG.to_dict()
    m2 = smedjan.Model(CFG, seed=99)
    tr2 = smedjan.Trainer(m2, **ck.trainer)
    restore(ck, m2, tr2)
    np.testing.assert_array_equal(m2.flat_params, m.flat_params)
    np.testing.assert_array_equal(tr2.exp_avg, tr.exp_avg)
    np.testing.assert_array_equal(tr2.exp_avg_sq, tr.exp_avg_sq)
    assert tr2.step_count == 3


def test_resume_is_bit_identical(tmp_path, tokens):
    ref, ref_tr, _ = trained(tokens, 6)

    m, tr, b = trained(tokens, 3)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, tr, step=tr.step_count, loader_state=b.state_dict())
    del m, tr, b

    ck = load_checkpoint(p)
    m = smedjan.Model(ck.config, seed=1)
    tr = smedjan.Trainer(m, **ck.trainer)
    restore(ck, m, tr)
    b = Batches(tokens, 2, 16, seed=0)    # a different seed: the state must override it
    b.load_state_dict(ck.loader)
    for _ in range(3):
        tr.step(*next(b))
    assert tr.step_count == ref_tr.step_count == 6
    diff = np.flatnonzero(m.flat_params != ref.flat_params)
    assert diff.size == 0, f"{diff.size} params differ, first {m.flat_params[diff[:3]]} vs {ref.flat_params[diff[:3]]}"
    np.testing.assert_array_equal(tr.exp_avg_sq, ref_tr.exp_avg_sq)


def test_weights_only_file_builds_a_model(tmp_path):
    m = smedjan.Model(CFG, seed=3)
    p = tmp_path / "w.safetensors"
    save_weights(p, m)
    ck = load_checkpoint(p)
    assert ck.metadata["format"] == "smedjan-weights" and not ck.has_optimizer and ck.step is None
    m2 = model_from_checkpoint(p)
    np.testing.assert_array_equal(m2.flat_params, m.flat_params)
    x = np.arange(10, dtype=np.int32)[None]
    np.testing.assert_array_equal(m2.forward(x), m.forward(x))
    with pytest.raises(ValueError, match="weights-only"):
        restore(ck, m2, smedjan.Trainer(m2))


def test_any_safetensors_reader_opens_a_checkpoint(tmp_path):
    m = smedjan.Model(CFG, seed=3)
    tr = smedjan.Trainer(m)
    p = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(p, m, tr, step=0)
    ref = stn.load_file(p)
    assert set(ref) == set(m.params) | {"optim.exp_avg", "optim.exp_avg_sq"}
    np.testing.assert_array_equal(ref["layers.1.wq"], m.params["layers.1.wq"])


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_checkpoint(tmp_path / "gone.safetensors")


def test_truncated_checkpoint_is_refused(tmp_path):
    m = smedjan.Model(CFG)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, step=0)
    b = p.read_bytes()
    p.write_bytes(b[:len(b) // 2])
    with pytest.raises(ValueError, match=r"ckpt.safetensors: tensor '.*'.*outside.*truncated"):
        load_checkpoint(p)


def test_bit_flip_names_the_tensor(tmp_path):
    m = smedjan.Model(CFG)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, step=0)
    raw = p.read_bytes()
    n = 8 + struct.unpack("<Q", raw[:8])[0]
    begin = json.loads(raw[8:n])["layers.1.wk"]["data_offsets"][0]
    b = bytearray(raw)
    b[n + begin + 17] ^= 0x01
    p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match=r"ckpt.safetensors: tensor 'layers.1.wk' CRC mismatch"):
        load_checkpoint(p)


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "other.safetensors"
    save_safetensors(p, {"x": np.ones(2, np.float32)}, {"format": "pt"})
    with pytest.raises(ValueError, match="other.safetensors: not a smedjan checkpoint"):
        load_checkpoint(p)
    save_safetensors(p, {"x": np.ones(2, np.float32)},
                     {"format": "smedjan-checkpoint", "format_version": "9"})
    with pytest.raises(ValueError, match="format_version '9'"):
        load_checkpoint(p)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    m = smedjan.Model(CFG)
    t = {k: np.array(v) for k, v in m.params.items()}
    t["layers.0.wo"] = t["layers.0.wo"][:, :16]
    p = tmp_path / "bad.safetensors"
    save_safetensors(p, t, {"format": "smedjan-weights", "format_version": "1",
                            "config": json.dumps(CFG.to_dict())})
    with pytest.raises(ValueError, match=r"bad.safetensors: tensor 'layers.0.wo' has shape \(32, 16\)"):
        model_from_checkpoint(p)
    before = m.flat_params.copy()
    with pytest.raises(ValueError, match="layers.0.wo"):
        restore(load_checkpoint(p), m)
    np.testing.assert_array_equal(m.flat_params, before)     # nothing copied
    other = smedjan.Model(smedjan.Config(**{**CFG.to_dict(), "n_layers": 1}))
    with pytest.raises(ValueError, match="does not match the model"):
        restore(load_checkpoint(p), other)


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    m = smedjan.Model(CFG)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, step=1)
    before = p.read_bytes()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_checkpoint(p, m, step=2, extra={"f": object()})
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert load_checkpoint(p).step == 1


def test_resume_keeps_the_skip_counts_and_the_spike_window(tmp_path, tokens):
    """Skipped steps and the loss-spike window are training state: a run
    resumed from a checkpoint counts, flags and updates as one that never
    stopped (the Trainer's policy options come from its caller, as levers do)."""
    policy = dict(spike_window=4, max_skipped_steps=3)

    def attempts(m, tr, b, poison_at, n):
        out = []
        for i in range(n):
            if i in poison_at:
                m.flat_grads[7] = np.nan            # this step's gradient norm is NaN
            r = tr.step(*next(b))   # repr: NaN losses and norms compare equal
            out.append(repr((tuple(r), r.skipped, r.skipped_steps, tr.state_dict()["skip_run"],
                             r.loss_z)))
        return out

    def fresh(seed=0):
        m = smedjan.Model(CFG, seed=seed)
        m.flat_grads                                # held gradients, as the poisoned run has
        return m, smedjan.Trainer(m, **TRAIN, **policy)

    ref_m, ref_tr = fresh()
    ref = attempts(ref_m, ref_tr, Batches(tokens, 2, 16, seed=7), {1, 6, 7, 9}, 12)
    assert ref_tr.skipped_steps == 4 and ref_tr.state_dict()["skip_run"] == 0

    m, tr = fresh()
    b = Batches(tokens, 2, 16, seed=7)
    first = attempts(m, tr, b, {1, 6}, 7)
    p = tmp_path / "ckpt.safetensors"
    save_checkpoint(p, m, tr, step=tr.step_count, loader_state=b.state_dict())
    assert tr.state_dict()["skip_run"] == 1        # saved in the middle of a run of skips
    ck = load_checkpoint(p)
    assert ck.train_state == tr.state_dict()
    m, tr = fresh(seed=5)
    restore(ck, m, tr)
    b = Batches(tokens, 2, 16, seed=0)
    b.load_state_dict(ck.loader)
    second = attempts(m, tr, b, {0, 2}, 5)      # the run of skips goes on: 2 in a row
    assert first + second == ref
    assert tr.state_dict() == ref_tr.state_dict()
    np.testing.assert_array_equal(m.flat_params, ref_m.flat_params)


FAILPOINTS = [("open", 1), ("write", 1), ("write", 3), ("fsync", 1), ("close", 1), ("rename", 1)]


@pytest.mark.parametrize("errno_name,text", [("ENOSPC", "No space left on device"),
                                             ("EIO", "Input/output error")])
@pytest.mark.parametrize("op,nth", FAILPOINTS, ids=lambda x: str(x))
def test_a_failed_save_names_the_file_and_leaves_the_last_checkpoint(tmp_path, monkeypatch, op, nth,
                                                                     errno_name, text):
    """Every write, fsync, close and rename of the save path made to fail in
    turn (SMEDJAN_FAILPOINT): an OSError names the path and the error, the
    previous checkpoint is byte for byte what it was, and no other file (no
    temporary, no half checkpoint) is left in the folder."""
    model = smedjan.Model(CFG, seed=0)
    trainer = smedjan.Trainer(model, **TRAIN)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, trainer, step=1)
    before = path.read_bytes()
    r = np.random.default_rng(0)
    x = r.integers(0, 256, (2, 16)).astype(np.int32)
    trainer.step(x, x)
    monkeypatch.setenv("SMEDJAN_FAILPOINT", f"{op}:{errno_name}:{nth}")
    what = "cannot create temporary file .*" if op == "open" else f"{op} failed"
    with pytest.raises(OSError, match=rf"ckpt\.safetensors: {what}: {text}"):
        save_checkpoint(path, model, trainer, step=2)
    monkeypatch.delenv("SMEDJAN_FAILPOINT")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    save_checkpoint(path, model, trainer, step=2)   # and the next save goes through
    assert load_checkpoint(path).step == 2
