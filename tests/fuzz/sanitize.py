"""sanitize.py — smedjan under AddressSanitizer + UndefinedBehaviorSanitizer.

    python tests/fuzz/sanitize.py            # `make sanitize`: the CPU test suite
    python tests/fuzz/sanitize.py --ci       # the slice `make test` runs
    python tests/fuzz/sanitize.py -- tests/test_tokenizer.py -k encode   # chosen tests

1. Builds smedjan._C (CPU only) with clang -fsanitize=address,undefined
   -fno-sanitize-recover=all into build/sanitize/pkg/smedjan/, beside links to
   the package's .py files, so the normal in-place .so is never touched.
2. Builds tests/fuzz/leak_check.c against the same engine objects and runs
   it with LeakSanitizer on (detect_leaks=1): load/save/free cycles through
   the public C API must not leak.
3. Runs pytest with that package first on the path, libasan preloaded into
   Python (ASan must be the first library loaded), PYTHONMALLOC=malloc so
   ASan sees Python's allocations too, detect_leaks=0 (CPython itself keeps
   memory at exit), halt_on_error for UBSan: any report fails the run.

The full run is the CPU suite (CUDA tests skip; notebooks are not run).
--ci builds the GEMM kernels without instrumentation (ASan adds a minute of
compile time on 2 cores) and runs a few fast test files of the parsers and
the engine's error paths.
"""
import argparse
import os
import pathlib
import subprocess
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_build as eb  # noqa: E402

ROOT = eb.ROOT
OUT = ROOT / "build" / "sanitize"
CI_TESTS = ["tests/test_errors.py", "tests/test_safetensors.py", "tests/test_checkpoint.py",
            "tests/test_tokenizer.py", "tests/test_data.py", "tests/test_gguf.py"]
# Not under ASan: the fuzz replays run their own sanitized binaries, and the
# notebooks start kernels of their own.
SKIP = ["tests/test_fuzz_regressions.py"]


def log(msg):
    print(msg, flush=True)


def build(cc, ci):
    # The GEMM and quantised kernels: ASan alone (UBSan on top takes minutes
    # to compile, see engine_build.py); for the CI slice not instrumented.
    plain = ["-O2"] if ci else ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer",
                                "-mllvm", "-asan-stack=0"]
    obj_dir = OUT / ("obj-ci" if ci else "obj")
    objs = eb.compile_engine(cc, obj_dir, eb.SAN, plain_flags=plain, with_py=True,
                             include=[sysconfig.get_paths()["include"]])
    pkg = OUT / ("pkg-ci" if ci else "pkg") / "smedjan"
    pkg.mkdir(parents=True, exist_ok=True)
    for p in (ROOT / "smedjan").glob("*.py"):
        link = pkg / p.name
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(p)
    so = pkg / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if eb._stale(so, objs):
        # No sanitizer runtime inside the .so: the preloaded libasan provides it.
        subprocess.run([cc, "-shared", "-fsanitize=address,undefined", "-shared-libsan", "-o", str(so)] +
                       [str(o) for o in objs] + ["-lm", "-pthread"], check=True)
    lc = OUT / "leak_check"
    src = ROOT / "tests" / "fuzz" / "leak_check.c"
    engine = [str(o) for o in objs if not pathlib.Path(o).name.startswith("py_")]
    if eb._stale(lc, [src] + [pathlib.Path(o) for o in engine]):
        subprocess.run([cc, *eb.CFLAGS, *eb.SAN, "-I" + str(ROOT / "csrc"), str(src), *engine,
                        "-lm", "-pthread", "-o", str(lc)], check=True)
    return pkg.parent, lc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("pytest_args", nargs="*")
    a = ap.parse_args()
    t0 = time.time()
    cc = eb.ensure_clang("sanitize")
    pkg_root, leak_check = build(cc, a.ci)
    t_build = time.time() - t0
    log(f"sanitize: built with {cc} in {t_build:.0f} s")

    t1 = time.time()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", SMEDJAN_THREADS="2")
    r = subprocess.run([str(leak_check)], env=env)
    if r.returncode != 0:
        sys.exit(f"sanitize: leak_check failed (exit {r.returncode}): see the report above")
    t_leak = time.time() - t1

    asan = eb.runtime_lib(cc, "asan")
    # PYTHONSAFEPATH: no Python process, the tests' subprocesses (CLI, sweep
    # workers) included, puts its working directory on sys.path, where the
    # repository's own smedjan/ (and through an editable install, an
    # unsanitized _C) would shadow the sanitized package.
    env = dict(os.environ, LD_PRELOAD=asan, PYTHONMALLOC="malloc", PYTHONSAFEPATH="1",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_odr_violation=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
               PYTHONPATH=os.pathsep.join([str(pkg_root), str(ROOT / "tests")]))
    env.pop("SMEDJAN_CUDA", None)
    # The sanitized package must be the one imported.
    chk = subprocess.run([sys.executable, "-P", "-c", "import smedjan._C as c; print(c.__file__)"],
                         env=env, cwd=ROOT / "tests", capture_output=True, text=True)
    if chk.returncode != 0 or str(pkg_root) not in chk.stdout:
        sys.exit(f"sanitize: the sanitized smedjan._C does not import:\n{chk.stdout}{chk.stderr}")
    tests = a.pytest_args or (CI_TESTS if a.ci else ["tests/"])
    # -P: the working directory (the repository, with the normal build) stays off sys.path.
    args = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if not a.pytest_args:
        args += [f"--deselect={s}" for s in SKIP] + [f"--ignore={s}" for s in SKIP]
    t2 = time.time()
    r = subprocess.run(args, env=env, cwd=ROOT)
    t_tests = time.time() - t2
    log(f"sanitize: build {t_build:.0f} s, leak check {t_leak:.0f} s, tests {t_tests:.0f} s "
        f"(pytest exit {r.returncode})")
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
