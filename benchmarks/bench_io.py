"""File-reader benchmark: safetensors header validation against the tensor
count, and data-loader batches per second.

    python benchmarks/bench_io.py [--tensors 32000 200000 1000000] [--tokens 50000000]
                                  [--samples 200000] [--out FILE.md]

Headers: n one-byte U8 tensors t0..t{n-1} laid out in order, no CRCs (the
worst case for the name and extent checks per byte of header). Timed:
_C.safetensors_load (engine validation + one memoryview per tensor) and
smedjan.io.load_safetensors (+ one NumPy array per tensor), best of
--repeats, wall and process CPU seconds (CPU is what to compare on a busy
machine). Batches: Batches(TokenFile) over a random uint16/uint32 file,
batches per second (best of 3 windows of 0.7 s) for a few (B, T).
Samples: SampleBatches over a bin2d file of --samples SFT-like rows
(stride 513, lengths uniform in [16, 513], about 40% of positions labels),
batch 64, with each option alone and all together: memory vs mmap, length
buckets 128,256,512, shuffle buffer 512, prefetch 4. The loader alone must
outrun training by far (issue 21: 20x the tiny preset's step rate).
Point PYTHONPATH at another build to compare. Appends one row per measurement
to benchmarks/results/io.jsonl and prints the Markdown tables (written to
--out FILE too when given).
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
    """(batches per second, tokens per batch on average): best of 3 windows."""
    for _ in range(20):
        next(batches)
    best = (0.0, 0.0)
    for _ in range(3):
        n, tokens, t = 0, 0, time.perf_counter()
        while time.perf_counter() - t < 0.7:
            tokens += next(batches)[0].size
            n += 1
        best = max(best, (n / (time.perf_counter() - t), tokens / n))
    return best


def sample_file(path, n_rows, stride=513, seed=0):
    """A bin2d file of random SFT-like rows: lengths in [16, stride], labels
    the second half of each row (one span)."""
    r = np.random.default_rng(seed)
    lengths = r.integers(16, stride + 1, n_rows).astype("<u4")
    with open(path, "wb") as f:
        f.write(b"SMJBIN2D" + struct.pack("<IIQQII", 1, stride, n_rows, n_rows, 1, 0) + bytes(24))
        for s in range(0, n_rows, 8192):
            L = lengths[s:s + 8192]
            t = r.integers(1, 50_000, (len(L), stride)).astype("<u4")
            t[np.arange(stride)[None, :] >= L[:, None]] = 0
            f.write(t.tobytes())
        f.write(lengths.tobytes())
        f.write(np.arange(n_rows + 1, dtype="<u8").tobytes())
        f.write(np.stack([lengths // 2 + 1, lengths], 1).astype("<u4").tobytes())


SAMPLE_OPTIONS = [("memory", {}), ("mmap", {}), ("memory", dict(bucket_sizes=[128, 256, 512])),
                  ("memory", dict(shuffle_buffer=512)), ("memory", dict(prefetch_batches=4)),
                  ("mmap", dict(prefetch_batches=4)),
                  ("memory", dict(bucket_sizes=[128, 256, 512], shuffle_buffer=512, prefetch_batches=4)),
                  ("mmap", dict(bucket_sizes=[128, 256, 512], shuffle_buffer=512, prefetch_batches=4))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", type=int, nargs="*", default=[32_000, 200_000, 1_000_000])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--samples", type=int, default=200_000, help="rows of the bin2d file (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    args = ap.parse_args()
    from smedjan import _C
    from smedjan.data import Batches, SampleBatches, SampleFile, TokenFile, write_tokens
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
        if args.tokens:
            emit("\n| dtype | B | T | order | batches/s | Mtok/s |")
            emit("|---|---:|---:|---|---:|---:|")
        rng = np.random.default_rng(0)
        for dtype in ("uint16", "uint32") if args.tokens else ():
            p = os.path.join(tmp, f"{dtype}.tok")
            chunk = 5_000_000
            write_tokens(p, (rng.integers(0, 50_000, min(chunk, args.tokens - s))
                             for s in range(0, args.tokens, chunk)), dtype=dtype)
            tf = TokenFile(p)
            for B, T, rnd in ((8, 256, True), (32, 1024, True), (32, 1024, False), (64, 128, True),
                              (128, 64, True)):
                bps = batches_per_s(Batches(tf, B, T, random=rnd, seed=0))[0]
                order = "random" if rnd else "sequential"
                emit(f"| {dtype} | {B} | {T} | {order} | {bps:,.0f} | {bps * B * T / 1e6:.0f} |")
                rows.append({"bench": "batches", "dtype": dtype, "B": B, "T": T, "order": order,
                             "batches_per_s": bps})
            del tf
            os.remove(p)
        if args.samples:
            p = os.path.join(tmp, "sft.bin2d")
            sample_file(p, args.samples)
            emit(f"\n| bin2d ({args.samples:,} rows, stride 513) | options | batches/s | Mtok/s |")
            emit("|---|---|---:|---:|")
            for load, opts in SAMPLE_OPTIONS:
                f = SampleFile(p, load=load, vocab_size=50_000)
                with SampleBatches(f, 64, seed=0, **opts) as b:
                    bps, per_batch = batches_per_s(b)
                shown = ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"
                emit(f"| {load} | {shown} | {bps:,.0f} | {bps * per_batch / 1e6:.0f} |")
                rows.append({"bench": "sample_batches", "load": load, "B": 64, **opts, "batches_per_s": bps,
                             "tokens_per_batch": per_batch})
                del f
            # The criterion (issue 21): the loader alone makes batches at least 20x as fast as
            # the tiny preset trains on them, so data never limits a CPU run.
            import smedjan
            model = smedjan.Model("tiny", vocab_size=50_000, seed=0)
            trainer = smedjan.Trainer(model, steps=10)
            with SampleBatches(SampleFile(p, vocab_size=50_000), 64, seed=0) as b:
                x, y = next(b)
                trainer.step(x, y)
                t = time.perf_counter()
                for _ in range(2):
                    trainer.step(*next(b))
                steps_per_s = 2 / (time.perf_counter() - t)
            slowest = min(r["batches_per_s"] for r in rows if r["bench"] == "sample_batches")
            emit(f"\ntiny preset train step on these batches (64 x 512): {steps_per_s:.3f} steps/s; "
                  f"the slowest loader option is {slowest / steps_per_s:,.0f}x that (target 20x)")
            rows.append({"bench": "sample_batches_vs_train", "B": 64, "T": 512,
                         "train_steps_per_s": steps_per_s, "slowest_loader_batches_per_s": slowest,
                         "ratio": slowest / steps_per_s})
            os.remove(p)
    report("\n".join(lines), args.out, echo=False)
    print("appended to", append_results("io", rows))


if __name__ == "__main__":
    main()
