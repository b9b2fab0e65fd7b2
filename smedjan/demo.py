"""`make demo`: train the tiny preset on real text that every machine has
(the Python standard library's own sources), byte-level, and print the
falling loss."""
from __future__ import annotations

import os
import pathlib
import time

import numpy as np

from .config import Config
from .model import Model
from .trainer import Trainer


def stdlib_corpus(max_bytes: int = 8_000_000) -> np.ndarray:
    """Bytes of the standard library's .py files, in a fixed order."""
    root = pathlib.Path(os.__file__).parent
    chunks, total = [], 0
    for p in sorted(root.rglob("*.py")):
        if "test" in p.parts or "site-packages" in p.parts:
            continue
        b = p.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def run(steps: int = 300, batch_size: int = 16, seq_len: int = 128, seed: int = 0,
        log_every: int = 25) -> list:
    data = stdlib_corpus()
    split = int(len(data) * 0.95)
    train, val = data[:split].astype(np.int32), data[split:].astype(np.int32)
    cfg = Config.preset("tiny", vocab_size=256)
    model = Model(cfg, seed=seed)
    trainer = Trainer(model, lr=2e-3, min_lr=2e-4, warmup=20, steps=steps, weight_decay=0.1)
    rng = np.random.default_rng(seed)

    def batch(src):
        s = rng.integers(0, len(src) - seq_len - 1, batch_size)
        w = np.stack([src[i:i + seq_len + 1] for i in s])
        return w[:, :-1].copy(), w[:, 1:].copy()

    print(f"smedjan demo: tiny preset ({model.n_params:,} params, byte vocabulary) on "
          f"{len(data) / 1e6:.1f} MB of Python standard-library source, {steps} steps of "
          f"{batch_size}x{seq_len} tokens")
    history, t0, seen = [], time.perf_counter(), 0
    for step in range(steps):
        x, y = batch(train)
        r = trainer.step(x, y)
        seen += x.size
        history.append(r.loss)
        if step % log_every == 0 or step == steps - 1:
            vx, vy = batch(val)
            print(f"step {step:4d}  loss {r.loss:.3f}  val {model.loss(vx, vy):.3f}  "
                  f"lr {r.lr:.2e}  |g| {r.grad_norm:.2f}  "
                  f"{seen / (time.perf_counter() - t0):,.0f} tok/s", flush=True)
    print(f"loss {history[0]:.3f} -> {np.mean(history[-20:]):.3f} "
          f"(uniform over bytes would be {np.log(256):.3f})")
    return history


def cmd_demo(args) -> int:
    run(steps=args.steps)
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser("demo", help="train the tiny preset on the stdlib's sources")
    d.add_argument("--steps", type=int, default=300)
    d.set_defaults(func=cmd_demo)
