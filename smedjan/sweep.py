"""smedjan.sweep / `smedjan sweep`: run every configuration of a grid (batch
size, accumulation, sequence length, dtype, levers, preset, any Trainer
option), each in a fresh subprocess, and tabulate tok/s, step time and peak
memory. A configuration that runs out of memory (or over its memory limit,
or crashes) is recorded as not ok and the sweep goes on. Rows go to JSONL
as they finish (a killed sweep keeps what it measured) and to a Markdown
table at the end; with a token file, each row also gets hours per epoch.

Never does: measure two configurations in one process (one's arena, caches
and allocator state would colour the next), or guess a row it could not run."""
from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Union

log = logging.getLogger("smedjan")
MIB = 1 << 20

#: options understood by a sweep row besides Trainer keyword arguments
RUN_KEYS = ("kind", "size", "batch_size", "seq_len", "device", "dtype", "vocab_size", "seed",
            "steps", "warmup_steps", "memory_limit", "data", "threads", "label_fraction",
            "bucket_sizes", "shuffle_buffer", "prefetch_batches", "load")
TRAINER_KEYS = ("lr", "min_lr", "warmup", "weight_decay", "clip", "eps", "grad_accum",
                "gradient_checkpointing", "cheap_recompute", "fused_ce", "fp16_activations",
                "sparse_loss", "label_bucket_sizes",
                "optimizer", "betas", "momentum", "dampening", "nesterov", "beta2_decay", "d",
                "ns_steps", "ns_coefficients", "adjust_lr_fn", "adamw_lr", "adamw_betas",
                "adamw_eps", "param_groups", "decay_embedding", "optim_state_dtype")
#: options whose one value is a list: a grid gives alternatives as a list of lists
LIST_KEYS = ("label_bucket_sizes", "bucket_sizes", "betas", "adamw_betas", "ns_coefficients",
             "param_groups")
DEFAULTS = dict(size="small", batch_size=4, seq_len=128, device="cpu", dtype=None,
                vocab_size=8192, seed=0, steps=10, warmup_steps=2, memory_limit=None, data=None,
                threads=None, grad_accum=1)


def expand(grid: Union[Dict, Iterable[Dict]], base: Optional[Dict] = None) -> List[Dict]:
    """The configurations of a grid: a dict of lists (every combination, in
    order; scalars are fixed values) or a list of dicts (taken as they are),
    each laid over `base` and the defaults.

    >>> [c["batch_size"] for c in expand({"batch_size": [2, 4], "grad_accum": 1})]
    [2, 4]
    >>> [c["label_bucket_sizes"] for c in expand({"label_bucket_sizes": [64, 128]})]
    [[64, 128]]
    """
    base = {**DEFAULTS, **(base or {})}
    if isinstance(grid, dict):
        keys = list(grid)

        def alternatives(k, v):
            if not isinstance(v, (list, tuple)):
                return [v]
            if k in LIST_KEYS and not any(isinstance(x, (list, tuple)) for x in v):
                return [list(v)]
            return list(v)
        vals = [alternatives(k, v) for k, v in grid.items()]
        rows = [dict(zip(keys, combo)) for combo in itertools.product(*vals)]
    else:
        rows = [dict(r) for r in grid]
    out = []
    for r in rows:
        unknown = set(r) - set(RUN_KEYS) - set(TRAINER_KEYS) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"sweep: unknown option(s) {sorted(unknown)}; known: "
                             f"{sorted(set(RUN_KEYS) | set(TRAINER_KEYS))}")
        out.append({**base, **r})
    return out


def kind_of(c: Dict) -> str:
    """A short label: preset, dtype, the optimizer (besides AdamW) and the levers pulled."""
    parts = [str(c.get("size"))]
    if c.get("optimizer") not in (None, "adamw"):
        parts.append(str(c["optimizer"]))
    if c.get("optim_state_dtype") not in (None, "fp32"):
        parts.append(f"state-{c['optim_state_dtype']}")
    if c.get("dtype"):
        parts.append(str(c["dtype"]))
    for k, tag in (("gradient_checkpointing", "ckpt"), ("cheap_recompute", "cheap"),
                   ("fused_ce", "fce"), ("fp16_activations", "f16act"), ("sparse_loss", "sparse")):
        if c.get(k):
            parts.append(tag)
    if c.get("sparse_loss") and c.get("label_bucket_sizes"):
        b = c["label_bucket_sizes"]
        parts.append(f"lbl{b[0]}_{b[-1]}")
    if c.get("bucket_sizes"):
        b = c["bucket_sizes"]
        parts.append(f"bkt{b[0]}_{b[-1]}")
    if c.get("data") and str(c["data"]).endswith(".bin2d"):
        parts.append(f"bin2d_{c.get('load') or 'memory'}")
    for k, tag in (("prefetch_batches", "p"), ("shuffle_buffer", "shuffle")):
        if c.get(k):
            parts.append(f"{tag}{c[k]}")
    return "_".join(parts)


# ---- one configuration, in the child process ------------------------------

def run_one(c: Dict) -> Dict:
    """Train c["steps"] timed steps (after c["warmup_steps"] untimed ones) of
    one configuration in this process; returns the measured row."""
    import numpy as np
    from . import OutOfMemoryError, threads as set_threads
    from .commands import parse_bytes
    from .model import Model
    from .trainer import Trainer
    if c.get("threads"):
        set_threads(int(c["threads"]))
    size = c["size"]
    model = Model(size, seed=c["seed"], vocab_size=c["vocab_size"], device=c["device"],
                  dtype=c["dtype"]) if isinstance(size, str) else \
        Model(size, seed=c["seed"], device=c["device"], dtype=c["dtype"])
    limit = parse_bytes(c.get("memory_limit")) if c.get("memory_limit") else 0
    topts = {k: c[k] for k in TRAINER_KEYS if c.get(k) is not None}
    B, T, n = int(c["batch_size"]), int(c["seq_len"]), int(c.get("grad_accum") or 1)
    model.set_levers(gradient_checkpointing=bool(c.get("gradient_checkpointing")),
                     cheap_recompute=bool(c.get("cheap_recompute")),
                     fused_ce=bool(c.get("fused_ce")),
                     fp16_activations=bool(c.get("fp16_activations")),
                     sparse_loss=bool(c.get("sparse_loss")),
                     label_bucket_sizes=c.get("label_bucket_sizes") or [])
    if c.get("bucket_sizes"):
        T = max(int(b) for b in c["bucket_sizes"])   # memory is planned for the longest batch
    plan = model.plan_memory(B, T, "train", n, optimizer=c.get("optimizer") or "adamw",
                             momentum=c.get("momentum"),
                             optim_state_dtype=c.get("optim_state_dtype") or "fp32")
    if limit and plan["peak_bytes"] > limit:   # refuse before the optimizer state exists
        raise OutOfMemoryError(f"memory limit {limit / MIB:.0f} MiB: planned peak "
                          f"{plan['peak_bytes'] / MIB:.1f} MiB")
    trainer = Trainer(model, steps=10 ** 9, memory_limit=limit or None,
                      **{"lr": 1e-4, **topts})
    data_options = [k for k in ("bucket_sizes", "shuffle_buffer", "prefetch_batches", "load")
                    if c.get(k)]
    if c.get("data"):
        from .data import Batches, SampleBatches, SampleFile, TokenFile, is_sample_file
        if is_sample_file(c["data"]):
            samples = SampleFile(c["data"], load=c.get("load") or "memory",
                                 vocab_size=model.config.vocab_size)
            batches = SampleBatches(samples, B * n, seq_len=None if c.get("bucket_sizes") else T,
                                    bucket_sizes=c.get("bucket_sizes"),
                                    shuffle_buffer=int(c.get("shuffle_buffer") or 0),
                                    prefetch_batches=int(c.get("prefetch_batches") or 0),
                                    seed=c["seed"], val_fraction=0.0)
        else:
            if data_options:
                raise ValueError(f"{data_options[0]} needs a bin2d sample file, and {c['data']} "
                                 "is a token file")
            batches = Batches(TokenFile(c["data"]), B * n, T, split="train", val_fraction=0.0,
                              seed=c["seed"])
        draw = lambda: next(batches)  # noqa: E731
    elif data_options:
        raise ValueError(f"{data_options[0]} needs data (a bin2d sample file)")
    else:
        rng = np.random.default_rng(c["seed"])
        V = model.config.vocab_size
        # SFT-like targets with label_fraction < 1: each row's prompt (the
        # first part) ignored, its answer labelled
        frac = float(c.get("label_fraction") or 1.0)
        if not 0 < frac <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {frac}")
        prompt = T - int(round(T * frac))

        def draw():
            x = rng.integers(0, V, (B * n, T)).astype(np.int32)
            y = rng.integers(0, V, (B * n, T)).astype(np.int32)
            y[:, :prompt] = -1
            return x, y
    for _ in range(int(c["warmup_steps"])):
        trainer.step(*draw())
    ms, losses, tokens = [], [], 0
    for _ in range(int(c["steps"])):
        t0 = time.perf_counter()                # the batch's wait counts: prefetch is measured
        x, y = draw()
        r = trainer.step(x, y)
        ms.append(1e3 * (time.perf_counter() - t0))
        losses.append(r.loss)
        tokens += x.size
    step_ms = sum(ms) / len(ms)
    mem = model.memory()
    peak = mem.get("cuda_peak_bytes") or mem["peak_bytes"]
    return dict(ok=True, tok_s=tokens / (sum(ms) / 1e3), step_ms=step_ms,
                step_ms_min=min(ms), step_ms_max=max(ms), peak_mib=peak / MIB,
                planned_peak_mib=plan["peak_bytes"] / MIB, arena_mib=plan["arena_bytes"] / MIB,
                kept_mib=plan["kept_bytes"] / MIB, loss=float(losses[-1]),
                params=model.n_params, device=model.device, dtype=model.dtype)


def _child_main(spec: str) -> int:
    c = json.loads(spec)
    try:
        row = run_one(c)
    except MemoryError as e:
        print(json.dumps(dict(ok=False, error=f"out of memory: {e}")), flush=True)
        return 3
    print(json.dumps(row), flush=True)
    return 0


# ---- the sweep, in the parent ----------------------------------------------

def _child_env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_child(c: Dict, timeout: float) -> Dict:
    cmd = [sys.executable, "-m", "smedjan.sweep", "--run-one", json.dumps(c)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired:
        return dict(ok=False, error=f"timed out after {timeout:.0f} s")
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            row = json.loads(line)
            break
        except ValueError:
            continue
    else:
        tail = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        if p.returncode < 0:
            tail = f"killed by signal {-p.returncode} (out of memory?): {tail}"
        return dict(ok=False, error=tail[:300])
    if p.returncode != 0 and row.get("ok"):
        row = dict(ok=False, error=f"exit status {p.returncode}")
    return row


def _epoch_tokens(data: Optional[str]) -> Optional[int]:
    if not data:
        return None
    from .data import SampleFile, TokenFile, is_sample_file
    if is_sample_file(data):
        return int(SampleFile(data, load="mmap").lengths.sum())
    return len(TokenFile(data))


def sweep(grid, *, base: Optional[Dict] = None, out: Optional[str] = None,
          timeout: float = 600.0, progress: bool = True) -> List[Dict]:
    """Run every configuration of `grid` (see expand) in its own subprocess.

    Returns one row per configuration: kind, batch, accum, seq_len, tok_s,
    step_ms (averages over the timed steps), peak_mib, mem_limit_mib, ok
    (False with `error` when it ran out of memory, crossed its memory limit
    or failed), the configuration itself, and epoch_hours when it trains
    from a token file (`data`). With out="dir/name", rows are appended to
    name.jsonl as they finish and name.md holds the table at the end.

    >>> # rows = sweep({"batch_size": [4, 8, 16], "grad_accum": [1, 2]},
    >>> #              base={"size": "small", "seq_len": 256}, out="results/sweep")
    """
    configs = expand(grid, base)
    jsonl = open(out + ".jsonl", "a") if out else None
    if out and os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(configs), unit="config", desc="sweep", disable=None)
    epoch_cache = {}
    try:
        for c in configs:
            t0 = time.perf_counter()
            res = _run_child(c, timeout)
            limit = c.get("memory_limit")
            if limit:
                from .commands import parse_bytes
                limit = parse_bytes(limit) / MIB
            row = dict(kind=c.get("kind") or kind_of(c), batch=c["batch_size"],
                       accum=c.get("grad_accum") or 1, seq_len=c["seq_len"],
                       tok_s=res.get("tok_s"), step_ms=res.get("step_ms"),
                       peak_mib=res.get("peak_mib"), mem_limit_mib=limit or None,
                       ok=bool(res.get("ok")), **{k: v for k, v in res.items()
                                                  if k not in ("ok", "tok_s", "step_ms",
                                                               "peak_mib")},
                       config=c, wall_s=time.perf_counter() - t0)
            if c.get("data") and row["ok"]:
                if c["data"] not in epoch_cache:
                    epoch_cache[c["data"]] = _epoch_tokens(c["data"])
                row["epoch_tokens"] = epoch_cache[c["data"]]
                row["epoch_hours"] = row["epoch_tokens"] / row["tok_s"] / 3600.0
            rows.append(row)
            if jsonl:
                jsonl.write(json.dumps(row) + "\n")
                jsonl.flush()
            if bar is not None:
                bar.update(1)
            log.info("sweep: %s batch %s accum %s: %s", row["kind"], row["batch"], row["accum"],
                     f"{row['tok_s']:,.0f} tok/s" if row["ok"] else row.get("error"))
    finally:
        if bar is not None:
            bar.close()
        if jsonl:
            jsonl.close()
    if out:
        with open(out + ".md", "w") as f:
            f.write(to_markdown(rows) + "\n")
        with open(out + ".csv", "w", newline="") as f:
            f.write(to_csv(rows))
    return rows


#: seed 001's columns, in its order
CSV_COLUMNS = ("kind", "bs", "acc", "prefetch", "bucket", "sparse", "mem_limit_mb", "steps",
               "tok_avg", "step_ms_avg", "mem_peak_mib", "ok")


def to_csv(rows: List[Dict]) -> str:
    """The sweep as seed 001's CSV (CSV_COLUMNS). bucket: the label buckets
    of a sparse-loss row, else the length buckets, comma-joined."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        c = r.get("config") or {}
        buckets = (c.get("label_bucket_sizes") if c.get("sparse_loss") else None) or \
            c.get("bucket_sizes") or []
        num = (lambda v, fmt: "" if v is None else format(v, fmt))  # noqa: E731
        w.writerow([r["kind"], r["batch"], r["accum"], c.get("prefetch_batches") or 0,
                    ",".join(str(b) for b in buckets), int(bool(c.get("sparse_loss"))),
                    num(r.get("mem_limit_mib"), ".0f"), c.get("steps", ""),
                    num(r.get("tok_s"), ".0f"), num(r.get("step_ms"), ".2f"),
                    num(r.get("peak_mib"), ".0f"), "ok" if r["ok"] else "not ok"])
    return buf.getvalue()


def to_markdown(rows: List[Dict]) -> str:
    """The sweep table: kind | batch | accum | tok/s avg | step ms avg |
    peak MiB | mem limit MiB | ok (plus hours/epoch when measured)."""
    epoch = any(r.get("epoch_hours") is not None for r in rows)
    head = "| kind | batch | accum | seq | tok/s avg | step_ms avg | mem_peak MiB | mem_limit MiB | ok |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|:--:|"
    if epoch:
        head += " h/epoch |"
        rule += "---:|"
    lines = [head, rule]

    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"
    for r in rows:
        line = (f"| {r['kind']} | {r['batch']} | {r['accum']} | {r['seq_len']} | "
                f"{num(r.get('tok_s'), ',.0f')} | {num(r.get('step_ms'), '.1f')} | "
                f"{num(r.get('peak_mib'), '.0f')} | {num(r.get('mem_limit_mib'), '.0f')} | "
                f"{r['ok']} |")
        if epoch:
            line += f" {num(r.get('epoch_hours'), '.2f')} |"
        lines.append(line)
    errors = [r for r in rows if not r["ok"]]
    if errors:
        lines.append("")
        lines += [f"- {r['kind']} batch {r['batch']} accum {r['accum']}: {r.get('error')}"
                  for r in errors]
    return "\n".join(lines)


def _values(text: Optional[str], cast):
    if text is None:
        return None
    out = []
    for t in str(text).split(","):
        t = t.strip()
        if cast is bool:
            if t.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected on/off, got {t!r}")
            out.append(t.lower() in ("on", "true", "1", "yes"))
        else:
            out.append(cast(t))
    return out


def cmd_sweep(args) -> int:
    grid = {}
    for key, flag, cast in (("size", "size", str), ("batch_size", "batch_size", int),
                            ("grad_accum", "grad_accum", int), ("seq_len", "seq_len", int),
                            ("dtype", "dtype", str), ("optimizer", "optimizer", str),
                            ("optim_state_dtype", "optim_state_dtype", str),
                            ("gradient_checkpointing", "gradient_checkpointing", bool),
                            ("cheap_recompute", "cheap_recompute", bool),
                            ("fused_ce", "fused_ce", bool),
                            ("fp16_activations", "fp16_activations", bool),
                            ("sparse_loss", "sparse_loss", bool),
                            ("label_fraction", "label_fraction", float),
                            ("shuffle_buffer", "shuffle_buffer", int),
                            ("prefetch_batches", "prefetch_batches", int),
                            ("load", "load", str)):
        v = _values(getattr(args, flag), cast)
        if v is not None:
            grid[key] = v
    if args.label_bucket_sizes:
        grid["label_bucket_sizes"] = [args.label_bucket_sizes]
    if args.bucket_sizes:
        grid["bucket_sizes"] = [args.bucket_sizes]
    if args.grid:
        grid.update(args.grid)
    base = dict(steps=args.steps, warmup_steps=args.warmup_steps, device=args.device,
                data=args.data, memory_limit=args.memory_limit, threads=args.threads)
    rows = sweep(grid, base={k: v for k, v in base.items() if v is not None}, out=args.out,
                 timeout=args.timeout)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(to_markdown(rows))
        if args.out:
            print(f"\nwritten: {args.out}.md, {args.out}.jsonl, {args.out}.csv")
    return 0


def add_commands(sub) -> None:
    from .argtypes import (ascending_sizes, byte_size, int_list, json_object, nonneg_int,
                           on_off_list, positive_float, positive_int)
    s = sub.add_parser("sweep", help="measure a grid of training configurations",
                       description="Run every combination of the comma-separated values, each in "
                                   "a fresh process; one that runs out of memory is recorded as "
                                   "not ok and the sweep goes on.")
    s.add_argument("--size", help="preset(s), e.g. tiny,small (default small)")
    s.add_argument("--batch-size", type=int_list(1), help="e.g. 2,4,8 (default 4)")
    s.add_argument("--grad-accum", type=int_list(1), help="e.g. 1,2 (default 1)")
    s.add_argument("--seq-len", type=int_list(1), help="e.g. 128,256 (default 128)")
    s.add_argument("--dtype", help="fp32 / bf16 / fp16 (bf16, fp16: CUDA)")
    s.add_argument("--optimizer", help="e.g. adamw,lion,muon (settings: --grid '{\"momentum\": "
                                       "[0.9]}')")
    s.add_argument("--optim-state-dtype", help="e.g. fp32,bf16,8bit")
    s.add_argument("--gradient-checkpointing", type=on_off_list, help="off,on")
    s.add_argument("--cheap-recompute", type=on_off_list, help="off,on")
    s.add_argument("--fused-ce", type=on_off_list, help="off,on")
    s.add_argument("--fp16-activations", type=on_off_list, help="off,on")
    s.add_argument("--sparse-loss", type=on_off_list, help="off,on")
    s.add_argument("--label-bucket-sizes", type=ascending_sizes,
                   help="one set, e.g. 64,128,256,512 (several: --grid)")
    s.add_argument("--label-fraction", help="random data: the labelled share of each row's "
                                            "targets, its end (SFT-like), e.g. 0.4,1")
    s.add_argument("--bucket-sizes", type=ascending_sizes,
                   help="bin2d data: length buckets, one set, e.g. 128,256,512")
    s.add_argument("--shuffle-buffer", help="bin2d data: shuffle buffer rows, e.g. 0,512,2048")
    s.add_argument("--prefetch-batches", help="bin2d data: batches made ahead on a thread, e.g. 0,4")
    s.add_argument("--load", help="bin2d data: memory,mmap")
    s.add_argument("--grid", type=json_object,
                   help='more options as JSON, e.g. \'{"lr": [1e-3, 3e-4]}\'')
    s.add_argument("--device", default=None, help="cpu (default) or cuda")
    s.add_argument("--steps", type=positive_int, default=10, help="timed steps per configuration")
    s.add_argument("--warmup-steps", type=nonneg_int, default=2, help="untimed steps first")
    s.add_argument("--memory-limit", type=byte_size,
                   help="per configuration, e.g. 4GiB: over it = not ok")
    s.add_argument("--data", help="token file or bin2d sample file: train on it (a token file "
                                  "also gives hours per epoch)")
    s.add_argument("--threads", type=positive_int, help="engine worker threads in each run")
    s.add_argument("--timeout", type=positive_float, default=600.0,
                   help="seconds per configuration")
    s.add_argument("--out", help="write OUT.md, OUT.jsonl and OUT.csv (seed 001's columns)")
    s.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    s.set_defaults(func=cmd_sweep)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run-one":
        sys.exit(_child_main(sys.argv[2]))
    from .cli import main
    sys.exit(main(["sweep"] + sys.argv[1:]))
