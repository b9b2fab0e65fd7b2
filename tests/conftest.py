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


@pytest.fixture(scope="session")
def text_bytes():
    return stdlib_text(2_000_000)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
