"""Every architecture option, alone and mixed, computes what an independent
PyTorch implementation does (tests/torch_ref.py): logits within 1e-5 and
every gradient within 1e-4 (fp32, relative), on the CPU."""
import numpy as np
import pytest
import torch

import smedjan
from conftest import assert_model_matches
from torch_ref import TorchLlama

torch.set_num_threads(max(1, smedjan.threads()))

YARN = {"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}
OPTIONS = {
    "rope-linear": dict(rope_scaling={"type": "linear", "factor": 2.5}),
    "rope-dynamic": dict(rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_seq_len": 16}),
    "rope-yarn": dict(rope_scaling=YARN),
    "rope-yarn-attention-factor": dict(rope_scaling={**YARN, "attention_factor": 0.8, "beta_fast": 16.0,
                                                     "truncate": False}),
    "window": dict(window=5),
    "window-per-layer": dict(window=[7, 0]),
    "qk-norm": dict(qk_norm="weighted"),
    "qk-norm-plain": dict(qk_norm="plain"),
    "relu2": dict(ffn="relu2"),
    "paired-heads": dict(paired_heads=True),
    "value-mix": dict(value_mix=0.3),
    "embed-skip": dict(embed_skip=0.5),
    "untied-head": dict(tied_head=False),
    "mixed": dict(window=[6, 0, 6], qk_norm=["weighted", "none", "none"], ffn=["relu2", "swiglu", "swiglu"],
                  paired_heads=True, value_mix=0.25, embed_skip=0.2, tied_head=False, rope_scaling=YARN),
}


def make(options, seed=0, n_layers=3, B=2, T=21):
    cfg = smedjan.Config.custom(64, n_layers, 4, 2, vocab_size=97, max_seq_len=64, **options)
    model = smedjan.Model(cfg, seed=seed)
    r = np.random.default_rng(seed)
    for name, v in model.params.items():
        if v.ndim == 1:   # gains at 1.0 would hide a wrong gain gradient
            v[:] = r.uniform(0.5, 1.5, v.shape)
    ref = TorchLlama(cfg)
    ref.load_from(model)
    tokens = r.integers(0, 97, (B, T)).astype(np.int32)
    targets = r.integers(0, 97, (B, T)).astype(np.int32)
    return model, ref, tokens, targets


@pytest.mark.parametrize("option", OPTIONS)
def test_logits_loss_and_every_gradient_match_torch(option):
    model, ref, tokens, targets = make(OPTIONS[option])
    assert_model_matches(model, tokens, targets, ref.forward, lambda n: ref.named(n).grad.numpy())


def test_the_tensor_table_follows_the_options():
    plain = smedjan.Model(smedjan.Config.custom(64, 2, 4, 2, vocab_size=97), seed=0)
    m = smedjan.Model(smedjan.Config.custom(64, 2, 4, 2, vocab_size=97, tied_head=False,
                                            qk_norm=["weighted", "plain"], paired_heads=True), seed=0)
    assert set(m.params) - set(plain.params) == {"lm_head", "layers.0.q_norm", "layers.0.k_norm"}
    assert m.params["layers.0.q_norm"].shape == (16,)
    assert m.params["layers.1.wo"].shape == (64, 32)        # attention at H/2 heads
    assert m.config.n_params == sum(v.size for v in m.params.values())


@pytest.mark.parametrize("field, value, message", [
    ("mixer", "mamba", "unknown mixer 'mamba'"),
    ("ffn", ["swiglu", "gelu"], r"'ffn' \(layer 1\): unknown ffn 'gelu'"),
    ("window", 65, "window must be in 0..max_seq_len"),
    ("window", [0, 0, 0, 0, 0], "'window' has 5 values"),
    ("paired_heads", True, "paired_heads needs even n_heads"),
    ("rope_scaling", {"type": "yarn", "factor": 1.0, "original_max_seq_len": 16}, "factor must be > 1"),
    ("rope_scaling", {"type": "ntk", "factor": 2.0}, "type 'ntk' is unknown"),
    ("rope_scaling", {"type": "yarn", "factor": 2.0, "original_max_seq_len": 16, "mscale": 1.0},
     "'mscale' that this build"),
    ("value_mix", 1.5, r"value_mix must be in \[0, 1\]"),
])
def test_a_bad_combination_is_refused_naming_the_field(field, value, message):
    heads = dict(n_heads=3, n_kv_heads=3) if field == "paired_heads" else {}
    kw = dict(dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=97, max_seq_len=64)
    kw.update(heads)
    with pytest.raises(ValueError, match=message):
        smedjan.Config(**kw, **{field: value})


def test_a_period_repeats_over_the_layers():
    c = smedjan.Config.custom(64, 6, 4, 2, window=[32, 32, 0], max_seq_len=64)
    assert c.window == (32, 32, 0, 32, 32, 0)
    assert [c.layer(i)["window"] for i in range(6)] == [32, 32, 0, 32, 32, 0]
    assert smedjan.Config.custom(64, 6, 4, 2, ffn=["relu2"] * 6).ffn == "relu2"   # canonical: one value


MIXED = OPTIONS["mixed"]


def test_a_mixed_stack_trains_checkpoints_resumes_bit_identically_and_generates(tmp_path):
    from smedjan.checkpoint import model_from_checkpoint
    from smedjan.data import Batches, TokenFile, write_tokens
    from smedjan.loop import LATEST, fit
    path = str(tmp_path / "d.tok")
    write_tokens(path, [np.random.default_rng(0).integers(0, 97, 20_000)])

    def run(ckpt_dir, max_steps=None, resume=False):
        cfg = smedjan.Config.custom(64, 3, 4, 2, vocab_size=97, max_seq_len=64, **MIXED)
        model = smedjan.Model(cfg, seed=0)
        tr = smedjan.Trainer(model, lr=3e-3, warmup=2, steps=12)
        data = TokenFile(path)
        rows = fit(tr, Batches(data, 4, 32, seed=0), None, checkpoint_dir=str(ckpt_dir),
                   checkpoint_every=3, resume=resume, max_steps=max_steps, progress=False)
        return [r["loss"] for r in rows], model

    straight, m1 = run(tmp_path / "a")
    first, _ = run(tmp_path / "b", max_steps=7)
    second, m2 = run(tmp_path / "b", resume=True)
    assert first + second == straight
    assert straight[-1] < straight[0]
    np.testing.assert_array_equal(m1.flat_params, m2.flat_params)
    loaded = model_from_checkpoint(tmp_path / "b" / LATEST)
    assert loaded.config == m2.config and loaded.config.window == (6, 0, 6)
    assert len(list(loaded.generate([1, 2, 3], 20, temperature=0))) == 20


def test_a_checkpoint_records_the_architecture_and_refuses_options_it_does_not_know(tmp_path):
    import json
    from smedjan.checkpoint import model_from_checkpoint, save_weights
    from smedjan.io import load_safetensors, save_safetensors
    m = smedjan.Model(smedjan.Config.custom(64, 3, 4, 2, vocab_size=97, max_seq_len=64, **MIXED), seed=0)
    path = tmp_path / "w.safetensors"
    save_weights(path, m)
    loaded = model_from_checkpoint(path)
    assert loaded.config == m.config
    np.testing.assert_array_equal(loaded.flat_params, m.flat_params)
    tensors, meta = load_safetensors(path)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if not k.startswith("crc32:")}   # the writer adds them
    for change, message in ((dict(mixer_period=4), "'mixer_period', which this build of smedjan does not know"),
                            (dict(mixer="hyena"), "unknown mixer 'hyena'")):
        newer = tmp_path / "newer.safetensors"
        save_safetensors(newer, tensors, {**meta, "config": json.dumps({**json.loads(meta["config"]), **change})})
        with pytest.raises(ValueError, match=message):
            model_from_checkpoint(newer)
