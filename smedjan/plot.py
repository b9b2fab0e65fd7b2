"""`smedjan plot`: a run's metrics.jsonl or a sweep's JSONL as a picture.

    smedjan plot ckpt/metrics.jsonl -o run.png     # loss, val loss, lr, tok/s by step
    smedjan plot sweep.jsonl -o sweep.png          # tok/s and peak memory per configuration

In Python, plot_metrics and plot_sweep return a matplotlib Figure (shown
inline in Jupyter) and write a PNG when given `out`. They build the figure
without pyplot, so no backend is chosen for the caller. matplotlib is an
optional dependency (pip install smedjan[demo])."""
from __future__ import annotations

import json
import os
from typing import List, Union

Rows = Union[str, os.PathLike, List[dict]]


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'smedjan[demo]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def read_rows(path) -> List[dict]:
    """The JSON objects of a JSONL file (a folder: its metrics.jsonl);
    ValueError naming file and line for a line that is not one."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "metrics.jsonl")
    rows = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{n}: expected a JSON object")
            rows.append(row)
    if not rows:
        raise ValueError(f"{p}: no rows to plot")
    return rows


def _rows(rows: Rows) -> List[dict]:
    return read_rows(rows) if isinstance(rows, (str, os.PathLike)) else list(rows)


def plot_metrics(rows: Rows, out=None):
    """Training loss (and validation loss where evaluated), learning rate
    and tok/s against the step, from fit's metrics rows."""
    rows = [r for r in _rows(rows) if not r.get("skipped")]
    if not rows or "loss" not in rows[0]:
        raise ValueError("plot_metrics: rows without 'step' and 'loss' (is this a sweep? "
                         "use plot_sweep)")
    fig = _figure(11, 3.4)
    loss_ax, lr_ax, speed_ax = fig.subplots(1, 3)
    steps = [r["step"] for r in rows]
    loss_ax.plot(steps, [r["loss"] for r in rows], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        loss_ax.plot(*zip(*val), "o-", ms=3, label="validation")
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    loss_ax.legend()
    lr_ax.plot(steps, [r["lr"] for r in rows])
    lr_ax.set(xlabel="step", ylabel="learning rate", title="schedule")
    speed_ax.plot(steps, [r["tok_s"] for r in rows], lw=1)
    speed_ax.set(xlabel="step", ylabel="tokens / s", title="throughput")
    for ax in (loss_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    if out is not None:
        fig.savefig(os.fspath(out), dpi=120)
    return fig


def plot_sweep(rows: Rows, out=None):
    """tok/s and peak memory of each sweep configuration; those that did
    not run (out of memory, over the limit) are marked, not dropped."""
    rows = _rows(rows)
    if not rows or "kind" not in rows[0] or "ok" not in rows[0]:
        raise ValueError("plot_sweep: rows without 'kind' and 'ok' (is this a metrics log? "
                         "use plot_metrics)")
    labels = [f"{r['kind']}\nb{r['batch']} a{r['accum']}" for r in rows]
    fig = _figure(max(6.0, 0.7 * len(rows) + 2), 6.5)
    speed_ax, mem_ax = fig.subplots(2, 1, sharex=True)
    x = range(len(rows))
    speed_ax.bar(x, [r.get("tok_s") or 0 for r in rows],
                 color=["tab:blue" if r["ok"] else "tab:gray" for r in rows])
    for i, r in enumerate(rows):
        if not r["ok"]:
            speed_ax.annotate("not ok", (i, 0), ha="center", va="bottom", rotation=90, fontsize=8)
    speed_ax.set(ylabel="tokens / s", title="sweep")
    mem_ax.bar(x, [r.get("peak_mib") or 0 for r in rows], color="tab:orange")
    limits = [r.get("mem_limit_mib") for r in rows]
    if any(limits):
        mem_ax.plot(x, [v or float("nan") for v in limits], "k_", ms=20, label="memory limit")
        mem_ax.legend()
    mem_ax.set(ylabel="peak MiB")
    mem_ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=8)
    for ax in (speed_ax, mem_ax):
        ax.grid(axis="y", alpha=0.3)
    if out is not None:
        fig.savefig(os.fspath(out), dpi=120)
    return fig


def _cmd_plot(args) -> int:
    rows = read_rows(args.file)
    is_sweep = "kind" in rows[0] and "ok" in rows[0]
    out = args.output or os.path.splitext(os.fspath(args.file).rstrip("/"))[0] + ".png"
    (plot_sweep if is_sweep else plot_metrics)(rows, out)
    print(f"{args.file} -> {out}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's metrics.jsonl or a sweep's results to PNG",
                       description="Plot loss, validation loss, lr and tok/s of a training run "
                                   "(metrics.jsonl, or its checkpoint folder), or tok/s and peak "
                                   "memory of a sweep's JSONL.")
    p.add_argument("file", help="metrics.jsonl, a checkpoint folder, or a sweep's .jsonl")
    p.add_argument("-o", "--output", help="PNG to write (default: FILE with .png)")
    p.set_defaults(func=_cmd_plot)


__all__ = ["plot_metrics", "plot_sweep", "read_rows"]
