"""Trainer.fit: the loop you can leave running. Evaluation every N steps,
checkpoints (latest and best by validation loss) written atomically, a
weights-only final file, a JSONL metrics log and a tqdm progress bar.
Resuming restores weights, optimizer state, step, skip counts and the data
loader's exact position, so the trajectory continues bit for bit.

Skipped steps (non-finite gradients, batches with no targets) and loss
spikes show in each metrics row (skipped, skipped_steps, spike, loss_z) and
in the progress line (skipped=N); a skipped step's row carries the number of
the step it tried, which the next row makes again."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Optional

import numpy as np

log = logging.getLogger("smedjan")

LATEST, BEST, FINAL = "latest.safetensors", "best.safetensors", "final.safetensors"


def evaluate(model, batches, n_batches: int) -> float:
    """Mean loss per target over the next n_batches of a validation loader
    (batches whose targets are all ignored count for nothing)."""
    total, count = 0.0, 0
    for _ in range(n_batches):
        x, y = next(batches)
        n = int(y.size if y.dtype == np.uint16 else np.count_nonzero(y != -1))
        if n:
            total += model.loss(x, y) * n
            count += n
    return total / count if count else math.nan


def concat_batches(batches, pad_id: int = 0):
    """Batches stacked into one: those of a shorter T (length buckets) are
    padded at the end (inputs pad_id, targets ignored), which changes no
    loss under causal attention."""
    T = max(x.shape[1] for x, _ in batches)
    xs = [np.pad(x, ((0, 0), (0, T - x.shape[1])), constant_values=pad_id) for x, _ in batches]
    ys = [np.pad(y, ((0, 0), (0, T - y.shape[1])), constant_values=-1) for _, y in batches]
    return np.concatenate(xs), np.concatenate(ys)


def _row(r, step: int, tok_s: float, elapsed: float) -> dict:
    """A metrics row for one step's result (step: the step it made or,
    skipped, tried)."""
    return dict(step=step, loss=r.loss, grad_norm=r.grad_norm, lr=r.lr, tok_s=tok_s,
                elapsed=elapsed, skipped=r.skipped, skipped_steps=r.skipped_steps,
                spike=r.spike, loss_z=r.loss_z)


def _moe_fields(model) -> dict:
    """The MoE layers' routing in the step's forward (Model.moe_stats), one
    entry per MoE layer; nothing for a model without them."""
    st = model.moe_stats
    if st is None:
        return {}
    return dict(moe_aux_loss=st["aux_loss"], moe_z_loss=st["z_loss"], moe_load=st["load"],
                moe_dropped=st["dropped"])


def _postfix(row: dict) -> dict:
    """The progress line's fields for a metrics row."""
    post = dict(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.1e}", tok_s=f"{row['tok_s']:,.0f}")
    if "val_loss" in row:
        post["val"] = f"{row['val_loss']:.3f}"
    if row.get("skipped_steps"):
        post["skipped"] = str(row["skipped_steps"])
    return post


def _remove_stale_temporaries(checkpoint_dir: str) -> None:
    """A process killed mid-save leaves "<name>.tmp.<pid>" (never a file
    under a final name); drop those of processes that no longer run, so
    crashes do not pile up checkpoint-sized files."""
    for name in os.listdir(checkpoint_dir):
        base, sep, pid = name.rpartition(".tmp.")
        if not sep or base not in (LATEST, BEST, FINAL) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue                            # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                            # alive, another user's
        try:
            os.remove(os.path.join(checkpoint_dir, name))
            log.info("removed %s, left by a save that was interrupted", name)
        except FileNotFoundError:
            pass


def fit(trainer, train, val=None, *, eval_every: int = 100, eval_batches: int = 10,
        checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
        resume: bool = False, metrics_file: Optional[str] = None, progress: bool = True,
        max_steps: Optional[int] = None, reset_optimizer: bool = False) -> list:
    """Train until trainer.steps (or max_steps more steps in this call).

    train, val: loaders yielding (x, y) int32 batches with state_dict() /
    load_state_dict() (smedjan.data.Batches or SampleBatches, whose T may
    change from batch to batch). Returns the metrics rows.
    Resuming refuses a checkpoint of another optimizer unless
    reset_optimizer (see checkpoint.restore).
    A skipped step draws the next batch and tries again; the Trainer's
    non-finite policy (max_skipped_steps) raises FloatingPointError out of
    fit after its row is written.

    >>> # fit(trainer, Batches(TokenFile("data.tok"), 8, 256), checkpoint_dir="ckpt")
    """
    from . import checkpoint as ck
    for name, v, least in (("eval_every", eval_every, 1), ("eval_batches", eval_batches, 1),
                           ("checkpoint_every", checkpoint_every, 0), ("max_steps", max_steps, 0)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < least):
            raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
    model = trainer.model
    best = math.inf
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        _remove_stale_temporaries(checkpoint_dir)
        metrics_file = metrics_file or os.path.join(checkpoint_dir, "metrics.jsonl")
    latest = os.path.join(checkpoint_dir, LATEST) if checkpoint_dir else None
    if resume and latest and os.path.exists(latest):
        c = ck.load_checkpoint(latest)
        ck.restore(c, model, trainer, reset_optimizer=reset_optimizer)
        state = c.loader or {}
        if state.get("train"):
            train.load_state_dict(state["train"])
        if val is not None and state.get("val"):
            val.load_state_dict(state["val"])
        best = (c.extra or {}).get("best_val_loss") or math.inf
        log.info("resumed from %s at step %d", latest, trainer.step_count)
    elif resume and latest:
        log.info("no checkpoint in %s: starting fresh", checkpoint_dir)

    def save(path, val_loss=None):
        loader = {"train": train.state_dict(), "val": val.state_dict() if val is not None else None}
        extra = {"best_val_loss": best if math.isfinite(best) else None}
        if val_loss is not None:
            extra["val_loss"] = val_loss
        ck.save_checkpoint(path, model, trainer, step=trainer.step_count, loader_state=loader,
                           extra=extra)

    end = trainer.steps if max_steps is None else min(trainer.steps, trainer.step_count + max_steps)
    rows, t_start = [], time.perf_counter()
    metrics = open(metrics_file, "a") if metrics_file else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=end, initial=trainer.step_count, unit="step", disable=None,
                   dynamic_ncols=True)
    tokens_seen, t_window = 0, time.perf_counter()
    try:
        accum = getattr(trainer, "grad_accum", 1)
        while trainer.step_count < end:
            if accum > 1:                       # N loader batches make one step's batch
                x, y = concat_batches([next(train) for _ in range(accum)], getattr(train, "pad_id", 0))
            else:
                x, y = next(train)
            tokens_seen += x.size
            try:
                r = trainer.step(x, y)
            except FloatingPointError as e:     # the row of the step that gave up, then out
                if metrics and getattr(e, "result", None) is not None:
                    now = time.perf_counter()
                    row = _row(e.result, trainer.step_count + 1,
                               tokens_seen / max(now - t_window, 1e-9), now - t_start)
                    metrics.write(json.dumps({**row, "error": str(e)}) + "\n")
                    metrics.flush()
                raise
            step = trainer.step_count          # steps done, 1-based
            now = time.perf_counter()
            row = _row(r, step + 1 if r.skipped else step, tokens_seen / max(now - t_window, 1e-9),
                       now - t_start)
            row.update(_moe_fields(model))      # before an evaluation's forward replaces them
            last = step == end and not r.skipped
            if r.skipped:
                pass                            # nothing changed: no evaluation, no checkpoint
            elif val is not None and (step % eval_every == 0 or last):
                v = evaluate(model, val, eval_batches)
                row.update(val_loss=v, ppl=math.exp(min(v, 50.0)))
                if checkpoint_dir and v < best:
                    best = v
                    save(os.path.join(checkpoint_dir, BEST), v)
            if not r.skipped and checkpoint_dir and (
                    (checkpoint_every and step % checkpoint_every == 0) or last):
                save(latest, row.get("val_loss"))
            rows.append(row)
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if bar is not None:
                bar.update(0 if r.skipped else 1)
                bar.set_postfix(_postfix(row), refresh=False)
            if step % 50 == 0 and not r.skipped:
                tokens_seen, t_window = 0, time.perf_counter()
        if checkpoint_dir and trainer.step_count >= trainer.steps:
            ck.save_weights(os.path.join(checkpoint_dir, FINAL), model)
    finally:
        if bar is not None:
            bar.close()
        if metrics:
            metrics.close()
    return rows
