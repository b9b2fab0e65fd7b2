"""Every op's backward equals central finite differences of its forward,
both when it overwrites an input gradient and when it adds into one."""
import pytest

from smedjan import _C

OPS = ["embedding", "rmsnorm", "qk_norm", "qk_norm_plain", "matmul", "matmul_add", "matmul_rope", "matmul_swiglu", "rope", "attention",
       "swiglu", "add", "cross_entropy"]


@pytest.mark.parametrize("accumulate", [False, True], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("op", OPS)
def test_backward_matches_finite_differences(op, accumulate):
    for seed in (1, 2, 3):
        err, detail = _C.op_gradcheck(op, seed, accumulate)
        assert err < 1e-3, f"{op} seed {seed}: {detail}"


def test_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        _C.op_gradcheck("conv", 1, False)
