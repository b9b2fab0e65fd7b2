"""How chaotic SmolLM2-135M is under 8-bit activations: the Q4_1 file run in
our q4 mode by each of our kernels (scalar, AVX2, AVX-512 VNNI: the same
integer sums, only the fp32 order of adding blocks differs), teacher-forced
over the 512 recorded tokens; top-1 agreement and mean KL between every pair,
and of each against llama.cpp's recorded outputs. docs/inference.md quotes it.

    python benchmarks/probes/q4_agreement.py
"""
import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
sys.path.insert(0, str(HERE.parent.parent))

ISAS = ["scalar", "avx2", "avx512vnni"]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def one(isa, out):
    """Our q4 logits with the kernels capped at isa (the cap is read at load)."""
    from infer_common import smollm2_path
    from smedjan.infer import load_gguf
    import test_infer_smollm2 as t
    toks = np.asarray(t._recorded()["teacher_forced"]["tokens"], np.int32)
    np.save(out, load_gguf(smollm2_path(), "q4", max_ctx=1024).forward(toks).astype(np.float64))


def main():
    if len(sys.argv) == 3:
        return one(*sys.argv[1:])
    import tempfile
    import test_infer_smollm2 as t
    tmp = pathlib.Path(tempfile.mkdtemp())
    lp = {}
    for isa in ISAS:   # one process each: the kernel choice is made once per process
        subprocess.run([sys.executable, __file__, isa, str(tmp / f"{isa}.npy")], check=True,
                       env=dict(os.environ, SMEDJAN_ISA=isa))
        lp[isa] = log_softmax(np.load(tmp / f"{isa}.npy"))
    print("| pair | top-1 agreement | mean KL |\n|---|---:|---:|")
    for a, b in itertools.combinations(ISAS, 2):
        agree = (lp[a].argmax(-1) == lp[b].argmax(-1)).mean()
        kl = (np.exp(lp[a]) * (lp[a] - lp[b])).sum(-1).mean()
        print(f"| ours {a} vs ours {b} | {agree:.4f} | {kl:.2e} |")
    top = np.asarray(t._recorded()["teacher_forced"]["top_ids"])[:, 0]
    for isa in ISAS:
        print(f"| ours {isa} vs llama.cpp (top-1 only) | {(lp[isa].argmax(-1) == top).mean():.4f} | |")


if __name__ == "__main__":
    main()
