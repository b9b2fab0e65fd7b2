"""Build smedjan._C: the C engine (csrc/, C11) and, when nvcc is found, the
CUDA backend (cuda/*.cu). SMEDJAN_CUDA=0 forces a CPU-only build; SMEDJAN_CUDA=1
makes a missing nvcc an error.

Portable by default: the engine is compiled for the x86-64 baseline, and the
hot sources (csrc/isa_sources.txt) once more per ISA level (x86-64-v3,
x86-64-v4); the engine picks the best level the CPU runs at load time
(csrc/core/isa.h). SMEDJAN_NATIVE=1 compiles everything once with
-march=native instead (fastest on the build machine, runs only on its kind)."""
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.modified import newer_group

HERE = os.path.dirname(os.path.abspath(__file__))
C_SOURCES = sorted(glob.glob("csrc/**/*.c", recursive=True))
CU_SOURCES = sorted(glob.glob("cuda/*.cu"))
CUDA_ARCHS = ["-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_90a,code=sm_90a",
              "-gencode=arch=compute_90,code=compute_90"]


def cc_accepts(flag):
    """True when the C compiler accepts a flag (so -march=native degrades cleanly)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("int main(void){return 0;}\n")
        r = subprocess.run([cc, flag, "-c", src, "-o", os.path.join(d, "t.o")],
                           capture_output=True)
        return r.returncode == 0


def find_nvcc():
    want = os.environ.get("SMEDJAN_CUDA", "")
    if want == "0":
        return None
    nvcc = shutil.which("nvcc")
    if not nvcc:
        for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                nvcc = os.path.join(home, "bin", "nvcc")
                break
    if not nvcc and want == "1":
        sys.exit("SMEDJAN_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc if CU_SOURCES else None


def find_cuda_home(nvcc):
    """The toolkit root holding cudart: $CUDA_HOME, nvcc's own root (nvcc may be
    a wrapper script elsewhere), /usr/local/cuda, /usr/local/cuda-*."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    cands += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in cands:
        if home and any(os.path.exists(os.path.join(home, d, "libcudart.so"))
                        for d in ("lib64", os.path.join("targets", "x86_64-linux", "lib"))):
            return home
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cublaslt(cuda_home):
    """(include_dir, lib_dir, link_flag) for cuBLASLt: CUDA_HOME first, then the
    nvidia-cublas pip package (nvidia/cu13 or nvidia/cublas), whose library has
    only a versioned name (libcublasLt.so.13): link it by file name."""
    cands = [(os.path.join(cuda_home, "include"), d)
             for d in (os.path.join(cuda_home, "lib64"),
                       os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))]
    roots = []
    try:
        import nvidia  # namespace package of the pip wheels
        roots += list(nvidia.__path__)
    except ImportError:
        pass
    # pip's isolated build hides the installed packages from import, not from disk.
    for key in ("purelib", "platlib"):
        roots.append(os.path.join(sysconfig.get_paths()[key], "nvidia"))
    for root in roots:
        for sub in ("cu13", "cublas", "cu12"):
            cands.append((os.path.join(root, sub, "include"), os.path.join(root, sub, "lib")))
    for inc, lib in cands:
        if not os.path.exists(os.path.join(inc, "cublasLt.h")) or not os.path.isdir(lib):
            continue
        if os.path.exists(os.path.join(lib, "libcublasLt.so")):
            return inc, lib, "-lcublasLt"
        versioned = sorted(glob.glob(os.path.join(lib, "libcublasLt.so.*")), key=len)
        if versioned:
            return inc, lib, "-l:" + os.path.basename(versioned[0])
    return None


def isa_sources():
    """The sources compiled once per ISA level (csrc/isa_sources.txt)."""
    with open(os.path.join(HERE, "csrc", "isa_sources.txt")) as f:
        pats = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    return sorted({p for pat in pats for p in glob.glob(os.path.join("csrc", pat))})


def isa_levels():
    """(symbol suffix, compiler flags) per compiled copy of the ISA sources
    (the suffixes of csrc/core/isa.h). GCC < 11 and clang < 12 lack the
    x86-64-vN names: their feature flags instead."""
    if NATIVE:
        return [("_one", MARCH_NATIVE)]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [("_one", [])]
    v3 = ["-mavx", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe",
          "-mpopcnt", "-msse4.2", "-mssse3", "-mcx16", "-msahf"]
    v4 = v3 + ["-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl"]
    named = cc_accepts("-march=x86-64-v4")
    return [("_v1", []),
            ("_v3", ["-march=x86-64-v3"] if named else v3),
            ("_v4", ["-march=x86-64-v4"] if named else v4)]


class BuildExt(build_ext):
    """setuptools' build_ext, plus the ISA sources compiled once per level and
    cuda/*.cu compiled by nvcc, linked in."""

    def compile_isa_levels(self, ext):
        """Each level's objects under build_temp/isa<suffix>/."""
        objs = []
        for suffix, level_flags in isa_levels():
            objs += self.compiler.compile(
                isa_sources(), output_dir=os.path.join(self.build_temp, "isa" + suffix),
                macros=ext.define_macros + [("SJ_ISA_SUFFIX", suffix)],
                include_dirs=ext.include_dirs, extra_postargs=flags + level_flags,
                depends=ext.depends)
        return objs

    def build_extension(self, ext):
        nvcc = find_nvcc()
        lt = None
        jobs = []
        if nvcc:
            cuda_home = find_cuda_home(nvcc)
            lt = find_cublaslt(cuda_home)
            if lt is None:
                msg = ("smedjan: cublasLt.h / libcublasLt not found (CUDA_HOME or the "
                       "nvidia-cublas pip package)")
                if os.environ.get("SMEDJAN_CUDA") == "1":
                    sys.exit(msg)
                print(msg + " -> CPU-only build")
                nvcc = None
        if nvcc:
            libdir = next((d for d in (os.path.join(cuda_home, "lib64"),
                                       os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))
                           if os.path.isdir(d)), os.path.join(cuda_home, "lib64"))
            lt_inc, lt_lib, lt_flag = lt
            objdir = os.path.join(self.build_temp, "cuda")
            os.makedirs(objdir, exist_ok=True)
            jobs = []
            # No --use_fast_math: the f32 mode must match the CPU to 1e-5 (RoPE
            # angles, exp); kernels use fast intrinsics (exp2f) where they mean to.
            for src in CU_SOURCES:
                obj = os.path.join(objdir, os.path.basename(src) + ".o")
                deps = [src] + glob.glob("cuda/*.cuh") + glob.glob("cuda/*.h") + \
                    ["csrc/ops/backend.h", "csrc/smedjan.h"]
                if not (os.path.exists(obj) and
                        os.path.getmtime(obj) >= max(os.path.getmtime(d) for d in deps)):
                    jobs.append(subprocess.Popen(
                        [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17",
                         "-Xcompiler", "-fPIC", "-Icsrc", "-Icuda", "-I" + lt_inc, "-lineinfo",
                         *CUDA_ARCHS]))
                ext.extra_objects.append(obj)
            if any(j.wait() != 0 for j in jobs):
                sys.exit("nvcc failed on cuda/*.cu")
            ext.define_macros.append(("SJ_HAVE_CUDA", "1"))
            ext.library_dirs += [libdir, lt_lib]
            ext.runtime_library_dirs += [libdir, lt_lib]
            ext.libraries += ["cudart", "stdc++"]
            ext.extra_link_args = list(ext.extra_link_args or []) + [lt_flag]
            print(f"smedjan: CUDA backend built with {nvcc} (cuBLASLt from {lt_lib})")
        else:
            print("smedjan: nvcc not found or SMEDJAN_CUDA=0 -> CPU-only build")
        # The C sources compile differently with and without SJ_HAVE_CUDA, and a
        # changed .cu object must be relinked: setuptools tracks neither.
        # (kept next to the built library, which several build_temps may share)
        stamp = self.get_ext_fullpath(ext.name) + ".kind"
        kind = ("cuda" if nvcc else "cpu") + " " + BUILD_FLAGS
        os.makedirs(os.path.dirname(stamp) or ".", exist_ok=True)
        old = open(stamp).read() if os.path.exists(stamp) else ""
        if old != kind or (nvcc and jobs):
            self.force = True
        if self.force or newer_group(ext.sources + ext.depends, self.get_ext_fullpath(ext.name)):
            ext.extra_objects += self.compile_isa_levels(ext)
            self.force = True
        super().build_extension(ext)
        with open(stamp, "w") as f:
            f.write(kind)


# The tokenizer's Unicode class table is generated from this Python's unicodedata
# before anything compiles; it lands in build/gen (untracked), found via include_dirs.
GEN_DIR = os.path.join("build", "gen")
subprocess.run([sys.executable, os.path.join(HERE, "csrc", "tokenizer", "gen_unicode.py"),
                os.path.join(HERE, GEN_DIR)], check=True)

NATIVE = os.environ.get("SMEDJAN_NATIVE", "") == "1"
MARCH_NATIVE = ["-march=native"] if cc_accepts("-march=native") else []
flags = ["-std=c11", "-O3", "-fPIC", "-pthread", "-D_GNU_SOURCE", "-fno-math-errno",
         "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
flags += [f for f in ("-fopenmp-simd",) if cc_accepts(f)]
flags += MARCH_NATIVE if NATIVE else []
# What smedjan._C.BUILD_FLAGS reports: the flags of every source, then each level's.
BUILD_FLAGS = " ".join(flags) + "".join(f" | {sfx[1:]}: {' '.join(fl) or '(none)'}"
                                        for sfx, fl in isa_levels())

setup(
    ext_modules=[Extension(
        "smedjan._C",
        sources=[s for s in C_SOURCES if s not in isa_sources()],
        depends=isa_sources() + sorted(glob.glob("csrc/**/*.h", recursive=True)) +
        ["csrc/isa_sources.txt"],
        include_dirs=["csrc", GEN_DIR],
        define_macros=[("SJ_BUILD_FLAGS", '"%s"' % BUILD_FLAGS)] +
        ([("SJ_ISA_NATIVE", "1")] if NATIVE else []),
        extra_compile_args=flags,
        extra_link_args=["-pthread", "-lm"],
    )],
    cmdclass={"build_ext": BuildExt},
)
