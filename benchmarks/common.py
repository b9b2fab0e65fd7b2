"""Helpers shared by the benchmark scripts: machine description, medians,
peak memory of a child process, the per-benchmark results JSONL and the
Markdown report."""
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def today() -> str:
    return datetime.date.today().isoformat()


def median(xs):
    return statistics.median(xs)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(module_file: str, args: list, env: dict = None) -> dict:
    """Run `python module_file ARGS` (ARGS names the child) and parse its last JSON line."""
    e = dict(os.environ)
    e.update(env or {})
    out = subprocess.run([sys.executable, module_file, *args], env=e,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(text: str, out: str = None, echo: bool = True) -> None:
    """Print a benchmark's Markdown report (unless already printed as it was
    measured: echo=False), and write it to `out` when given."""
    if echo:
        print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text.rstrip("\n") + "\n")
        print("wrote", out)


def git_commit() -> str:
    """$SMEDJAN_COMMIT (a copy of the tree without .git, as on the GPU machine), else git's."""
    if os.environ.get("SMEDJAN_COMMIT"):
        return os.environ["SMEDJAN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_results(bench: str, rows: list, card: str = "") -> str:
    """Append rows to benchmarks/results/<bench>.jsonl (and $OUT/<bench>.jsonl,
    this run's rows only), each stamped with date, commit, machine and card."""
    stamp = dict(date=today(), commit=git_commit(), machine=machine(), card=card or "none")
    dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    if os.environ.get("OUT"):
        dirs.append(os.environ["OUT"])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, bench + ".jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps({**stamp, **r}) + "\n")
    return os.path.join(dirs[0], bench + ".jsonl")
