"""Per memory lever: the measured peak-memory saving and throughput cost on
one preset (default medium), each configuration in a fresh process (through
smedjan.sweep), against the same effective batch without levers.

    python benchmarks/bench_levers.py --size medium --batch-size 8 --seq-len 128 --steps 3

Columns: engine peak (parameters, grads, AdamW state, activation arena: what
the engine allocated), the arena alone, the activation bytes kept from
forward to backward (what checkpointing shrinks), step time and tok/s.
The last rows train on SFT-like targets (each row's last 40% labelled, the
prompt before it ignored), dense and with the sparse loss, side by side:
tok/s counts every position, as for the dense rows.
Timings on a shared machine are noisy; the memory figures are exact.
Appends one row per configuration to benchmarks/results/levers.jsonl and
prints the Markdown table (written to --out FILE too when given)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smedjan  # noqa: E402
from common import append_results, report  # noqa: E402

LEVERS = [
    ("baseline", {}),
    ("--grad-accum 2", {"grad_accum": 2, "half_batch": True}),
    ("--gradient-checkpointing", {"gradient_checkpointing": True}),
    ("--fused-ce", {"fused_ce": True}),
    ("--fp16-activations", {"fp16_activations": True}),
    ("--gradient-checkpointing --fused-ce", {"gradient_checkpointing": True, "fused_ce": True}),
    ("all four", {"grad_accum": 2, "half_batch": True, "gradient_checkpointing": True,
                  "fused_ce": True, "fp16_activations": True}),
    ("SFT-like targets (40% labelled), dense", {"label_fraction": 0.4}),
    ("--sparse-loss (40% labelled)", {"sparse_loss": True, "label_fraction": 0.4}),
    ("--sparse-loss --label-bucket-sizes 64,128,256,512 (40% labelled)",
     {"sparse_loss": True, "label_bucket_sizes": [64, 128, 256, 512], "label_fraction": 0.4}),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None, help="also write the Markdown table to this file")
    ap.add_argument("--from-jsonl", help="re-render the table from an earlier run's rows "
                                         "(lines of levers.jsonl); appends nothing")
    a = ap.parse_args()
    grid = []
    for name, lv in LEVERS:
        lv = dict(lv)
        half = lv.pop("half_batch", False)
        grid.append(dict(kind=name, batch_size=a.batch_size // 2 if half else a.batch_size, **lv))
    base = dict(size=a.size, seq_len=a.seq_len, steps=a.steps, warmup_steps=a.warmup_steps,
                device=a.device, dtype=a.dtype)
    if a.from_jsonl:
        with open(a.from_jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        rows = smedjan.sweep(grid, base=base, timeout=1800)
    # The plan columns come from the planner (exact and deterministic), for
    # each row's own levers and batch.
    for r in rows:
        c = r["config"]
        m = smedjan.Model(c["size"], seed=0, device="cpu" if c.get("device") != "cuda" else "cuda",
                          dtype=c.get("dtype"))
        m.set_levers(gradient_checkpointing=bool(c.get("gradient_checkpointing")),
                     fused_ce=bool(c.get("fused_ce")),
                     fp16_activations=bool(c.get("fp16_activations")),
                     sparse_loss=bool(c.get("sparse_loss")),
                     label_bucket_sizes=c.get("label_bucket_sizes") or [])
        labels = c["batch_size"] * round(c["seq_len"] * (c.get("label_fraction") or 1.0))
        p = m.plan_memory(c["batch_size"], c["seq_len"], "train", c.get("grad_accum") or 1,
                          labels=labels)
        r["arena_mib"], r["kept_mib"] = p["arena_bytes"] / 2 ** 20, p["kept_bytes"] / 2 ** 20
        r["planned_peak_mib"] = p["peak_bytes"] / 2 ** 20
        del m
    b = rows[0]
    info = smedjan.build_info()
    lines = [f"# Memory levers: {a.size}, effective batch {a.batch_size} x seq {a.seq_len}, "
             f"{a.device}", "",
             f"Measured {datetime.date.today()} with benchmarks/bench_levers.py; "
             f"{info['threads']} engine threads on {info['cpus']} CPUs"
             + (f", GPU {info['gpus']}" if a.device == "cuda" else "") +
             f"; {a.steps} timed steps after {a.warmup_steps} warm-up, each configuration in "
             "its own process. Memory is exact (the engine's own count); times are wall clock "
             "on a shared machine and noisy.", "",
             "| lever | engine peak MiB | planned peak MiB | saved | activation arena MiB | "
             "kept fwd->bwd MiB | step ms | tok/s | throughput cost | ok |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|:--:|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['kind']} | - | - | - | - | - | - | - | - | False ({r.get('error')}) |")
            continue
        saved = b["peak_mib"] - r["peak_mib"] if b["ok"] else None
        cost = (b["tok_s"] / r["tok_s"] - 1) if b["ok"] else None
        lines.append(
            f"| {r['kind']} | {r['peak_mib']:.0f} | {r['planned_peak_mib']:.0f} | "
            + (f"{saved:.0f} MiB ({saved / b['peak_mib']:.0%})" if saved is not None else "-")
            + f" | {r['arena_mib']:.0f} | {r['kept_mib']:.0f} | {r['step_ms']:.0f} | "
            f"{r['tok_s']:,.0f} | " + (f"{cost:+.0%}" if cost is not None else "-") + " | True |")
    report("\n".join(lines), a.out)
    if not a.from_jsonl:
        card = info["gpus"][0] if a.device == "cuda" and info["gpus"] else "none"
        print("appended to", append_results("levers", rows, card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
