"""smedjan.sweep: each configuration in its own process; one that cannot fit
(over its memory limit) is recorded as not ok and the others still run;
rows go to Markdown and JSONL; with a token file, hours per epoch."""
import json

import numpy as np
import pytest

import smedjan
from smedjan.sweep import expand, to_markdown

BASE = dict(size="tiny", seq_len=16, steps=2, warmup_steps=1)


def test_expand_is_the_cartesian_product_over_the_base():
    cs = expand({"batch_size": [1, 2], "grad_accum": [1, 2]}, {"size": "tiny"})
    assert [(c["batch_size"], c["grad_accum"]) for c in cs] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(c["size"] == "tiny" for c in cs)
    with pytest.raises(ValueError, match="unknown option"):
        expand({"bacth_size": [1]})


def test_sweep_records_the_config_over_its_limit_as_not_ok_and_finishes(tmp_path):
    small = smedjan.Model("tiny").plan_memory(1, 16)["peak_bytes"]
    big = smedjan.Model("tiny").plan_memory(64, 16)["peak_bytes"]
    limit = (small + big) // 2                     # batch 1 fits, batch 64 cannot
    out = str(tmp_path / "grid")
    rows = smedjan.sweep({"batch_size": [1, 64, 2]}, base={**BASE, "memory_limit": limit},
                         out=out, progress=False)
    assert [r["ok"] for r in rows] == [True, False, True], rows
    bad = rows[1]
    assert "memory" in bad["error"] and bad["tok_s"] is None
    for r in (rows[0], rows[2]):
        assert r["tok_s"] > 0 and r["step_ms"] > 0 and 0 < r["peak_mib"] <= limit / 2 ** 20
        assert r["mem_limit_mib"] == pytest.approx(limit / 2 ** 20)
    lines = [json.loads(line) for line in open(out + ".jsonl")]
    assert [r["ok"] for r in lines] == [True, False, True]
    md = open(out + ".md").read()
    assert md.startswith("| kind | batch | accum |") and "| False |" in md and "| True |" in md


def test_sweep_with_data_estimates_hours_per_epoch(tmp_path):
    from smedjan.data import write_tokens
    path = str(tmp_path / "d.tok")
    write_tokens(path, [np.random.default_rng(0).integers(0, 8192, 20_000).astype(np.int32)],
                 dtype="uint16")
    rows = smedjan.sweep([{"batch_size": 2, "grad_accum": 2}], base={**BASE, "data": path},
                         progress=False)
    r = rows[0]
    assert r["ok"], r
    assert r["accum"] == 2 and r["epoch_tokens"] == 20_000
    assert r["epoch_hours"] == pytest.approx(20_000 / r["tok_s"] / 3600)
    assert "h/epoch" in to_markdown(rows)


def test_sweep_cli(tmp_path, capsys):
    from smedjan.cli import main
    out = str(tmp_path / "s")
    assert main(["sweep", "--size", "tiny", "--batch-size", "1,2", "--seq-len", "16",
                 "--gradient-checkpointing", "off,on", "--steps", "1", "--warmup-steps", "1",
                 "--out", out]) == 0
    text = capsys.readouterr().out
    assert text.count("| True |") == 4 and "tiny_ckpt" in text
    assert main(["sweep", "--size", "tiny", "--batch-size", "1", "--seq-len", "16", "--steps", "1",
                 "--fp16-activations", "on", "--warmup-steps", "0"]) == 0
    assert "tiny_f16act" in capsys.readouterr().out


def test_a_sweep_over_seed_001s_data_options_writes_its_csv(tmp_path):
    """bin2d data with length buckets, shuffle buffer, prefetch and both
    load modes, the sparse loss with label buckets: every row runs, and the
    CSV has seed 001's columns in its order."""
    import csv
    from smedjan.data import write_samples
    r = np.random.default_rng(0)
    rows = [(r.integers(0, 256, n), np.arange(n) >= n // 2) for n in r.integers(8, 33, 64)]
    data = tmp_path / "sft.bin2d"
    write_samples(data, rows, stride=33)
    out = tmp_path / "grid"
    got = smedjan.sweep([dict(bucket_sizes=[16, 32], shuffle_buffer=16, prefetch_batches=2),
                         dict(load="mmap", sparse_loss=True, label_bucket_sizes=[64, 128]),
                         dict()],
                        base=dict(size="tiny", vocab_size=256, batch_size=4, seq_len=32, steps=3,
                                  warmup_steps=1, data=str(data)), out=str(out), progress=False)
    assert [g["ok"] for g in got] == [True, True, True], [g.get("error") for g in got]
    assert got[0]["kind"].endswith("bkt16_32_bin2d_memory_p2_shuffle16")
    table = list(csv.reader(open(str(out) + ".csv")))
    assert table[0] == ["kind", "bs", "acc", "prefetch", "bucket", "sparse", "mem_limit_mb",
                        "steps", "tok_avg", "step_ms_avg", "mem_peak_mib", "ok"]
    assert [t[3:6] for t in table[1:]] == [["2", "16,32", "0"], ["0", "64,128", "1"], ["0", "", "0"]]
    assert all(t[-1] == "ok" and float(t[8]) > 0 for t in table[1:])


def test_data_options_need_a_sample_file():
    from smedjan.sweep import DEFAULTS, run_one
    with pytest.raises(ValueError, match="shuffle_buffer needs data"):
        run_one({**DEFAULTS, "size": "tiny", "shuffle_buffer": 8, "steps": 1, "warmup_steps": 0})
