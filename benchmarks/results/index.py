"""Writes benchmarks/results/README.md: the index of the result JSONLs and
the current numbers of the headline benchmarks (the latest row per shape).

    python3 benchmarks/results/index.py
"""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (written by, what a row is)
FILES = {
    "vs_torch": ("`benchmarks/vs_torch.py [--sweep vocab\\|head_dims] [--levers ...]`",
                 "one shape on one GPU: ours, PyTorch eager and torch.compile tok/s, peak MiB, MFU"),
    "decode_gpu": ("`benchmarks/bench_decode_gpu.py`",
                   "one shape, batch-1 greedy decode: ours and PyTorch's graphed loop, tok/s, ratio"),
    "train_cliffs": ("`benchmarks/probes/train_cliffs.py`",
                     "ours only: train tok/s and MFU of a shape that fell off a cliff"),
    "kernels": ("`benchmarks/bench_kernels.py`",
                "one CUDA kernel at a profile shape: us a call, achieved rate, floor"),
    "cpu_train": ("`benchmarks/bench_cpu_train.py`",
                  "one CPU train-step run: ours and PyTorch tok/s and peak memory, same threads"),
    "infer_cpu": ("`benchmarks/bench_infer_cpu.py`",
                  "one mode (fp32/q8/q4) of SmolLM2-135M: ours and llama.cpp prefill, gen, ttft"),
    "gemm_cpu": ("`benchmarks/bench_gemm.py`",
                 "one GEMM case and form: ours and NumPy (OpenBLAS) GFLOP/s"),
    "levers": ("`benchmarks/bench_levers.py`",
               "one memory-lever configuration: engine and planned peak, arena, step time"),
    "tokenizer": ("`benchmarks/bench_tokenizer.py`",
                  "one task: ours against HF tokenizers (train) or tiktoken (encode), seconds"),
    "io": ("`benchmarks/bench_io.py`",
           "one safetensors header size or one Batches (dtype, B, T, order): seconds or batches/s"),
    "smedjan_bench": ("`smedjan bench --json` (rows added by hand)",
                      "one preset: train, inference and decode tok/s, step phases, peak memory"),
    "decode_probe": ("`benchmarks/probes/decode_probe.cu` (tables added by hand)",
                     "one variant or shape of the persistent decode kernel: us a token, verdict"),
    "decode_phases": ("`benchmarks/probes/profile_decode_gpu.py` (added by hand)",
                      "one decode phase of one shape, one kernel per phase: us"),
    "gpu_profile": ("`benchmarks/probes/profile_gpu.py` (added by hand)",
                    "one CUDA kernel of a train step: ms a step, share, calls"),
    "q4_agreement": ("`benchmarks/probes/q4_agreement.py` (added by hand)",
                     "one pair of Q4 kernels (ours, llama.cpp): top-1 agreement, mean KL"),
    "kernels_sm90": ("`benchmarks/probes/{gemm,attention}_sm90_check.cu` (added by hand)",
                     "one check (error, ok) or timing (ours against cuBLASLt or mma.sync)"),
    "optim_state": ("`benchmarks/bench_optim.py --state-dtype fp32,bf16,8bit`",
                    "one optimizer x state dtype: 20-step mean losses over a real corpus, state bytes"),
}


def load(name):
    path = os.path.join(HERE, name + ".jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def latest(rows, key, keep=lambda r: True):
    """The last row per key among those kept (files are appended in time order);
    rows of another shape in the same file (no such key) are not this table's."""
    out = {}
    for r in rows:
        try:
            if keep(r):
                out[key(r)] = r
        except KeyError:
            continue
    return list(out.values())


def tok(x):
    return f"{x:,.0f}" if x is not None else "-"


def pct(x):
    return f"{x:.1%}" if x is not None else "-"


def stamp(r):
    return f"{r['date']}, {r['commit'][:7]}"


def table(head, rows):
    lines = ["| " + " | ".join(h for h, _ in head) + " |",
             "|" + "|".join("---:" if right else "---" for _, right in head) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def current():
    out = []
    vs = latest(load("vs_torch"), lambda r: (r["config"], r["B"], r["T"], r.get("vocab", 8192),
                                              r.get("our_levers", "")),
                lambda r: r.get("kind") == "train" and "ratio_vs_compile" in r)
    out += ["### Training on the GPU against torch.compile (`vs_torch.jsonl`)", "",
            "bf16; MFU in PaLM's convention over 989 TFLOP/s (H100 dense bf16), where recorded.", ""]
    out += table([("config", False), ("B x T", False), ("vocab", True), ("levers", False),
                  ("ours tok/s", True), ("compile tok/s", True), ("ratio", True), ("MFU ours", True),
                  ("card", False), ("date, commit", False)],
                 [(r["config"], f"{r['B']} x {r['T']}", r.get("vocab", 8192), r.get("our_levers") or "",
                   tok(r["ours_tok_s"]), tok(r["compile_tok_s"]), f"{r['ratio_vs_compile']:.2f}x",
                   pct(r.get("ours_mfu")), r["card"], stamp(r)) for r in vs])
    cl = latest(load("train_cliffs"), lambda r: r["shape"])
    out += ["", "### Training shapes that fell off cliffs, ours only (`train_cliffs.jsonl`)", ""]
    out += table([("shape", False), ("B x T", False), ("tok/s", True), ("MFU", True),
                   ("card", False), ("date, commit", False)],
                  [(r["shape"], f"{r['B']} x {r['T']}", tok(r["ours_tok_s"]), pct(r.get("mfu")),
                    r["card"], stamp(r)) for r in cl])
    dec = latest(load("decode_gpu"), lambda r: (r["shape"], r["prompt"], r["gen"]))
    out += ["", "### GPU decode, batch 1, against PyTorch (`decode_gpu.jsonl`)", ""]
    out += table([("shape", False), ("prompt + gen", False), ("ours tok/s", True),
                   ("torch tok/s", True), ("ratio", True), ("greedy = torch", True),
                   ("card", False), ("date, commit", False)],
                  [(r["shape"], f"{r['prompt']} + {r['gen']}", tok(r["ours_tok_s"]),
                    tok(r["torch_tok_s"]), f"{r['ratio']:.2f}x", f"{r['greedy_tokens_equal']}/{r['gen']}",
                    r["card"], stamp(r)) for r in dec])
    cpu = latest(load("cpu_train"), lambda r: (r["size"], r["batch_size"], r["seq_len"], r["threads"]))
    out += ["", "### CPU training step against PyTorch (`cpu_train.jsonl`)", ""]
    out += table([("preset", False), ("B x T", False), ("threads", True), ("ours tok/s", True),
                  ("torch tok/s", True), ("ratio", True), ("peak memory ratio", True),
                  ("machine", False), ("date, commit", False)],
                 [(r["size"], f"{r['batch_size']} x {r['seq_len']}", r["threads"], tok(r["ours_tok_s"]),
                   tok(r["torch_tok_s"]), f"{r['ratio']:.2f}x", f"{r['mem_ratio']:.2f}x", r["machine"],
                   stamp(r)) for r in cpu])
    inf = latest(load("infer_cpu"), lambda r: (r["mode"], r["threads"]),
                 lambda r: "ours_gen_tok_s" in r)
    out += ["", "### CPU inference of SmolLM2-135M against llama.cpp (`infer_cpu.jsonl`)", "",
            "Best of the run's repeats; 512-token prompt, 64 greedy tokens.", ""]
    out += table([("mode", False), ("threads", True), ("K/V", False), ("prefill tok/s ours / llama.cpp", True),
                  ("ratio", True), ("gen tok/s ours / llama.cpp", True), ("ratio", True),
                  ("machine", False), ("date, commit", False)],
                 [(r["mode"], r["threads"], r["kv_dtype"],
                   f"{r['ours_prefill_tok_s']:.1f} / {r['llama_prefill_tok_s']:.1f}",
                   f"{r['ours_prefill_tok_s'] / r['llama_prefill_tok_s']:.2f}x",
                   f"{r['ours_gen_tok_s']:.1f} / {r['llama_gen_tok_s']:.1f}",
                   f"{r['ours_gen_tok_s'] / r['llama_gen_tok_s']:.2f}x", r["machine"], stamp(r))
                  for r in sorted(inf, key=lambda r: (r["threads"], r["mode"]))])
    return out


def render():
    names = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(HERE, "*.jsonl")))
    unknown = [n for n in names if n not in FILES]
    if unknown:
        raise SystemExit(f"index.py: describe {', '.join(unknown)} in FILES")
    lines = ["# Benchmark results", "",
             "One JSONL per benchmark; every row carries its date, git commit, machine and card",
             "(`benchmarks/common.py: append_results`); rows are appended, oldest first. Rows",
             "folded in from the dated snapshots of 2026-11-23/24 carry the snapshot's suffix as",
             "`tag` and its prose as `note`. Generated by `python3 benchmarks/results/index.py`.", ""]
    lines += table([("file", False), ("written by", False), ("what a row is", False), ("rows", True),
                    ("dates", False)],
                   [(f"`{n}.jsonl`", *FILES[n], len(rs), f"{rs[0]['date']} .. {rs[-1]['date']}")
                    for n in sorted(FILES, key=list(FILES).index) for rs in [load(n)] if rs])
    lines += ["", "## Current numbers", "", "The latest row per shape.", ""] + current()
    return "\n".join(lines) + "\n"


def main():
    path = os.path.join(HERE, "README.md")
    with open(path, "w") as f:
        f.write(render())
    print("wrote", path)


if __name__ == "__main__":
    main()
