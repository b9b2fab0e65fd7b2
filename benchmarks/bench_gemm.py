"""CPU GEMM benchmark: smedjan._C.gemm against NumPy's matmul (its bundled
OpenBLAS) at the same thread count, for square sizes and the model's linear
layers in all three forms a training step uses:

    forward  y  = x @ W^T        gemm(y, x, W, transB=True)
    backward dx = dy @ W         gemm(dx, dy, W)
    backward dW += dy^T @ x      gemm(dW, dy, x, transA=True, accum=True)

Each case alternates rounds of ours and NumPy's (with a pause in between, so
that neither pool's spinning workers steal the other's cores) and reports
the median time over all repeats after warm-up. Appends one row per case to
benchmarks/results/gemm_cpu.jsonl and prints the Markdown report (written to
--out FILE too when given).

    python3 benchmarks/bench_gemm.py --threads 2
"""
import argparse
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for both smedjan and OpenBLAS (default: all cores)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=2,
                   help="clean rounds wanted per side (alternating; see run_case)")
    p.add_argument("--max-rounds", type=int, default=6, help="rounds at most per case")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, which other "
                        "processes on a shared machine cannot inflate (meaningful with "
                        "--threads 1 only: with more, idle workers' spinning would count)")
    p.add_argument("--quick", action="store_true", help="square 512 and the small preset only")
    p.add_argument("--out", default=None, help="also write the Markdown report to this file")
    return p.parse_args()


ARGS = parse()
# Must be set before NumPy loads OpenBLAS.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from common import append_results, cpu_model, report, today  # noqa: E402
from smedjan import _C  # noqa: E402

PRESETS = {  # name: (dim, ffn, vocab, tokens)
    "small": (256, 768, 8192, 512),
    "medium": (512, 1536, 8192, 512),
}


def cases(quick):
    """(label, form, M, N, K); form is fwd / dx / dW as in the module docstring."""
    out = []
    for n in ((512,) if quick else (512, 1024, 2048)):
        for form in ("fwd", "dx", "dW"):
            out.append((f"square {n}", form, n, n, n))
    for name in (("small",) if quick else PRESETS):
        dim, ffn, vocab, T = PRESETS[name]
        layers = [("qkv", dim, 3 * dim), ("attn out", dim, dim), ("ffn up", dim, 2 * ffn),
                  ("ffn down", ffn, dim), ("lm head", dim, vocab)]
        for lname, din, dout in layers:
            # y(T, dout) = x(T, din) @ W(dout, din)^T
            out.append((f"{name} {lname}", "fwd", T, dout, din))
            # dx(T, din) = dy(T, dout) @ W(dout, din)
            out.append((f"{name} {lname}", "dx", T, din, dout))
            # dW(dout, din) += dy(T, dout)^T @ x(T, din)
            out.append((f"{name} {lname}", "dW", dout, din, T))
    return out


FORMS = {"fwd": (False, True, False), "dx": (False, False, False), "dW": (True, False, True)}


def operands(form, M, N, K, rng):
    ta, tb, accum = FORMS[form]
    A = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
    B = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
    C = rng.standard_normal((M, N), dtype=np.float32)
    return A, B, C, ta, tb, accum


def timed(fn, repeats):
    clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
    ts = []
    for _ in range(repeats):
        t = clock()
        fn()
        ts.append(clock() - t)
    return ts


def _jiffies():
    """(busy jiffies of the whole machine, total jiffies, this process's jiffies)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        mine = f.read().rsplit(")", 1)[1].split()
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v), int(mine[11]) + int(mine[12])


def wait_quiet(max_wait=2.0, threshold=0.1, window=0.3):
    """On a shared machine, wait (up to max_wait s) until other processes use
    less than `threshold` of the CPUs. Returns their share when we went on."""
    if not os.path.exists("/proc/stat"):
        return 0.0
    t_end = time.time() + max_wait
    while True:
        b0, t0, m0 = _jiffies()
        time.sleep(window)
        b1, t1, m1 = _jiffies()
        share = max(0.0, (b1 - b0) - (m1 - m0)) / max(1, t1 - t0)
        if share < threshold or time.time() > t_end:
            return share


def run_case(form, M, N, K, rng):
    A, B, C, ta, tb, accum = operands(form, M, N, K, rng)
    oA, oB = (A.T if ta else A), (B.T if tb else B)
    tmp = np.empty_like(C)

    def ours():
        _C.gemm(C, A, B, ta, tb, accum)

    # NumPy's side is the bare matmul even for dW: it has no fused C += A @ B,
    # and leaving out the add it would need keeps the comparison strict.
    def theirs():
        np.matmul(oA, oB, out=tmp)

    flops = 2.0 * M * N * K
    # about 0.2 s per round, so small cases get many calls
    reps = max(ARGS.repeats, min(400, int(0.2 / max(flops / 150e9, 1e-6))))
    # A round is `reps` timed calls of one side; its result the median call.
    # The machine may be shared, so each round also records the share of the
    # CPUs that other processes took meanwhile; a round is clean below 10%.
    # Rounds alternate (ours, NumPy) until each side has ARGS.rounds clean
    # ones or ARGS.max_rounds were run; reported is each side's best clean
    # round, else its best round, flagged with the load it saw.
    res = {0: [], 1: []}
    # with the CPU clock, others' load cannot inflate the times: all rounds count
    clean_below = 0.1 if ARGS.clock == "wall" else float("inf")
    for _ in range(ARGS.max_rounds):
        if ARGS.clock == "wall":
            wait_quiet()             # also lets the other pool's workers sleep
        for side, fn in ((0, ours), (1, theirs)):
            fn(); fn()               # warm-up: caches, pack buffers, thread pools
            b0, t0, m0 = _jiffies()
            ts = timed(fn, reps)
            b1, t1, m1 = _jiffies()
            others = max(0.0, (b1 - b0) - (m1 - m0)) / max(1, t1 - t0)
            res[side].append((flops / np.median(ts) / 1e9, others))
            time.sleep(0.2)          # let this pool's spinning workers go to sleep
        if all(sum(o < clean_below for _, o in res[sd]) >= ARGS.rounds for sd in res):
            break
    out = []
    for side in (0, 1):
        clean = [g for g, o in res[side] if o < clean_below]
        out.append((max(clean), len(clean)) if clean else
                   (max(g for g, _ in res[side]), -min(o for _, o in res[side])))
    return out


def blas_info():
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        return f"{b.get('name')} {b.get('version')}"
    except Exception:  # older NumPy
        return "unknown"


def load_warning(rows):
    """A line for the report when other sessions' load spoiled cases."""
    bad = sum(1 for r in rows if not (r[7].isdigit() and r[8].isdigit()))
    if not bad:
        return ""
    return (f"\nWARNING: {bad}/{len(rows)} cases had no clean round on at least one side: "
            "other processes held part of the CPUs throughout, so those numbers measure "
            "their load as much as either GEMM.\n")


def quality(q):
    """Clean rounds as a count, or the least load a side saw when none was clean."""
    return f"{q}" if q >= 0 else f"none (others {100 * -q:.0f}%)"


def main():
    _C.threads(ARGS.threads)
    rng = np.random.default_rng(0)
    rows = []
    header = (f"{'case':<20} {'form':<4} {'M':>6} {'N':>6} {'K':>6}  "
              f"{'ours':>8} {'numpy':>8} {'ratio':>6}  clean rounds ours / numpy")
    print(header)
    for label, form, M, N, K in cases(ARGS.quick):
        (g_ours, q_ours), (g_np, q_np) = run_case(form, M, N, K, rng)
        rows.append((label, form, M, N, K, g_ours, g_np, quality(q_ours), quality(q_np)))
        print(f"{label:<20} {form:<4} {M:>6} {N:>6} {K:>6}  {g_ours:8.1f} {g_np:8.1f} "
              f"{g_ours / g_np:6.2f}  {quality(q_ours)} / {quality(q_np)}", flush=True)
    ratios = np.array([r[5] / r[6] for r in rows])
    summary = (f"ratio ours/numpy: min {ratios.min():.2f}, median {np.median(ratios):.2f}, "
               f"geomean {np.exp(np.log(ratios).mean()):.2f}; "
               f"{(ratios >= 0.8).sum()}/{len(ratios)} cases >= 0.8")
    print(summary)
    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    gemm_path = getattr(_C, "GEMM_ISA", "?")
    lines = ["# CPU GEMM: smedjan._C.gemm vs NumPy matmul (OpenBLAS)", "",
             f"- date: {today()}",
             f"- command: `python3 {cmd}`",
             f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores",
             f"- threads: {ARGS.threads} (smedjan._C.threads and OPENBLAS_NUM_THREADS)",
             f"- smedjan gemm path: {gemm_path}; NumPy {np.__version__}, BLAS {blas_info()}",
             f"- clock: {ARGS.clock}" + (" (this process's CPU time: immune to other "
             "processes' load on the shared machine, not to their use of caches and memory; "
             "every round counts as clean)" if ARGS.clock == "cpu" else " (elapsed time)"),
             f"- timing: rounds alternate ours / NumPy; a round is >= {ARGS.repeats} calls "
             "(about 0.2 s) after 2 warm-up calls, its result the median call; reported is "
             "each side's best clean round; GFLOP/s = 2MNK / time",
             "- the machine is shared with other sessions: a round is clean when other "
             "processes took < 10% of the CPUs during it (from /proc/stat); each case runs "
             f"until both sides have {ARGS.rounds} clean rounds or {ARGS.max_rounds} rounds "
             "were run; 'clean' gives the count per side, or 'none' and the least load seen",
             "- forms: fwd y = x @ W^T (transB), dx = dy @ W, dW += dy^T @ x "
             "(transA, accum; NumPy: the bare matmul, no add)", "",
             "| case | form | M | N | K | ours GFLOP/s | numpy GFLOP/s | ratio | clean ours / numpy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {label} | {form} | {M} | {N} | {K} | {go:.1f} | {gn:.1f} | {go / gn:.2f} | {qo} / {qn} |"
              for label, form, M, N, K, go, gn, qo, qn in rows]
    report("\n".join(lines) + f"\n\n{summary}\n" + load_warning(rows), ARGS.out)
    run = dict(threads=ARGS.threads, clock=ARGS.clock, command=f"python3 {cmd}", gemm_path=gemm_path,
               numpy=np.__version__, blas=blas_info())
    print("appended to", append_results("gemm_cpu", [
        dict(run, case=label, form=form, M=M, N=N, K=K, ours_gflops=go, numpy_gflops=gn,
             ratio=go / gn, clean_ours=qo, clean_numpy=qn)
        for label, form, M, N, K, go, gn, qo, qn in rows]))


if __name__ == "__main__":
    main()
