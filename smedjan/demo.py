"""`make demo`: the whole job on a fresh machine, on real text every
machine has (the Python standard library's own sources): train a
tokenizer, prepare a token file, train the small preset for a few minutes
with checkpoints, plot the loss curve to a PNG and generate a sample."""
from __future__ import annotations

import json
import os
import pathlib
import time


def stdlib_corpus(path: str, max_bytes: int = 12_000_000) -> str:
    """Concatenate the standard library's .py files (tests excluded) into path."""
    root = pathlib.Path(os.__file__).parent
    total = 0
    with open(path, "wb") as out:
        for p in sorted(root.rglob("*.py")):
            if "test" in p.parts or "tests" in p.parts or "site-packages" in p.parts:
                continue
            b = p.read_bytes()
            out.write(b + b"\n")
            total += len(b) + 1
            if total >= max_bytes:
                break
    return path


def plot(metrics_file: str, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in open(metrics_file)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    ev = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("smedjan demo: small preset on Python stdlib sources")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run(out_dir: str = "runs/demo", minutes: float = 3.0, steps: int = None, size: str = "small",
        vocab_size: int = 8192, batch_size: int = 8, seq_len: int = 128) -> dict:
    from . import commands
    from .data import Batches, TokenFile
    from .generate import generate
    from .loop import FINAL, fit
    from .model import Model
    from .tokenizer import Tokenizer
    from .trainer import Trainer
    os.makedirs(out_dir, exist_ok=True)
    corpus = stdlib_corpus(os.path.join(out_dir, "corpus.txt"))
    t0 = time.perf_counter()
    tok = Tokenizer.train(files=[corpus], vocab_size=vocab_size)
    tok_path = os.path.join(out_dir, commands.TOKENIZER_FILE)
    tok.save(tok_path)
    print(f"1. tokenizer: {tok!r} in {time.perf_counter() - t0:.1f}s")
    data_path = os.path.join(out_dir, "corpus.tok")
    n = commands.prepare([corpus], tok, data_path)
    print(f"2. prepared {n:,} tokens -> {data_path}")
    data = TokenFile(data_path)
    from . import cuda_available
    device = "cuda" if cuda_available() else "cpu"
    model = Model(size, vocab_size=len(tok), seed=0, device=device)
    if steps is None:   # size the run to the time budget from a short measurement
        probe = Trainer(model, lr=0.0, steps=3)
        x, y = next(Batches(data, batch_size, seq_len, seed=99))
        probe.step(x, y)
        t = time.perf_counter()
        probe.step(x, y)
        steps = max(50, int(minutes * 60 / (time.perf_counter() - t) * 0.8))
        model = Model(size, vocab_size=len(tok), seed=0, device=device)
    trainer = Trainer(model, lr=2e-3, min_lr=2e-4, warmup=min(50, steps // 10), steps=steps)
    ckpt = os.path.join(out_dir, "checkpoints")
    if os.path.isdir(ckpt):
        for f in os.listdir(ckpt):
            os.remove(os.path.join(ckpt, f))
    print(f"3. training {model!r} on {device} for {steps} steps of {batch_size}x{seq_len} tokens")
    rows = fit(trainer, Batches(data, batch_size, seq_len, seed=0),
               Batches(data, batch_size, seq_len, split="val", seed=1),
               eval_every=max(10, steps // 10), eval_batches=8, checkpoint_dir=ckpt,
               checkpoint_every=max(10, steps // 5))
    for r in rows:
        if "val_loss" in r:
            print(f"   step {r['step']:5d}  loss {r['loss']:.3f}  val {r['val_loss']:.3f}  "
                  f"ppl {r['ppl']:8.1f}  {r['tok_s']:,.0f} tok/s")
    png = os.path.join(out_dir, "loss.png")
    plot(os.path.join(ckpt, "metrics.jsonl"), png)
    print(f"4. checkpoints in {ckpt}: {sorted(os.listdir(ckpt))}; loss curve -> {png}")
    final = commands.load_for_inference(os.path.join(ckpt, FINAL), tok_path)
    prompt = "def "
    sample = final.tokenizer.decode(list(generate(final, prompt, 80, temperature=0.8, top_k=40,
                                                  seed=0)))
    print("5. sample:\n" + prompt + sample)
    return {"rows": rows, "png": png, "sample": sample}


def cmd_demo(args) -> int:
    run(args.out, minutes=args.minutes, steps=args.steps)
    return 0


def add_commands(sub) -> None:
    from .argtypes import positive_float, positive_int
    d = sub.add_parser("demo", help="the whole job on the stdlib's sources: tokenizer, data, "
                                    "training, checkpoints, plot, sample")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--minutes", type=positive_float, default=3.0, help="training time budget")
    d.add_argument("--steps", type=positive_int, help="fixed step count instead of a time budget")
    d.set_defaults(func=cmd_demo)
