"""Shared fixtures: real text that exists on every machine (the Python
standard library's own sources), and the torch thread setting."""
import os
import pathlib

import numpy as np
import pytest


def stdlib_text(n_bytes: int) -> bytes:
    """The first n_bytes of the standard library's .py sources, in a fixed order."""
    root = pathlib.Path(os.__file__).parent
    out, total = [], 0
    for p in sorted(root.glob("*.py")):
        b = p.read_bytes()
        out.append(b)
        total += len(b)
        if total >= n_bytes:
            break
    return b"".join(out)[:n_bytes]


def text_batches(text_bytes, B, T, steps, seed=0):
    """(x, y) int32 byte-token batches of random windows of real text."""
    data = np.frombuffer(text_bytes, dtype=np.uint8).astype(np.int32)
    r = np.random.default_rng(seed)
    for _ in range(steps):
        starts = r.integers(0, len(data) - T - 1, B)
        x = np.stack([data[s:s + T + 1] for s in starts])
        yield np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over all elements: the tests' closeness measure
    (inf when a holds a NaN or Inf, so a poisoned output never passes)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.size != b.size:
        raise AssertionError(f"size {a.size} != expected {b.size}")
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b|: the worst element against the largest (logits);
    a reference below 1e-6 everywhere (a gradient that is exactly zero)
    counts as 1e-6."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def assert_close(got, want, tol, what="", err=rel_err):
    e = err(got, want)
    assert e < tol, f"{what}: relative error {e:.3e} >= {tol:.0e}"


def assert_model_matches(model, tokens, targets, logits_of, grad_of, err=rel_err):
    """The model's logits and loss (1e-5) and every parameter's gradient
    (1e-4) equal a PyTorch reference's: logits_of(tokens) gives its logits
    (with their graph), grad_of(name) a parameter's gradient after the
    reference's cross-entropy backward."""
    import torch
    import torch.nn.functional as F
    logits = logits_of(torch.from_numpy(tokens).long())
    assert_close(model.forward(tokens), logits.detach().numpy(), 1e-5, "logits", err)
    loss = model.loss(tokens, targets, backward=True)
    tl = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(targets).long().reshape(-1))
    tl.backward()
    assert abs(loss - tl.item()) <= 1e-5 * abs(tl.item()), (loss, tl.item())
    assert set(model.grads) == set(model.params)
    for name, g in model.grads.items():
        assert_close(g, grad_of(name), 1e-4, f"{name} gradient", err)


@pytest.fixture(scope="session")
def text_bytes():
    return stdlib_text(2_000_000)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_n_log_n(run, n, what):
    """run(k) makes its input and returns a function doing the work on it;
    the work's CPU time (best of 3) at n and n / 4 must grow like n log n
    (about 4.5x), not like all pairs (16x): a bound on the shape of the
    cost, so a slow or sanitized build passes as well as a fast one."""
    import time

    def cpu(k):
        work, best = run(k), float("inf")
        for _ in range(3):
            t = time.process_time()
            work()
            best = min(best, time.process_time() - t)
        return best
    small, big = cpu(n // 4), cpu(n)
    assert big < 8 * small + 0.02, f"{what}: {n // 4} took {small:.3f} s of CPU, {n} took {big:.3f} s"
