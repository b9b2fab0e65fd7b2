"""Helpers shared by the benchmark scripts: machine description, medians,
peak memory of a child process, and result files."""
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


def write_results(name: str, header: str, table: str, rows: list) -> str:
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    base = os.path.join(os.path.dirname(__file__), "results", f"{name}_{today()}")
    with open(base + ".md", "w") as f:
        f.write(header + "\n\n" + table + "\n")
    with open(base + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return base + ".md"
