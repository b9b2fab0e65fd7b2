"""File-reader benchmark: safetensors header validation against the tensor
count, and data-loader batches per second.

    python benchmarks/bench_io.py [--tensors 32000 200000 1000000] [--tokens 50000000]
                                  [--out FILE.md]

Headers: n one-byte U8 tensors t0..t{n-1} laid out in order, no CRCs (the
worst case for the name and extent checks per byte of header). Timed:
_C.safetensors_load (engine validation + one memoryview per tensor) and
smedjan.io.load_safetensors (+ one NumPy array per tensor), best of
--repeats, wall and process CPU seconds (CPU is what to compare on a busy
machine). Batches: Batches(TokenFile) over a random uint16/uint32 file,
batches per second (best of 3 windows of 0.7 s) for a few (B, T). Point
PYTHONPATH at another build to compare. Appends one row per measurement to
benchmarks/results/io.jsonl and prints the Markdown tables (written to --out
FILE too when given).
"""
import argparse
import os
import struct
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import append_results, machine, report, today  # noqa: E402


def header_file(path, n):
    body = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n))
    h = ("{" + body + "}").encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(n))


def timed(fn, repeats):
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        r = fn()
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
        del r
    return best


def batches_per_s(batches):
    for _ in range(20):
        next(batches)
    best = 0.0
    for _ in range(3):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < 0.7:
            next(batches)
            n += 1
        best = max(best, n / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, nargs="*", default=[32_000, 200_000, 1_000_000])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    args = ap.parse_args()
    from smedjan import _C
    from smedjan.data import Batches, TokenFile, write_tokens
    from smedjan.io import load_safetensors
    rows, lines = [], []

    def emit(line):   # printed as measured, kept for the report
        print(line, flush=True)
        lines.append(line)

    emit(f"# bench_io {today()}: {machine()}; smedjan from {os.path.dirname(_C.__file__)}")
    with tempfile.TemporaryDirectory() as tmp:
        emit("\n| tensors | header MB | _C.safetensors_load wall / CPU s | load_safetensors wall / CPU s |")
        emit("|---:|---:|---:|---:|")
        for n in args.tensors:
            p = os.path.join(tmp, f"h{n}.safetensors")
            header_file(p, n)
            c = timed(lambda: _C.safetensors_load(p), args.repeats)
            py = timed(lambda: load_safetensors(p), args.repeats)
            mb = os.path.getsize(p) / 1e6
            emit(f"| {n:,} | {mb:.1f} | {c[0]:.3f} / {c[1]:.3f} | {py[0]:.3f} / {py[1]:.3f} |")
            rows.append({"bench": "safetensors_header", "tensors": n, "c_wall_s": c[0], "c_cpu_s": c[1],
                         "py_wall_s": py[0], "py_cpu_s": py[1]})
            os.remove(p)
        emit("\n| dtype | B | T | order | batches/s | Mtok/s |")
        emit("|---|---:|---:|---|---:|---:|")
        rng = np.random.default_rng(0)
        for dtype in ("uint16", "uint32"):
            p = os.path.join(tmp, f"{dtype}.tok")
            chunk = 5_000_000
            write_tokens(p, (rng.integers(0, 50_000, min(chunk, args.tokens - s))
                             for s in range(0, args.tokens, chunk)), dtype=dtype)
            tf = TokenFile(p)
            for B, T, rnd in ((8, 256, True), (32, 1024, True), (32, 1024, False), (64, 128, True),
                              (128, 64, True)):
                bps = batches_per_s(Batches(tf, B, T, random=rnd, seed=0))
                order = "random" if rnd else "sequential"
                emit(f"| {dtype} | {B} | {T} | {order} | {bps:,.0f} | {bps * B * T / 1e6:.0f} |")
                rows.append({"bench": "batches", "dtype": dtype, "B": B, "T": T, "order": order,
                             "batches_per_s": bps})
            del tf
            os.remove(p)
    report("\n".join(lines), args.out, echo=False)
    print("appended to", append_results("io", rows))


if __name__ == "__main__":
    main()
