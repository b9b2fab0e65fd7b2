"""Optimizer step alone, per optimizer: the engine's update (clip + rule over
the flat buffers, gradients already in the model) timed by
Trainer.optimizer_step, on the CPU against AdamW's (issue 25: each within
1.2x) and on the GPU against torch's fused AdamW and torch.optim.Muon on
the same parameter shapes (AdamW and Lion at most torch's fused AdamW's
time; Muon at most 0.8x torch.optim.Muon's). Rows go to
benchmarks/results/optim_step.jsonl via common.append_results.

With --state-dtype, the loss curves instead: each optimizer trains the
same model on real text (Shakespeare from the shared data, else the
standard library's sources) for --steps steps with each state dtype; rows
(the mean loss of each window of 20 steps, and the state's bytes) go to
benchmarks/results/optim_state.jsonl; docs/performance.md tabulates them.

    python3 benchmarks/bench_optim.py --device cpu --size small
    python3 benchmarks/bench_optim.py --device cuda --size gpt2 --dtype bf16
    python3 benchmarks/bench_optim.py --state-dtype fp32,bf16,8bit --size tiny
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import smedjan  # noqa: E402
from common import append_results, median  # noqa: E402

OPTIMIZERS = {"adamw": {}, "lion": {}, "sgd": dict(momentum=0.9, nesterov=True),
              "adafactor": {}, "muon": {}}


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", default=None, help="cuda: fp32 / bf16 (default bf16)")
    p.add_argument("--size", default="small", help="preset (124M: gpt2 where it exists)")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch", action="store_true", help="GPU: torch's fused AdamW and Muon too")
    p.add_argument("--state-dtype", help="loss curves per optimizer state dtype, e.g. "
                                         "fp32,bf16,8bit (instead of the step's time)")
    p.add_argument("--steps", type=int, default=200, help="--state-dtype: steps a curve")
    p.add_argument("--batch", default="2x32", help="--state-dtype: B x T a step")
    return p.parse_args()


def sync_for(device):
    if device != "cuda":
        return lambda: None
    import torch
    return torch.cuda.synchronize


def time_calls(fn, iters, warmup, sync):
    for _ in range(warmup):
        fn()
    sync()
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ms.append(1e3 * (time.perf_counter() - t0))
    return median(ms)


def engine_step_ms(args, optimizer):
    """The update over gradients that stay put: each step consumes (zeroes)
    them, so they are refilled between steps, outside the timed call."""
    model = smedjan.Model(args.size, vocab_size=args.vocab_size, device=args.device,
                          dtype=args.dtype)
    tr = smedjan.Trainer(model, optimizer=optimizer, steps=10 ** 6, clip=1.0,
                         **OPTIMIZERS[optimizer])
    x = np.random.default_rng(0).integers(0, args.vocab_size, (1, 64)).astype(np.int32)
    model.loss(x, x, backward=True)
    saved = np.array(np.asarray(model.flat_grads))
    sync = sync_for(args.device)
    times = []
    for i in range(args.warmup + args.iters):
        model.flat_grads[:] = saved
        sync()
        t0 = time.perf_counter()
        tr.optimizer_step()
        sync()
        if i >= args.warmup:
            times.append(1e3 * (time.perf_counter() - t0))
    return median(times), model


def torch_step_ms(args, model, which):
    """torch on tensors of the model's shapes: fused AdamW over all, or Muon
    over the hidden matrices (AdamW's part not counted)."""
    import torch
    dev = "cuda"
    ps = [torch.nn.Parameter(torch.zeros(tuple(shape), device=dev)) for _, shape, *_ in
          model._h.tensors()]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    if which == "adamw_fused":
        opt = torch.optim.AdamW(ps, lr=3e-4, fused=True)
    else:
        names = [t[0] for t in model._h.tensors()]
        hidden = [p for n, p in zip(names, ps) if p.ndim == 2 and n not in ("tok_emb", "lm_head")]
        opt = torch.optim.Muon(hidden, lr=0.02)
    return time_calls(opt.step, args.iters, args.warmup, torch.cuda.synchronize)


#: the learning rates the curves train with (each optimizer's own scale)
CURVE_LR = {"adamw": 3e-3, "lion": 3e-4, "sgd": 0.3, "adafactor": 1e-2, "muon": 2e-2}
SHAKESPEARE = "/work/shared/data/corpora/tinyshakespeare.txt"


def corpus():
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, "rb") as f:
            return "tinyshakespeare", f.read()
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from conftest import stdlib_text
    return "stdlib", stdlib_text(1_000_000)


def state_curves(args):
    """Byte-level tokens (vocab 256) of real text, the same batches for every run."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from conftest import text_batches
    name, text = corpus()
    B, T = (int(v) for v in args.batch.split("x"))
    rows = []
    for optimizer in OPTIMIZERS:
        for state in args.state_dtype.split(","):
            model = smedjan.Model(args.size, vocab_size=256, device=args.device,
                                  dtype=args.dtype)
            held = model.memory()["bytes"]
            tr = smedjan.Trainer(model, optimizer=optimizer, lr=CURVE_LR[optimizer], warmup=10,
                                 steps=args.steps, optim_state_dtype=state,
                                 **OPTIMIZERS[optimizer])
            state_bytes = model.memory()["bytes"] - held
            t0 = time.perf_counter()
            losses = [tr.step(x, y).loss for x, y in text_batches(text, B, T, args.steps)]
            seconds = time.perf_counter() - t0
            windows = [float(np.mean(losses[i:i + 20])) for i in range(0, len(losses), 20)]
            rows.append(dict(bench="optim_state", optimizer=optimizer, state_dtype=state,
                             device=args.device, dtype=args.dtype or "fp32", size=args.size,
                             params=model.n_params, corpus=name, batch=args.batch,
                             steps=args.steps, state_bytes=state_bytes, loss_windows=windows,
                             seconds=seconds))
            print(f"{optimizer:10s} {state:5s} state {state_bytes / 2 ** 20:7.2f} MiB  loss "
                  + " ".join(f"{w:.3f}" for w in windows), flush=True)
    return rows


def main():
    args = parse()
    if args.state_dtype:
        if args.device == "cuda" and args.dtype is None:
            args.dtype = "bf16"
        card = ""
        if args.device == "cuda":
            import torch
            card = torch.cuda.get_device_name()
        print(append_results("optim_state", state_curves(args), card))
        return
    if args.device == "cuda" and args.dtype is None:
        args.dtype = "bf16"
    rows, base = [], None
    for optimizer in OPTIMIZERS:
        ms, model = engine_step_ms(args, optimizer)
        base = ms if optimizer == "adamw" else base
        rows.append(dict(bench="optim_step", impl="smedjan", optimizer=optimizer,
                         device=args.device, dtype=args.dtype or "fp32", size=args.size,
                         params=model.n_params, ms=ms, vs_adamw=ms / base))
        print(f"{optimizer:10s} {ms:8.2f} ms  ({ms / base:.2f}x AdamW)")
    if args.device == "cuda" and args.torch:
        for which in ("adamw_fused", "muon"):
            ms = torch_step_ms(args, model, which)
            rows.append(dict(bench="optim_step", impl="torch", optimizer=which,
                             device="cuda", dtype="fp32", size=args.size,
                             params=model.n_params, ms=ms))
            print(f"torch {which:10s} {ms:8.2f} ms")
    card = ""
    if args.device == "cuda":
        import torch
        card = torch.cuda.get_device_name()
    print(append_results("optim_step", rows, card))


if __name__ == "__main__":
    main()
