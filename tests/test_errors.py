"""Bad input gets a clear Python exception, never a crash."""
import numpy as np
import pytest

import smedjan


@pytest.fixture(scope="module")
def model():
    return smedjan.Model(smedjan.Config.custom(32, 1, 2, vocab_size=50, max_seq_len=16))


def test_token_id_out_of_vocab(model):
    x = np.zeros((2, 8), np.int32)
    x[1, 5] = 50
    with pytest.raises(ValueError, match=r"tokens\[1, 5\] = 50 is out of range for vocab_size 50"):
        model.forward(x)


def test_negative_token_and_bad_target(model):
    x = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(x - 1)
    y = x.copy()
    y[0, 2] = 77
    with pytest.raises(ValueError, match=r"targets\[0, 2\] = 77"):
        model.loss(x, y)


def test_wrong_dtype(model):
    with pytest.raises(TypeError, match="tokens: expected an integer array"):
        model.forward(np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match="targets"):
        model.loss(np.zeros((1, 4), np.int32), np.zeros((1, 4), np.float64))


def test_wrong_shape(model):
    with pytest.raises(ValueError, match=r"expected shape \(batch, seq\)"):
        model.forward(np.zeros((1, 2, 3), np.int32))
    with pytest.raises(ValueError, match="targets must have the dtype and shape of tokens"):
        model.loss(np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match="batch and sequence must be >= 1"):
        model.forward(np.zeros((1, 0), np.int32))


def test_sequence_longer_than_max_seq_len(model):
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_seq_len 16"):
        model.forward(np.zeros((1, 17), np.int32))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match=r"n_heads \(3\) must divide dim \(32\)"):
        smedjan.Config.custom(32, 1, 3)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        smedjan.Config.custom(32, 1, 4, n_kv_heads=3)


@pytest.mark.parametrize("field,value,message", [
    ("dim", 0, "dim must be"), ("n_layers", -1, "n_layers must be"),
    ("vocab_size", 0, "vocab_size must be"), ("norm_eps", 0.0, "norm_eps must be positive"),
    ("max_seq_len", 0, "max_seq_len must be"), ("ffn_dim", 0, "ffn_dim must be"),
])
def test_config_fields_are_checked(field, value, message):
    base = smedjan.Config.custom(32, 1, 2).to_dict()
    base[field] = value
    with pytest.raises(ValueError, match=message):
        smedjan.Config(**base)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown size 'giant'"):
        smedjan.Model("giant")


def test_trainer_arguments_are_checked(model):
    with pytest.raises(ValueError, match="min_lr must be in"):
        smedjan.Trainer(model, lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        smedjan.Trainer(model, steps=0)
