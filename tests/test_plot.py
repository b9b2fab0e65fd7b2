"""`smedjan plot` and smedjan.plot: a run's metrics and a sweep's rows as PNGs."""
import json
import subprocess
import sys

import numpy as np
import pytest

import smedjan
from smedjan.data import Batches, TokenFile, write_tokens
from smedjan.loop import fit
from smedjan.plot import plot_metrics, plot_sweep

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "smedjan", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    write_tokens(d / "data.tok", [np.random.default_rng(0).integers(0, 64, 20_000)])
    model = smedjan.Model(smedjan.Config.custom(32, 1, 2, 1, vocab_size=64), seed=0)
    data = TokenFile(d / "data.tok")
    fit(smedjan.Trainer(model, lr=3e-3, steps=12), Batches(data, 2, 16),
        Batches(data, 2, 16, split="val"), eval_every=4, eval_batches=2,
        checkpoint_dir=str(d / "ck"), progress=False)
    return d / "ck"


SWEEP = [dict(kind="small", batch=4, accum=1, seq_len=128, tok_s=1200.0, step_ms=400.0,
              peak_mib=900.0, mem_limit_mib=2048.0, ok=True),
         dict(kind="small", batch=64, accum=1, seq_len=128, tok_s=None, step_ms=None,
              peak_mib=None, mem_limit_mib=2048.0, ok=False, error="over the memory limit")]


def test_metrics_figure_has_loss_validation_lr_and_speed(run_dir, tmp_path):
    fig = plot_metrics(run_dir / "metrics.jsonl", tmp_path / "m.png")
    loss_ax, lr_ax, speed_ax = fig.axes
    assert [len(l.get_xdata()) for l in loss_ax.lines] == [12, 3]     # 12 steps, 3 evaluations
    assert len(lr_ax.lines[0].get_xdata()) == 12 and speed_ax.lines
    assert (tmp_path / "m.png").read_bytes().startswith(PNG)


def test_sweep_figure_marks_configurations_that_did_not_run(tmp_path):
    fig = plot_sweep(SWEEP, tmp_path / "s.png")
    speed_ax, mem_ax = fig.axes
    assert [b.get_height() for b in speed_ax.patches] == [1200.0, 0]
    assert [t.get_text() for t in speed_ax.texts] == ["not ok"]
    assert (tmp_path / "s.png").read_bytes().startswith(PNG)


def test_cli_plots_a_run_folder_and_a_sweep_file(run_dir, tmp_path):
    r = cli("plot", str(run_dir), "-o", str(tmp_path / "run.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run.png").read_bytes().startswith(PNG)
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("".join(json.dumps(row) + "\n" for row in SWEEP))
    assert cli("plot", str(sweep)).returncode == 0
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG)


def test_cli_names_the_file_and_line_that_is_not_json(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{oops\n')
    r = cli("plot", str(bad))
    assert r.returncode == 1 and f"{bad}:2: invalid JSON" in r.stderr
    assert not (tmp_path / "metrics.png").exists()
