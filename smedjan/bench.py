"""smedjan.bench / `smedjan bench`: how fast is this box, measured. Inference
(forward) tok/s, decode (one new token per step) tok/s, and train (forward,
backward, AdamW) tok/s with the step split into its three parts; peak memory
as the engine counts it (and the process's, on the CPU). Warm-up iterations
are run and thrown away; every figure is the median of the timed iterations,
with min, max and standard deviation beside it. Nothing is extrapolated.

Never does: math on the model in Python, or timing that includes building a
plan (the warm-up builds every plan before the clock starts)."""
from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np

log = logging.getLogger("smedjan")
MIB = 1 << 20

#: every key of the dict bench() returns (and `smedjan bench --json` prints)
FIELDS = ("size", "params", "device", "dtype", "build", "threads", "batch_size", "seq_len",
          "iters", "warmup", "levers", "inference_tok_s", "decode_tok_s", "decode_impl",
          "decode_tokens", "train_tok_s", "step_ms", "forward_ms", "backward_ms",
          "optimizer_ms", "timings", "peak_bytes", "peak_mib", "planned_peak_bytes",
          "rss_peak_mib", "active_params", "moe")


def _stats(ms) -> dict:
    ms = list(ms)
    return dict(median=statistics.median(ms), min=min(ms), max=max(ms),
                std=statistics.pstdev(ms) if len(ms) > 1 else 0.0, n=len(ms))


def _timed(fn: Callable[[], object], iters: int, warmup: int, sync: Callable[[], None]) -> dict:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(1e3 * (time.perf_counter() - t0))
    return _stats(out)


def decode_rate(model, prompt, n_tokens: int) -> tuple:
    """(seconds per generated token, implementation name) for n_tokens new
    tokens after prompt, greedy. The one place that picks the decode engine:
    smedjan.infer's KV-cache decoder when this build has one
    (infer.decode_benchmark(model, prompt, n_tokens) -> seconds per token),
    else Model.generate (no KV cache: every token re-runs the whole prefix)."""
    try:
        from . import infer  # noqa: F401  (being written beside this module)
        fn = getattr(infer, "decode_benchmark", None)
    except ImportError:
        fn = None
    if fn is not None:
        impl = "infer (KV cache, CUDA graph)" if getattr(model, "device", "cpu") == "cuda" \
            else "infer (KV cache)"
        return float(fn(model, prompt, n_tokens)), impl
    from .generate import generate
    t0 = time.perf_counter()
    n = sum(1 for _ in generate(model, list(prompt), n_tokens, temperature=0.0, seed=0))
    return (time.perf_counter() - t0) / max(n, 1), "generate (no KV cache)"


def _rss_peak_mib() -> Optional[float]:
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 1024.0 if sys.platform != "darwin" else r / MIB
    except Exception:
        return None


def bench(size="small", *, batch_size: int = 4, seq_len: int = 128, iters: int = 20,
          warmup: int = 3, device: str = "cpu", dtype: Optional[str] = None,
          vocab_size: int = 8192, decode_tokens: int = 16, decode_prompt: int = 16,
          grad_accum: int = 1, gradient_checkpointing: bool = False, fused_ce: bool = False,
          fp16_activations: bool = False, cheap_recompute: bool = False, seed: int = 0,
          progress: bool = False) -> Dict:
    """Measure one configuration; returns a dict with every key in FIELDS.

    size: a preset name, a Config or a config dict. Times are milliseconds
    per iteration (median over `iters`, after `warmup` untimed ones); tok/s
    are batch_size * seq_len (train: times grad_accum) over the median.

    >>> r = bench("tiny", batch_size=1, seq_len=16, iters=2, warmup=1, decode_tokens=2)
    >>> r["train_tok_s"] > 0
    True
    """
    from . import build_info
    from .model import Model
    from .trainer import Trainer
    model = Model(size, seed=seed, vocab_size=vocab_size, device=device, dtype=dtype) \
        if isinstance(size, str) else Model(size, seed=seed, device=device, dtype=dtype)
    cfg = model.config
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    model.set_levers(gradient_checkpointing=gradient_checkpointing, fused_ce=fused_ce,
                     fp16_activations=fp16_activations, cheap_recompute=cheap_recompute)
    trainer = Trainer(model, lr=1e-4, warmup=0, steps=10 ** 9, grad_accum=grad_accum)
    rng = np.random.default_rng(seed)
    B, T, V = batch_size, seq_len, cfg.vocab_size
    x = rng.integers(0, V, (B * grad_accum, T)).astype(np.int32)
    y = rng.integers(0, V, (B * grad_accum, T)).astype(np.int32)
    xm, ym = x[:B], y[:B]

    sync = lambda: None  # noqa: E731  engine calls return when their work is done
    say = (lambda s: print(s, file=sys.stderr)) if progress else log.info

    planned = model.plan_memory(B, T, "train", grad_accum)["peak_bytes"]
    model.reset_peak()
    if model.device == "cuda":
        from . import _C
        _C.cuda_memory(True)
    say("bench: train step")
    step = _timed(lambda: trainer.step(x, y), iters, warmup, sync)
    moe = model.moe_stats   # the last train step's routing (None without MoE layers)
    say("bench: forward / backward / optimizer split")
    # The split, each part on its own: forward = the loss's forward (no
    # backward), forward+backward = the loss with backward, optimizer =
    # clip + AdamW over the gradients it left.
    fwd = _timed(lambda: model.loss(xm, ym), iters, warmup, sync)

    def fwd_bwd():
        model.loss(xm, ym, backward=True)
    fb = _timed(fwd_bwd, iters, warmup, sync)
    opt = _timed(trainer.optimizer_step, iters, warmup, sync)
    peak = model.memory()["peak_bytes"]
    say("bench: inference")
    inf = _timed(lambda: model.forward(xm), iters, warmup, sync)
    say("bench: decode")
    prompt = rng.integers(0, V, decode_prompt).tolist()
    decode_rate(model, prompt, 1)   # warm-up: plans for every length bucket used below
    per, impl = zip(*(decode_rate(model, prompt, decode_tokens) for _ in range(max(1, iters // 5))))
    dec = _stats([1e3 * p for p in per])

    bi = build_info()
    build = {k: bi[k] for k in ("version", "cuda_compiled", "gpus", "cpus") if k in bi}
    tokens = B * T
    out = dict(
        size=size if isinstance(size, str) else "custom", params=model.n_params,
        active_params=cfg.n_active_params, moe=moe,
        device=model.device, dtype=model.dtype, build=build, threads=bi.get("threads"),
        batch_size=B, seq_len=T, iters=iters, warmup=warmup,
        levers=dict(grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing,
                    cheap_recompute=cheap_recompute, fused_ce=fused_ce,
                    fp16_activations=fp16_activations),
        inference_tok_s=tokens / (inf["median"] / 1e3),
        decode_tok_s=1e3 / dec["median"], decode_impl=impl[0], decode_tokens=decode_tokens,
        train_tok_s=tokens * grad_accum / (step["median"] / 1e3),
        step_ms=step["median"], forward_ms=fwd["median"],
        backward_ms=max(fb["median"] - fwd["median"], 0.0), optimizer_ms=opt["median"],
        timings=dict(step=step, forward=fwd, forward_backward=fb, optimizer=opt, inference=inf,
                     decode_token=dec),
        peak_bytes=peak, peak_mib=peak / MIB, planned_peak_bytes=planned,
        rss_peak_mib=_rss_peak_mib() if model.device != "cuda" else None)
    if model.device == "cuda":
        mem = model.memory()
        out["cuda_peak_mib"] = mem.get("cuda_peak_bytes", 0) / MIB
    return out


def format_report(r: Dict) -> str:
    """A human-readable report of one bench() result."""
    t = r["timings"]

    def spread(k):
        s = t[k]
        return f"{s['median']:.2f} ms (min {s['min']:.2f}, max {s['max']:.2f}, sd {s['std']:.2f})"
    lv = ", ".join(f"{k}={v}" for k, v in r["levers"].items() if v not in (False, 1))
    lines = [
        f"smedjan bench: {r['size']} ({r['params']:,} params) on {r['device']} / {r['dtype']}, "
        f"{r['threads']} threads, batch {r['batch_size']} x seq {r['seq_len']}"
        + (f", {lv}" if lv else ""),
        f"  build        {json.dumps(r['build'])}",
        f"  inference    {r['inference_tok_s']:>12,.0f} tok/s   forward {spread('inference')}",
        f"  decode       {r['decode_tok_s']:>12,.1f} tok/s   per token {spread('decode_token')}"
        f"  [{r['decode_impl']}]",
        f"  train        {r['train_tok_s']:>12,.0f} tok/s   step {spread('step')}",
        f"    forward    {r['forward_ms']:.2f} ms   backward {r['backward_ms']:.2f} ms   "
        f"optimizer {r['optimizer_ms']:.2f} ms   (medians, measured apart)",
        f"  peak memory  {r['peak_mib']:.1f} MiB engine (planned "
        f"{r['planned_peak_bytes'] / MIB:.1f} MiB)"
        + (f", process max RSS {r['rss_peak_mib']:.0f} MiB" if r.get("rss_peak_mib") else "")
        + (f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if r.get("cuda_peak_mib") else ""),
        f"  warm-up {r['warmup']} iterations excluded; {r['iters']} timed",
    ]
    if r.get("moe"):   # per MoE layer: aux and z losses, tokens per expert
        m = r["moe"]
        lines.insert(-1, f"  moe          {r['active_params']:,} active params a token; dropped "
                         f"{m['dropped']}; per layer aux " + ", ".join(f"{a:.3f}" for a in m["aux_loss"])
                     + "; load " + " | ".join(" ".join(str(int(n)) for n in load) for load in m["load"]))
    return "\n".join(lines)


def cmd_bench(args) -> int:
    device = "cuda" if args.device is True else (args.device or "cpu")
    if args.threads:
        from . import threads
        threads(args.threads)
    r = bench(args.size, batch_size=args.batch_size, seq_len=args.seq_len, iters=args.iters,
              warmup=args.warmup, device=device, dtype=args.dtype, vocab_size=args.vocab_size,
              decode_tokens=args.decode_tokens, grad_accum=args.grad_accum,
              gradient_checkpointing=args.gradient_checkpointing, fused_ce=args.fused_ce,
              fp16_activations=args.fp16_activations, cheap_recompute=args.cheap_recompute,
              progress=not args.json)
    print(json.dumps(r) if args.json else format_report(r))
    return 0


def add_commands(sub) -> None:
    from .argtypes import nonneg_int, positive_int
    b = sub.add_parser("bench", help="measure inference, decode and training speed",
                       description="Measure inference (forward), decode and train tok/s, the "
                                   "step split and peak memory on this machine.")
    b.add_argument("--size", default="small", help="preset name (default small)")
    b.add_argument("--batch-size", type=positive_int, default=4)
    b.add_argument("--seq-len", type=positive_int, default=128)
    b.add_argument("--iters", type=positive_int, default=20, help="timed iterations (default 20)")
    b.add_argument("--warmup", type=nonneg_int, default=3,
                   help="untimed iterations first (default 3)")
    b.add_argument("--device", nargs="?", const=True, default=None,
                   help="--device alone: cuda; or a name (cpu, cuda)")
    b.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 on CPU, bf16 on CUDA (bf16 and fp16 are CUDA modes)")
    b.add_argument("--vocab-size", type=positive_int, default=8192)
    b.add_argument("--decode-tokens", type=positive_int, default=16)
    b.add_argument("--threads", type=positive_int, help="engine worker threads")
    b.add_argument("--grad-accum", type=positive_int, default=1)
    b.add_argument("--gradient-checkpointing", action="store_true")
    b.add_argument("--cheap-recompute", action="store_true")
    b.add_argument("--fused-ce", action="store_true")
    b.add_argument("--fp16-activations", action="store_true")
    b.add_argument("--json", action="store_true", help="one JSON object with every field")
    b.set_defaults(func=cmd_bench)


if __name__ == "__main__":   # pragma: no cover
    from .cli import main
    sys.exit(main(["bench"] + sys.argv[1:]))
