"""The portable build (the hot kernels compiled once per x86-64 level, one
picked at load) against a native one (SMEDJAN_NATIVE=1: -march=native), on
this machine in one run, interleaved native/portable/native/portable so that
load from other processes hits both alike; medians over --reps runs and
their ratio. Target: the portable build within 3% of the native one.

- CPU training step: the tiny and small presets, batch 4 x 128 tokens, as
  bench_cpu_train.py runs it (median step of --iters after 2 warm-up steps).
- CPU decode: SmolLM2-135M (bench_infer_cpu.py's model) at fp32 and q8,
  greedy steps after a 64-token prompt (median step, the first 4 dropped).
--clock cpu times process CPU time instead of wall time: with --threads 1
it is not stretched by other processes on a loaded machine.

Build the native copy outside the tree, then run from the checkout (whose
in-place build is the portable one):

    SMEDJAN_NATIVE=1 SMEDJAN_CUDA=0 python setup.py -q build_ext -b /tmp/native -t /tmp/native.tmp
    python benchmarks/bench_portable.py --native /tmp/native

Appends rows to results/cpu_train.jsonl and results/infer_cpu.jsonl.
"""
import argparse
import glob
import json
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from common import append_results, median, run_child  # noqa: E402

TRAIN = [("train", "tiny"), ("train", "small")]
DECODE = [("decode", "fp32"), ("decode", "q8")]


def child(kind, arg, a):
    """One measurement: the median seconds of a training step or a decode step."""
    import time
    import numpy as np
    import smedjan
    from smedjan import _C
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    _C.threads(a.threads)
    info = {"build": smedjan.build_info()["build"], "isa_build": _C.isa()["isa_build"]}
    times = []
    if kind == "train":   # as bench_cpu_train.py: batch 4 x 128 tokens
        model = smedjan.Model(arg, seed=0)
        tr = smedjan.Trainer(model, lr=3e-4, warmup=0, steps=10_000)
        x = np.random.default_rng(0).integers(0, 8192, (4, 129)).astype(np.int32)
        xs, ys = np.ascontiguousarray(x[:, :-1]), np.ascontiguousarray(x[:, 1:])
        for _ in range(2 + a.iters):
            t = clock()
            tr.step(xs, ys)
            times.append(clock() - t)
        return {**info, "step_s": median(times[2:])}
    sys.path.insert(0, str(ROOT / "tests"))   # as bench_infer_cpu.py: SmolLM2-135M
    from infer_common import held_out_text, smollm2_path
    from smedjan.infer import load_gguf
    m = load_gguf(smollm2_path(), arg, max_ctx=64 + a.gen_tokens + 8, kv_dtype="f16")
    prompt = [int(t) for t in m.tokenizer.encode(held_out_text(2000, "argparse.py"))][:64]
    m.prefill(prompt)
    tok = prompt[-1]
    for _ in range(a.gen_tokens):
        t = clock()
        tok = int(np.argmax(m.decode(tok)))
        times.append(clock() - t)
    return {**info, "gen_tok_s": 1.0 / median(times[4:])}


def package_dir(native_build, tmp):
    """A copy of the smedjan package whose extension is the native build's."""
    (so,) = glob.glob(os.path.join(native_build, "smedjan", "_C*.so"))
    pkg = pathlib.Path(tmp, "smedjan")
    pkg.mkdir()
    for f in (ROOT / "smedjan").iterdir():
        if f.suffix in (".py", ".typed"):
            (pkg / f.name).symlink_to(f)
    (pkg / os.path.basename(so)).symlink_to(os.path.abspath(so))
    return tmp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--native", required=True, help="build_ext -b directory of the native build")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu: process CPU time (with --threads 1, robust to other load)")
    ap.add_argument("--child", nargs=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(*a.child, a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"native": package_dir(a.native, tmp), "portable": str(ROOT)}
        load0 = os.getloadavg()[0]
        res = {}
        for rep in range(a.reps):
            for kind, arg in TRAIN + DECODE:
                for build in ("native", "portable"):
                    r = run_child(__file__, ["--native", a.native, "--threads", str(a.threads),
                                             "--iters", str(a.iters), "--gen-tokens",
                                             str(a.gen_tokens), "--clock", a.clock,
                                             "--child", kind, arg],
                                  env={"PYTHONPATH": paths[build]})
                    assert r["build"] == build, (build, r)
                    res.setdefault((kind, arg, build), []).append(r)
                    print(rep, kind, arg, build, r, flush=True)
        load1 = os.getloadavg()[0]
    rows = {"train": [], "decode": []}
    for kind, arg in TRAIN + DECODE:
        key = "step_s" if kind == "train" else "gen_tok_s"
        med = {b: median([r[key] for r in res[(kind, arg, b)]]) for b in ("native", "portable")}
        # portable speed / native speed: 1.0 = as fast, < 1 slower
        ratio = med["native"] / med["portable"] if kind == "train" else med["portable"] / med["native"]
        isa = res[(kind, arg, "portable")][0]["isa_build"]
        for b in ("native", "portable"):
            rows[kind].append({"bench": "portable_vs_native", "build": b,
                               ("preset" if kind == "train" else "mode"): arg,
                               "isa_build": res[(kind, arg, b)][0]["isa_build"],
                               key: med[b], "runs": [r[key] for r in res[(kind, arg, b)]],
                               "portable_speed_vs_native": ratio, "threads": a.threads,
                               "clock": a.clock,
                               "load_avg": [load0, load1]})
        print(f"{kind} {arg}: native {med['native']:.4g}  portable {med['portable']:.4g} "
              f"({isa})  portable speed / native {ratio:.3f}")
    if not a.no_write:
        print("appended to", append_results("cpu_train", rows["train"], "cpu"))
        print("appended to", append_results("infer_cpu", rows["decode"], "cpu"))


if __name__ == "__main__":
    main()
