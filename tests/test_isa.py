"""Portable builds: the CPU kernels are compiled once per x86-64 level and the
engine picks the best level the CPU runs at load time, capped by SMEDJAN_ISA
(csrc/core/isa.h). Every level this CPU runs computes what the baseline
level computes: a training step and a decode agree within float tolerance."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import smedjan
from smedjan import _C

LEVELS = ["scalar", "avx2", "avx512", "avx512vnni"]
PORTABLE = not _C.isa()["native"]
# A portable build's copy per level, and the GEMM microkernel each one has.
BUILD_OF = {"scalar": ("x86-64", "portable"), "avx2": ("x86-64-v3", "avx2"),
            "avx512": ("x86-64-v4", "avx512"), "avx512vnni": ("x86-64-v4", "avx512")}

# Two training steps (the CPU backend table: GEMM, attention, norms, AdamW)
# and a prefill + decode in fp32 and q8 (forward.c, qmatmul.c, attn.c).
STEP_AND_DECODE = """
import json, numpy as np, smedjan
from smedjan import _C
from smedjan.infer import from_model
m = smedjan.Model("tiny", vocab_size=256, seed=1, max_seq_len=64)
x = np.random.default_rng(0).integers(0, 256, (2, 33)).astype(np.int32)
t = smedjan.Trainer(m, lr=1e-3, steps=2)
losses = [t.step(x[:, :-1], x[:, 1:]).loss for _ in range(2)]
toks = x[0, :20]
logits = {}
for mode in ("fp32", "q8"):
    e = from_model(m, mode)
    e.prefill(toks[:12])
    logits[mode] = np.stack([e.decode(int(k)) for k in toks[12:]]).tolist()
print(json.dumps({"isa": _C.isa(), "gemm": _C.GEMM_ISA, "losses": losses,
                  "params": float(sum(np.abs(v).sum() for v in m.params.values())),
                  "logits": logits}))
"""


def run_at(level):
    env = dict(os.environ, SMEDJAN_ISA=level, SMEDJAN_THREADS="2")
    r = subprocess.run([sys.executable, "-c", STEP_AND_DECODE], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def supported_levels():
    best = _C.isa()["isa_best"]
    return LEVELS[:LEVELS.index(best) + 1]


@pytest.fixture(scope="module")
def baseline():
    return run_at("scalar")


@pytest.mark.parametrize("level", LEVELS[1:])
def test_each_level_trains_and_decodes_like_the_baseline(level, baseline):
    if level not in supported_levels():
        pytest.skip(f"this CPU runs up to {_C.isa()['isa_best']}")
    got = run_at(level)
    assert got["isa"]["isa"] == level
    if PORTABLE:   # the level's own compiled copy ran, not the baseline's
        assert (got["isa"]["isa_build"], got["gemm"]) == BUILD_OF[level]
        assert (baseline["isa"]["isa_build"], baseline["gemm"]) == BUILD_OF["scalar"]
    # FMA or not, other summation orders: float rounding only.
    np.testing.assert_allclose(got["losses"], baseline["losses"], rtol=1e-5)
    np.testing.assert_allclose(got["params"], baseline["params"], rtol=1e-5)
    fp32, ref = np.array(got["logits"]["fp32"]), np.array(baseline["logits"]["fp32"])
    assert np.abs(fp32 - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(fp32 - ref).max()
    # q8: a sum in another order can move an activation across an 8-bit
    # rounding boundary (see test_infer's test_forced_isas_give_the_scalar_logits).
    q8, ref = np.array(got["logits"]["q8"]), np.array(baseline["logits"]["q8"])
    assert np.linalg.norm(q8 - ref) / np.linalg.norm(ref) < 2e-2


def test_smedjan_isa_caps_the_level():
    got = run_at("scalar")["isa"]
    assert got["isa"] == "scalar" and got["isa_best"] == _C.isa()["isa_best"]
    assert smedjan.build_info()["isa"] == _C.isa()["isa"]


@pytest.mark.skipif(not PORTABLE, reason="a SMEDJAN_NATIVE=1 build")
def test_portable_build_has_no_native_flags():
    assert "-march=native" not in _C.BUILD_FLAGS, _C.BUILD_FLAGS
    assert smedjan.build_info()["build"] == "portable"
