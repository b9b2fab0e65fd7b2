"""engine_build.py — compile the engine (csrc/) with clang and sanitizers,
for the fuzz targets (run.py) and the sanitizer build of the extension
(sanitize.py). Not a replacement for setup.py: CPU only, objects under a
build directory of the caller's choosing, rebuilt when a source, a header
or the flags change.

One copy of the ISA-level sources (csrc/isa_sources.txt), compiled with
-march=native as a SMEDJAN_NATIVE=1 build does (SJ_ISA_NATIVE): the
per-level copies of the portable build differ only in compiler flags, and
three of them would triple the sanitizer builds' compile time.

Two exceptions, both about clang rather than the engine's code:
- The blocked SIMD GEMM and the quantised dot-product kernels (UNINSTRUMENTED)
  take minutes to compile under ASan (csrc/cpu/gemm.c: ~7 min with ASan +
  UBSan on a 2-core machine, hundreds of always-inlined AVX-512 blocks), so
  they are compiled plainly; they read no file, only buffers whose shapes the
  callers checked. The extension's sanitizer build (sanitize.py) compiles
  them with ASan alone, which takes about a minute.
"""
import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
GEN = ROOT / "build" / "gen"

SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# The fuzz build keeps UBSan's checks recoverable (halt_on_error=1 still stops
# at the first report) so that known open bugs can be suppressed by name.
SAN_FUZZ = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
CFLAGS = ["-std=c11", "-O1", "-g", "-pthread", "-D_GNU_SOURCE", "-fno-math-errno", "-fPIC",
          "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
UNINSTRUMENTED = {"cpu/gemm.c", "infer/qk_avx2.c", "infer/qk_avx512.c"}


def log(msg):
    print(msg, flush=True)


def _links_fuzzer(cc):
    with tempfile.TemporaryDirectory() as d:
        src = pathlib.Path(d, "t.c")
        src.write_text("#include <stdint.h>\n#include <stddef.h>\n"
                       "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n")
        r = subprocess.run([cc, "-fsanitize=fuzzer,address,undefined", str(src), "-o",
                            str(pathlib.Path(d, "t"))], capture_output=True)
        return r.returncode == 0


def find_clang():
    names = [os.environ.get("FUZZ_CC", "")] + ["clang"] + [f"clang-{v}" for v in range(20, 13, -1)]
    for n in names:
        if n and shutil.which(n) and _links_fuzzer(n):
            return n
    return None


def ensure_clang(who="fuzz"):
    """A clang that links -fsanitize=fuzzer,address,undefined; installed from
    Debian (apt-get install clang llvm) when missing and we are root."""
    cc = find_clang()
    if cc:
        return cc
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"{who}: clang with libFuzzer not found; apt-get install -y clang llvm")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "clang", "llvm"]
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        cc = find_clang()
        if cc:
            return cc
    sys.exit(f"{who}: needs clang with libFuzzer and ASan (-fsanitize=fuzzer,address): "
             "apt-get install clang llvm")


def runtime_lib(cc, name="asan"):
    """Path of clang's shared sanitizer runtime (libclang_rt.asan-x86_64.so)."""
    r = subprocess.run([cc, f"-print-file-name=libclang_rt.{name}-x86_64.so"],
                       capture_output=True, text=True)
    p = r.stdout.strip()
    if not os.path.isabs(p) or not os.path.exists(p):
        sys.exit(f"{cc}: libclang_rt.{name}-x86_64.so not found (apt-get install clang)")
    return p


def _accepts(cc, flag):
    return subprocess.run([cc, flag, "-x", "c", "-c", "-", "-o", os.devnull], input=b"int x;",
                          capture_output=True).returncode == 0


def _stale(out, deps):
    if not out.exists():
        return True
    t = out.stat().st_mtime
    return any(d.stat().st_mtime > t for d in deps)


def isa_sources():
    """The sources setup.py compiles once per ISA level (relative to csrc/)."""
    pats = [ln.strip() for ln in (CSRC / "isa_sources.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    return {p.relative_to(CSRC).as_posix() for pat in pats for p in CSRC.glob(pat)}


def compile_engine(cc, obj_dir, flags, *, plain_flags=None, with_py=False, include=()):
    """Compile csrc/**/*.c (csrc/py too with with_py) into obj_dir: `flags`
    for most files, `plain_flags` for UNINSTRUMENTED ones. Returns the objects."""
    subprocess.run([sys.executable, str(CSRC / "tokenizer" / "gen_unicode.py"), str(GEN)], check=True)
    obj_dir = pathlib.Path(obj_dir)
    obj_dir.mkdir(parents=True, exist_ok=True)
    march = ["-march=native"] if _accepts(cc, "-march=native") else []
    inc = ["-I" + str(CSRC), "-I" + str(GEN)] + ["-I" + str(i) for i in include]
    base = CFLAGS + march + inc + ["-DSJ_ISA_NATIVE=1", '-DSJ_BUILD_FLAGS="sanitizer build"']
    flags = base + list(flags)
    plain = base + list(plain_flags if plain_flags is not None else ["-O2"])
    stamp = obj_dir / "flags.txt"
    sig = "\n".join([cc, " ".join(flags), " ".join(plain)])
    if not stamp.exists() or stamp.read_text() != sig:
        shutil.rmtree(obj_dir)
        obj_dir.mkdir(parents=True)
        stamp.write_text(sig)
    headers = list(CSRC.rglob("*.h")) + list(GEN.glob("*.h")) + [CSRC / "isa_sources.txt"]
    per_level = isa_sources()
    jobs, objs = [], []
    for s in sorted(CSRC.rglob("*.c")):
        rel = s.relative_to(CSRC).as_posix()
        if rel.startswith("py/") and not with_py:
            continue
        o = obj_dir / (rel.replace("/", "_")[:-2] + ".o")
        objs.append(o)
        if not _stale(o, [s] + headers):
            continue
        src, extra = s, ["-I" + str(s.parent)] + (["-DSJ_ISA_SUFFIX=_one"] if rel in per_level else [])
        jobs.append([cc, *(plain if rel in UNINSTRUMENTED else flags), *extra, "-c", str(src), "-o", str(o)])
    if jobs:
        log(f"compiling {len(jobs)} engine sources with {cc}")
        # Slowest first, so the long ones do not start last.
        jobs.sort(key=lambda c: -os.path.getsize(c[-3]))
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as ex:
            results = list(ex.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs))
        for cmd, r in zip(jobs, results):
            if r.returncode != 0:
                pathlib.Path(cmd[-1]).unlink(missing_ok=True)
                sys.exit(f"compile failed: {' '.join(cmd)}\n{r.stderr}")
    return objs


def archive(objs, lib):
    lib = pathlib.Path(lib)
    if _stale(lib, objs):
        lib.unlink(missing_ok=True)
        ar = shutil.which("llvm-ar") or "ar"
        subprocess.run([ar, "rcs", str(lib)] + [str(o) for o in objs], check=True)
    return lib
