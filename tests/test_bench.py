"""smedjan.bench and `smedjan bench --json`: every field present, measured
(positive, finite), and the step split adds up to a train step. And
benchmarks/results/: one JSONL per benchmark, every row stamped."""
import datetime
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

import smedjan
from smedjan.bench import FIELDS, format_report

TINY = dict(batch_size=2, seq_len=16, iters=3, warmup=1, decode_tokens=2)
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "benchmarks", "results")


def check(r):
    missing = [f for f in FIELDS if f not in r]
    assert not missing, missing
    for k in ("inference_tok_s", "decode_tok_s", "train_tok_s", "step_ms", "forward_ms",
              "optimizer_ms", "peak_bytes", "params"):
        assert r[k] > 0 and math.isfinite(r[k]), (k, r[k])
    assert r["backward_ms"] >= 0
    for k in ("step", "forward", "forward_backward", "optimizer", "inference", "decode_token"):
        t = r["timings"][k]
        assert t["min"] <= t["median"] <= t["max"] and t["n"] >= 1, (k, t)
    assert r["peak_bytes"] >= 4 * 4 * r["params"]     # params, grads, AdamW m and v
    assert r["device"] == "cpu" and r["dtype"] == "fp32"


def test_bench_reports_every_field():
    r = smedjan.bench("tiny", **TINY)
    check(r)
    assert r["params"] == smedjan.Config.preset("tiny").n_params
    assert r["batch_size"] == 2 and r["seq_len"] == 16 and r["timings"]["step"]["n"] == 3


def test_bench_with_levers_reports_them_and_less_planned_memory():
    a = smedjan.bench("tiny", grad_accum=2, **TINY)
    b = smedjan.bench("tiny", gradient_checkpointing=True, fused_ce=True, grad_accum=2, **TINY)
    check(b)
    assert b["levers"] == dict(grad_accum=2, gradient_checkpointing=True, cheap_recompute=False,
                               fused_ce=True, fp16_activations=False)
    assert b["planned_peak_bytes"] < a["planned_peak_bytes"]


def test_bench_cli_json_has_every_field():
    p = subprocess.run([sys.executable, "-m", "smedjan", "bench", "--size", "tiny",
                        "--batch-size", "2", "--seq-len", "16", "--iters", "2", "--warmup", "1",
                        "--decode-tokens", "2", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    check(json.loads(p.stdout))


def test_bench_cli_report_reads_well():
    p = subprocess.run([sys.executable, "-m", "smedjan", "bench", "--size", "tiny",
                        "--batch-size", "1", "--seq-len", "8", "--iters", "2", "--warmup", "1",
                        "--decode-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    for word in ("inference", "decode", "train", "forward", "backward", "optimizer", "peak memory"):
        assert word in p.stdout, (word, p.stdout)


def test_bench_reports_the_routing_of_moe_layers():
    cfg = smedjan.Config.preset("tiny", 256, ffn=["swiglu", "moe"],
                                moe={"n_experts": 4, "top_k": 2, "expert_dim": 64})
    r = smedjan.bench(cfg, **TINY)
    check(r)
    assert r["active_params"] < r["params"]
    assert r["moe"]["dropped"] == 0 and len(r["moe"]["load"]) == 2   # layers 1 and 3
    for load in r["moe"]["load"]:   # every token reaches top_k experts
        assert len(load) == 4 and sum(load) == TINY["batch_size"] * TINY["seq_len"] * 2
    assert "moe          " in format_report(r)
    assert smedjan.bench("tiny", **TINY)["moe"] is None


def test_bench_refuses_a_sequence_longer_than_the_model():
    with pytest.raises(ValueError, match="max_seq_len"):
        smedjan.bench("tiny", batch_size=1, seq_len=10_000, iters=1)


def test_every_result_row_parses_and_says_when_where_and_what():
    files = sorted(glob.glob(os.path.join(RESULTS, "*.jsonl")))
    assert files
    for path in files:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        assert lines, path
        for n, line in enumerate(lines, 1):
            row = json.loads(line)
            where = f"{os.path.basename(path)}:{n}"
            datetime.date.fromisoformat(row["date"])
            assert re.fullmatch(r"[0-9a-f]{7,40}", row["commit"]), (where, row["commit"])
            for k in ("machine", "card"):
                assert isinstance(row[k], str) and row[k], (where, k)


def test_results_hold_one_jsonl_per_benchmark_and_no_dated_snapshot():
    names = sorted(n for n in os.listdir(RESULTS) if n != "__pycache__")
    dated = [n for n in names if re.search(r"\d{4}-\d{2}-\d{2}", n)]
    assert not dated, dated
    other = [n for n in names if not n.endswith(".jsonl") and n not in ("README.md", "index.py")]
    assert not other, other


def test_results_index_lists_every_jsonl():
    spec = importlib.util.spec_from_file_location("results_index", os.path.join(RESULTS, "index.py"))
    index = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(index)
    text = index.render()
    with open(os.path.join(RESULTS, "README.md")) as f:
        readme = f.read()
    for path in glob.glob(os.path.join(RESULTS, "*.jsonl")):
        name = f"`{os.path.basename(path)}`"
        assert name in text and name in readme, name
