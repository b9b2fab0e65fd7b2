"""run.py — build and run smedjan's fuzz targets (libFuzzer, ASan + UBSan).

    python tests/fuzz/run.py [--seconds N] [--ci] [--only T1,T2] [--build-only]
    python tests/fuzz/run.py --replay TARGET FILE...    (exit 0: no crash)

C targets (tests/fuzz/fuzz_*.c) link the engine (csrc/, minus the Python
glue in csrc/py) compiled by clang with -fsanitize=address,undefined and
libFuzzer's coverage; Python targets (tests/fuzz/py_*.py) run the Python
importers under atheris, libFuzzer's Python front end. Everything is built
under build/fuzz/: objects, binaries, the seed corpora (make_seeds.py), the
growing corpora (corpus/<target>) and crash artifacts (crashes/<target>).

Each target runs for --seconds with -timeout=1 (an input taking over a
second is a failure) and -rss_limit_mb; a crash restarts it for the time
left, so one bug does not hide the next. A crash whose signature (kind and
first engine frame) is new is copied to tests/fuzz/regressions/<target>/.
Known open bugs are listed in tests/fuzz/regressions/known.json. The summary
table gives executions per second, coverage (cov/ft from libFuzzer's final
stats) and crashes.

--ci: the slice `make test` runs: every target for --seconds (default 10)
over its seeds in a throwaway corpus; exit 1 on any crash that is not a
known open bug. clang is installed with apt-get when missing (root), else
the run stops with a one-line message saying what to install.
"""
import argparse
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_build as eb  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "fuzz"
BUILD = ROOT / "build" / "fuzz"
REGRESSIONS = HERE / "regressions"
KNOWN = REGRESSIONS / "known.json"

C_TARGETS = ["safetensors", "gguf", "gguf_model", "tokenizer_file", "tokenizer_vocab",
             "tokens", "samples", "encode", "decode"]
PY_TARGETS = ["py_bpe_files", "py_tokenizer_json", "py_checkpoint", "py_gguf"]
TARGETS = C_TARGETS + PY_TARGETS

RSS_LIMIT_MB = 2048
MAX_REGRESSION_BYTES = 64 << 10
# detect_leaks: the targets free what they make, so a leak is a finding.
ASAN_OPTIONS = "detect_leaks=1:abort_on_error=0:allocator_may_return_null=1:handle_abort=1"
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"


def log(msg):
    print(msg, flush=True)


# ---- toolchain ---------------------------------------------------------------

def ensure_atheris():
    try:
        import atheris  # noqa: F401
    except ImportError:
        log("fuzz: installing atheris (libFuzzer for Python) from PyPI")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                            "--disable-pip-version-check", "atheris==3.0.0"])
        if r.returncode != 0:
            sys.exit("fuzz: the Python targets need atheris: pip install atheris==3.0.0")


def ensure_extension():
    """The Python targets and make_seeds.py import smedjan._C: this tree's own,
    built in place when missing (an editable install of another tree must not
    stand in for it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "import smedjan._C as c; print(c.__file__)"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip().startswith(str(ROOT)):
        log("fuzz: building smedjan._C in place (setup.py build_ext --inplace)")
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)


# ---- build -------------------------------------------------------------------

def build(cc, targets, extra=()):
    """The engine as an instrumented static library, then one binary per C target."""
    objs = eb.compile_engine(cc, BUILD / "obj", eb.SAN_FUZZ + ["-fsanitize=fuzzer-no-link"])
    lib = eb.archive(objs, BUILD / "libsmedjan_fuzz.a")
    bin_dir = BUILD / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for t in targets:
        if t not in C_TARGETS:
            continue
        src, out = HERE / f"fuzz_{t}.c", bin_dir / f"fuzz_{t}"
        if eb._stale(out, [src, lib, HERE / "fuzz.h"]):
            r = subprocess.run([cc, *eb.CFLAGS, *eb.SAN_FUZZ, "-fsanitize=fuzzer", "-I" + str(ROOT / "csrc"),
                                str(src), str(lib), "-lm", "-o", str(out)], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"fuzz: link of {out.name} failed:\n{r.stderr}")
    return bin_dir


def make_seeds():
    seeds = BUILD / "seeds"
    gen = HERE / "make_seeds.py"
    if eb._stale(seeds / "smollm2.sjtok", [gen]):
        shutil.rmtree(seeds, ignore_errors=True)
        r = subprocess.run([sys.executable, str(gen), str(seeds)], cwd=ROOT)
        if r.returncode != 0:
            sys.exit("fuzz: make_seeds.py failed")
    return seeds


# ---- running -----------------------------------------------------------------

def target_env(seeds, suppressions=None):
    ub = UBSAN_OPTIONS + (f":suppressions={suppressions}" if suppressions else "")
    env = dict(os.environ, ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=ub,
               SJ_FUZZ_TOKENIZER=str(seeds / "smollm2.sjtok"), SMEDJAN_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def command(t, bin_dir):
    if t in C_TARGETS:
        return [str(bin_dir / f"fuzz_{t}")]
    return [sys.executable, str(HERE / f"{t}.py")]


FRAME = re.compile(r"#\d+ 0x[0-9a-f]+ in (\S+) (\S+)")


# UBSan's message -> its check name (for a suppression of a known open bug).
UBSAN_CHECKS = [("is outside the range of representable values", "float-cast-overflow"),
                ("signed integer overflow", "signed-integer-overflow"),
                ("shift exponent", "shift-exponent"), ("left shift", "shift-base"),
                ("misaligned address", "alignment"), ("out of bounds for type", "bounds"),
                ("null pointer passed", "nonnull-attribute"), ("null pointer", "null"),
                ("pointer overflow", "pointer-overflow"), ("offset to null pointer", "pointer-overflow"),
                ("not a valid value for type", "bool"), ("division by zero", "integer-divide-by-zero"),
                ("negation of", "signed-integer-overflow"), ("implicit conversion", "implicit-conversion")]


def signature(report):
    """What kind of failure, and where: the first frame in our code."""
    kind = "crash"
    for pat, k in ((r"Uncaught Python exception", "python"),
                   (r"ERROR: AddressSanitizer: ([\w-]+)", None), (r"ERROR: LeakSanitizer", "leak"),
                   (r"runtime error: (.*)", "ubsan"), (r"ERROR: libFuzzer: ([\w-]+)", None),
                   (r"fuzz check failed at (\S+)", "check")):
        m = re.search(pat, report)
        if m:
            kind = k or m.group(1)
            break
    if kind == "python":
        m = re.search(r"SJ_PYFUZZ_SIGNATURE: (.*)", report)
        if m:
            return m.group(1).strip()
        tb = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', report)
        exc = re.findall(r"^(\w+(?:Error|Exception)\w*):", report, re.M)
        ours = [f for f in tb if "/smedjan/" in f[0]]
        where = ours[0] if ours else (tb[-1] if tb else ("?", "?", "?"))
        return f"{exc[-1] if exc else 'exception'} escapes {where[2]} {pathlib.Path(where[0]).name}"
    if kind == "ubsan":
        msg = re.search(r"runtime error: (.*)", report).group(1)
        kind = "ubsan " + next((c for t, c in UBSAN_CHECKS if t in msg), "undefined-behavior")
    for fn, loc in FRAME.findall(report):
        if "/csrc/" in loc or "/tests/fuzz/" in loc:
            loc = re.sub(r".*/(csrc|tests/fuzz)/", r"\1/", loc)
            if kind == "leak":
                loc = re.sub(r":\d+(:\d+)?$", "", loc)   # a leak's line is where it was allocated
            return f"{kind} in {fn} {loc}"
    return kind


def load_known():
    if not KNOWN.exists():
        return {}
    return json.loads(KNOWN.read_text())


def known_signatures(t):
    return {v["signature"] for k, v in load_known().items()
            if k.split("/")[0] == t and v.get("status", "open") == "open"}


def run_target(t, seconds, bin_dir, seeds, ci, log_dir):
    """Fuzz one target for `seconds`, restarting after each crash."""
    crash_dir = BUILD / "crashes" / t
    crash_dir.mkdir(parents=True, exist_ok=True)
    if ci:
        corpus = pathlib.Path(tempfile.mkdtemp(prefix=f"sj_fuzz_{t}_"))
    else:
        corpus = BUILD / "corpus" / t
        corpus.mkdir(parents=True, exist_ok=True)
    dirs = [str(corpus)] + [str(d) for d in (seeds / t,) if d.exists()]
    # Known open UBSan bugs are suppressed while fuzzing (the fuzz build's
    # UBSan checks are recoverable for that; halt_on_error stops at any other),
    # so they do not stop every run; their regression files still fail.
    supp = [x for k, v in load_known().items()
            if k.split("/")[0] == t and v.get("status", "open") == "open"
            for x in ([v["suppress"]] if isinstance(v.get("suppress"), str) else v.get("suppress", []))]
    supp_file = BUILD / "logs" / f"{t}.ubsan-supp"
    supp_file.write_text("".join(f"{x}\n" for x in sorted(set(supp))))
    env = target_env(seeds, supp_file)
    known = known_signatures(t)
    py_known = BUILD / "logs" / f"{t}.py-known"     # the same for Python exceptions
    py_known.write_text("".join(f"{x}\n" for x in sorted(known)))
    env["SJ_PYFUZZ_KNOWN"] = str(py_known)
    found = {}          # signature -> artifact
    execs, cov, ft, corp, elapsed, runs = 0, 0, 0, "", 0.0, 0
    log_path = log_dir / f"{t}.log"
    with open(log_path, "w") as logf:
        while elapsed < seconds - 1 and runs < 20:
            left = max(1, int(round(seconds - elapsed)))
            cmd = command(t, bin_dir) + [
                f"-max_total_time={left}", "-timeout=1", f"-rss_limit_mb={RSS_LIMIT_MB}",
                "-print_final_stats=1", f"-artifact_prefix={crash_dir}/", "-max_len=131072"] + \
                (["-seed=1"] if ci else []) + dirs
            t0 = time.time()
            r = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
            elapsed += time.time() - t0
            runs += 1
            out = r.stdout
            logf.write(f"$ {' '.join(cmd)}\n{out}\n")
            m = re.search(r"stat::number_of_executed_units: (\d+)", out)
            execs += int(m.group(1)) if m else 0
            for m in re.finditer(r"cov: (\d+) ft: (\d+) corp: (\S+)", out):
                cov, ft, corp = max(cov, int(m.group(1))), max(ft, int(m.group(2))), m.group(3)
            art = re.search(r"Test unit written to (\S+)", out)
            if r.returncode == 0 and not art:
                break
            if not art:
                found.setdefault(f"exit {r.returncode} without an artifact", "")
                break
            sig = signature(out)
            if sig not in found:
                found[sig] = art.group(1)
                if sig not in known:
                    logf.write(f"NEW CRASH {sig}\n")
            # A finding is let through for the rest of this target's time.
            with open(py_known, "a") as f:
                f.write(sig + "\n")
            m = re.match(r"ubsan (\S+) in (\S+) ", sig)
            if m and m.group(1) != "undefined-behavior":
                with open(supp_file, "a") as f:
                    f.write(f"{m.group(1)}:{m.group(2)}\n")
    shutil.rmtree(corpus, ignore_errors=True) if ci else None
    new = {s: a for s, a in found.items() if s not in known}
    saved = []
    if not ci:
        for s, a in new.items():
            if a and os.path.getsize(a) <= MAX_REGRESSION_BYTES:
                saved.append(save_regression(t, a, s))
    return dict(target=t, seconds=round(elapsed, 1), execs=execs,
                exec_s=int(execs / elapsed) if elapsed else 0, cov=cov, ft=ft, corpus=corp,
                crashes=len(found), new=sorted(new), known_hit=sorted(set(found) & known),
                saved=saved, log=str(log_path))


def save_regression(t, artifact, sig):
    data = pathlib.Path(artifact).read_bytes()
    d = REGRESSIONS / t
    d.mkdir(parents=True, exist_ok=True)
    name = pathlib.Path(artifact).name.split("-")[0] + "-" + hashlib.sha1(data).hexdigest()[:12]
    (d / name).write_bytes(data)
    known = load_known()
    entry = {"signature": sig, "status": "open", "reason": f"found by fuzzing: {sig}"}
    m = re.match(r"ubsan (\S+) in (\S+) ", sig)
    if m and m.group(1) != "undefined-behavior":
        entry["suppress"] = f"{m.group(1)}:{m.group(2)}"
    known.setdefault(f"{t}/{name}", entry)
    KNOWN.write_text(json.dumps(known, indent=2, sort_keys=True) + "\n")
    return str((d / name).relative_to(ROOT))


def replay(t, files, bin_dir, seeds):
    """Run a target's entry point once on each file; 0 when none fails."""
    cmd = command(t, bin_dir) + ["-runs=1", "-timeout=1", f"-rss_limit_mb={RSS_LIMIT_MB}"] + \
        [str(f) for f in files]
    r = subprocess.run(cmd, env=target_env(seeds), cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, errors="replace")
    sys.stdout.write(r.stdout[-6000:])
    return r.returncode


def table(rows):
    head = ["target", "seconds", "execs", "exec/s", "cov", "ft", "corpus", "crashes"]
    lines = [head]
    for r in rows:
        c = str(r["crashes"])
        if r["crashes"]:
            c += f" ({len(r['new'])} new, {len(r['known_hit'])} known)"
        lines.append([r["target"], f"{r['seconds']:.0f}", str(r["execs"]), str(r["exec_s"]),
                      str(r["cov"]), str(r["ft"]), r["corpus"], c])
    w = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = []
    for k, l in enumerate(lines):
        out.append("| " + " | ".join(x.ljust(w[i]) for i, x in enumerate(l)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--replay", nargs="+", metavar=("TARGET", "FILE"))
    a = ap.parse_args()
    targets = [t for t in a.only.split(",") if t] or TARGETS
    bad = set(targets) - set(TARGETS)
    if bad:
        sys.exit(f"fuzz: unknown targets {sorted(bad)}; known: {', '.join(TARGETS)}")
    if a.replay:
        targets = [a.replay[0]]
    cc = eb.ensure_clang()
    if any(t in PY_TARGETS for t in targets):
        ensure_atheris()
    ensure_extension()
    t0 = time.time()
    bin_dir = build(cc, targets)
    seeds = make_seeds()
    log(f"fuzz: built with {cc} in {time.time() - t0:.0f} s")
    if a.replay:
        sys.exit(replay(a.replay[0], a.replay[1:], bin_dir, seeds))
    if a.build_only:
        return
    seconds = a.seconds if a.seconds is not None else (10 if a.ci else 600)
    log_dir = BUILD / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in targets:
        log(f"fuzz: {t} for {seconds:.0f} s")
        r = run_target(t, seconds, bin_dir, seeds, a.ci, log_dir)
        rows.append(r)
        for s in r["new"]:
            log(f"  NEW CRASH: {s}  (log: {r['log']})")
        for s in r["known_hit"]:
            log(f"  known open bug hit again: {s}")
        for p in r["saved"]:
            log(f"  reproducer saved: {p}")
    log("")
    log(table(rows))
    (BUILD / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    new = sum(len(r["new"]) for r in rows)
    log(f"fuzz: {len(rows)} targets, {sum(r['execs'] for r in rows)} executions, "
        f"{new} new crash signature(s), {time.time() - t0:.0f} s in all")
    if new:
        sys.exit(1)


if __name__ == "__main__":
    main()
