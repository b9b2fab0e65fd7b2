"""Specification of the CPU GEMM, smedjan._C.gemm(C, A, B, transA, transB, accum):
C = op(A) @ op(B) (+ C), float32, checked against float64 NumPy and the C
reference, for every transposition form, odd and edge sizes, and bitwise
determinism across calls and thread counts."""
import itertools

import numpy as np
import pytest

from smedjan import _C

U = 2.0 ** -24  # float32 unit roundoff
FORMS = list(itertools.product((False, True), (False, True)))  # (transA, transB)


def rand(rng, *shape):
    """Random float32 with no zeros: magnitudes in [0.5, 1.5), random signs."""
    x = rng.uniform(0.5, 1.5, size=shape) * rng.choice((-1.0, 1.0), size=shape)
    return x.astype(np.float32)


def operands(rng, M, N, K, ta, tb):
    A = rand(rng, K, M) if ta else rand(rng, M, K)
    B = rand(rng, N, K) if tb else rand(rng, K, N)
    return A, B


def check_close(got, A, B, ta, tb, C0, what):
    """Elementwise bound of a length-K float32 dot product (one rounding per
    step): |err| <= (K + 1) u (|C0| + |op(A)| @ |op(B)|)."""
    oA = (A.T if ta else A).astype(np.float64)
    oB = (B.T if tb else B).astype(np.float64)
    want = oA @ oB + (C0.astype(np.float64) if C0 is not None else 0.0)
    K = oA.shape[1]
    scale = np.abs(oA) @ np.abs(oB) + (np.abs(C0) if C0 is not None else 0.0)
    bound = 1.01 * (K + 1) * U * scale + 1e-30
    err = np.abs(got.astype(np.float64) - want)
    bad = err > bound
    if bad.any():
        i, j = np.argwhere(bad)[0]
        pytest.fail(f"{what}: {bad.sum()} elements out of bound; first at ({i}, {j}): "
                    f"got {got[i, j]!r}, want {want[i, j]!r}, err {err[i, j]:.3g} > "
                    f"bound {bound[i, j]:.3g}; max rel err "
                    f"{(err / np.maximum(scale, 1e-30)).max():.3g}")


ODD = [1, 2, 3, 7, 13, 14, 15, 16, 17, 31, 32, 33, 47, 64, 67]


@pytest.mark.parametrize("ta,tb", FORMS)
@pytest.mark.parametrize("accum", [False, True])
def test_odd_sizes_match_float64(ta, tb, accum):
    rng = np.random.default_rng(1000 + 4 * ta + 2 * tb + accum)
    # every size in ODD appears as M, N and K; shapes mixed so the sweep stays fast
    shapes = [(m, n, k) for m in ODD for n, k in zip(ODD, ODD[::-1])]
    shapes += [(m, m, m) for m in ODD]
    for M, N, K in shapes:
        A, B = operands(rng, M, N, K, ta, tb)
        C0 = rand(rng, M, N) if accum else None
        C = C0.copy() if accum else np.full((M, N), np.nan, np.float32)
        _C.gemm(C, A, B, ta, tb, accum)
        check_close(C, A, B, ta, tb, C0, f"M={M} N={N} K={K} transA={ta} transB={tb} "
                                         f"accum={accum}")


@pytest.mark.parametrize("ta,tb", FORMS)
@pytest.mark.parametrize("M,N,K", [
    (300, 517, 1030),   # K crosses several KC blocks, edges in M and N
    (97, 3100, 65),     # N crosses the NC block
    (20, 16500, 33),    # N crosses the shared B block's column group (16384)
    (1, 8192, 256),     # decode: one token through the LM head
    (5, 67, 700),       # few rows: the column split
    (512, 768, 256),    # the small preset's FFN forward
])
def test_larger_shapes_match_float64(ta, tb, M, N, K):
    rng = np.random.default_rng(M * 7 + N * 3 + K)
    A, B = operands(rng, M, N, K, ta, tb)
    C0 = rand(rng, M, N)
    C = C0.copy()
    _C.gemm(C, A, B, ta, tb, True)
    check_close(C, A, B, ta, tb, C0, f"M={M} N={N} K={K} transA={ta} transB={tb} accum")
    C = np.full((M, N), np.nan, np.float32)
    _C.gemm(C, A, B, ta, tb, False)
    check_close(C, A, B, ta, tb, None, f"M={M} N={N} K={K} transA={ta} transB={tb}")


@pytest.mark.parametrize("ta,tb", FORMS)
def test_reference_matches_float64(ta, tb):
    rng = np.random.default_rng(7)
    for M, N, K in [(1, 1, 1), (13, 31, 67), (40, 33, 300)]:
        A, B = operands(rng, M, N, K, ta, tb)
        C0 = rand(rng, M, N)
        C = C0.copy()
        _C.gemm_reference(C, A, B, ta, tb, True)
        want = ((A.T if ta else A).astype(np.float64) @ (B.T if tb else B).astype(np.float64)
                + C0)
        # double accumulation: only the final rounding to float32
        np.testing.assert_allclose(C, want, rtol=2 * U, atol=2 * U * np.abs(want).max())


@pytest.mark.parametrize("ta,tb", FORMS)
def test_fast_matches_reference(ta, tb):
    rng = np.random.default_rng(11)
    M, N, K = 45, 70, 290
    A, B = operands(rng, M, N, K, ta, tb)
    C0 = rand(rng, M, N)
    fast, ref = C0.copy(), C0.copy()
    _C.gemm(fast, A, B, ta, tb, True)
    _C.gemm_reference(ref, A, B, ta, tb, True)
    check_close(fast, A, B, ta, tb, C0, "fast vs float64")
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("ta,tb", FORMS)
def test_repeated_calls_are_bit_identical(ta, tb):
    rng = np.random.default_rng(5)
    M, N, K = 700, 650, 600  # big enough to run threaded
    A, B = operands(rng, M, N, K, ta, tb)
    first = np.empty((M, N), np.float32)
    _C.gemm(first, A, B, ta, tb)
    for _ in range(3):
        again = np.empty((M, N), np.float32)
        _C.gemm(again, A, B, ta, tb)
        assert np.array_equal(first.view(np.uint32), again.view(np.uint32))


def test_result_does_not_depend_on_thread_count():
    rng = np.random.default_rng(6)
    saved = _C.threads()
    try:
        for ta, tb in FORMS:
            for M, N, K in [(700, 650, 600), (3, 4000, 300), (1000, 40, 513)]:
                A, B = operands(rng, M, N, K, ta, tb)
                outs = []
                for n in (1, 2, 3):
                    _C.threads(n)
                    C = np.empty((M, N), np.float32)
                    _C.gemm(C, A, B, ta, tb)
                    outs.append(C.view(np.uint32))
                for n, o in zip((2, 3), outs[1:]):
                    diff = np.argwhere(o != outs[0])
                    assert diff.size == 0, (f"threads={n} differs from threads=1 at "
                                            f"{diff[0]} (M={M} N={N} K={K} ta={ta} tb={tb})")
    finally:
        _C.threads(saved)


def test_result_does_not_depend_on_thread_count_many_threads():
    """The 2-D tiling (row blocks x column slices), the shared A, the K and
    column groups and the on-demand packing all follow the thread count;
    none may change a bit. More threads than cores also exercises packers
    losing their core while others wait for the block they claimed."""
    rng = np.random.default_rng(16)
    saved = _C.threads()
    try:
        for ta, tb in FORMS:
            accum = ta  # the dW form accumulates
            for M, N, K in [(512, 512, 3072), (256, 768, 512), (40, 17000, 70), (512, 8192, 64)]:
                A, B = operands(rng, M, N, K, ta, tb)
                C0 = rand(rng, M, N)
                outs = []
                for n in (1, 2, 5, 8, 16):
                    _C.threads(n)
                    C = C0.copy()
                    _C.gemm(C, A, B, ta, tb, accum)
                    outs.append(C.view(np.uint32))
                for n, o in zip((2, 5, 8, 16), outs[1:]):
                    diff = np.argwhere(o != outs[0])
                    assert diff.size == 0, (f"threads={n} differs from threads=1 at "
                                            f"{diff[0]} (M={M} N={N} K={K} ta={ta} tb={tb})")
    finally:
        _C.threads(saved)


def test_accum_adds_to_old_c():
    rng = np.random.default_rng(8)
    A, B = operands(rng, 33, 47, 65, False, True)
    C0 = rand(rng, 33, 47)
    C = C0.copy()
    _C.gemm(C, A, B, False, True, True)
    fresh = np.empty_like(C)
    _C.gemm(fresh, A, B, False, True, False)
    np.testing.assert_allclose(C, C0 + fresh, rtol=1e-5, atol=1e-4)


def test_empty_k_gives_zero_or_keeps_c():
    C = np.full((3, 4), 2.0, np.float32)
    _C.gemm(C, np.empty((3, 0), np.float32), np.empty((0, 4), np.float32), accum=True)
    assert (C == 2.0).all()
    _C.gemm(C, np.empty((3, 0), np.float32), np.empty((0, 4), np.float32))
    assert (C == 0.0).all()


def test_keyword_arguments():
    rng = np.random.default_rng(9)
    A, B = rand(rng, 6, 5), rand(rng, 4, 6)
    C = np.empty((5, 4), np.float32)
    _C.gemm(C=C, A=A, B=B, transA=True, transB=True)
    np.testing.assert_allclose(C, A.T @ B.T, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    f32 = lambda *s: np.ones(s, np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="shapes do not match"):
        _C.gemm(f32(3, 4), f32(3, 5), f32(6, 4))
    with pytest.raises(ValueError, match="shapes do not match"):
        _C.gemm(f32(3, 4), f32(3, 5), f32(5, 4), transB=True)
    with pytest.raises(TypeError, match="float32"):
        _C.gemm(f32(3, 4), np.ones((3, 5)), f32(5, 4))
    with pytest.raises(TypeError, match="C-contiguous"):
        _C.gemm(f32(3, 4), f32(5, 3).T, f32(5, 4))
    with pytest.raises(TypeError, match="writable"):
        ro = f32(3, 4)
        ro.flags.writeable = False
        _C.gemm(ro, f32(3, 5), f32(5, 4))
    with pytest.raises(ValueError, match="2-D"):
        _C.gemm(f32(3, 4), f32(3, 5, 1), f32(5, 4))
    with pytest.raises(ValueError, match="share memory"):
        buf = f32(4, 4)
        _C.gemm(buf, buf, f32(4, 4))
    with pytest.raises(TypeError):
        _C.gemm([[1.0]], f32(1, 1), f32(1, 1))


@pytest.mark.parametrize("ta,tb", FORMS)
def test_rows_do_not_depend_on_batch_size(ta, tb):
    """Every element is one FMA chain in k order whatever the tiling, so a
    row computed alone (decode, M=1) is bitwise the row of a big batch."""
    rng = np.random.default_rng(12)
    M, N, K = 200, 333, 300
    A, B = operands(rng, M, N, K, ta, tb)
    full = np.empty((M, N), np.float32)
    _C.gemm(full, A, B, ta, tb)
    for rows in (slice(0, 1), slice(17, 18), slice(5, 9), slice(100, 114), slice(150, 200)):
        sub = np.ascontiguousarray(A[:, rows] if ta else A[rows])
        part = np.empty((rows.stop - rows.start, N), np.float32)
        _C.gemm(part, sub, B, ta, tb)
        diff = np.argwhere(part.view(np.uint32) != full[rows].view(np.uint32))
        assert diff.size == 0, f"rows {rows}: first difference at {diff[0]}"
