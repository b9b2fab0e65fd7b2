"""Every op's backward equals central finite differences of its forward,
both when it overwrites an input gradient and when it adds into one (and
an input read by two nodes gets the sum of both gradients)."""
import pytest

from smedjan import _C

OPS = ["embedding", "rmsnorm", "qk_norm", "qk_norm_plain", "matmul", "matmul_add", "matmul_rope", "matmul_swiglu",
       "matmul_swiglu_relu2", "rope", "rope_yarn", "attention", "attention_window", "swiglu", "swiglu_relu2", "add", "axpy",
       "pair_heads", "mix", "gather_rows", "cross_entropy", "moe", "moe_sigmoid",
       "mla_pack", "head_slice", "scan", "scan_fused", "conv1d_silu", "ssd_skip", "gated_rmsnorm",
       "mamba2",   # conv, ssd_prep, scan, skip, gated norm: slices of one input read by several ops
       "linear", "linear_elu1_gated_norm",   # linear_prep, scan, linear_norm
       "mix_shared_y"]   # two mixes read one y: its gradient is written once, then added to


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("op", OPS)
def test_backward_matches_finite_differences(op, accumulate):
    for seed in (1, 2, 3):
        err, detail = _C.op_gradcheck(op, seed, accumulate)
        assert err < 1e-3, f"{op} seed {seed}: {detail}"


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        _C.op_gradcheck("conv", 1, False)
