"""Build smedjan._C: the C engine (csrc/, C11) and, when nvcc is found, the
CUDA backend (cuda/*.cu). SMEDJAN_CUDA=0 forces a CPU-only build; SMEDJAN_CUDA=1
makes a missing nvcc an error."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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


class BuildExt(build_ext):
    """setuptools' build_ext, plus cuda/*.cu compiled by nvcc and linked in."""

    def build_extension(self, ext):
        nvcc = find_nvcc()
        if nvcc:
            cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
            libdir = next((d for d in (os.path.join(cuda_home, "lib64"),
                                       os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))
                           if os.path.isdir(d)), os.path.join(cuda_home, "lib64"))
            objdir = os.path.join(self.build_temp, "cuda")
            os.makedirs(objdir, exist_ok=True)
            jobs = []
            for src in CU_SOURCES:
                obj = os.path.join(objdir, os.path.basename(src) + ".o")
                jobs.append(subprocess.Popen(
                    [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--use_fast_math",
                     "-Xcompiler", "-fPIC", "-Icsrc", "-lineinfo", *CUDA_ARCHS]))
                ext.extra_objects.append(obj)
            if any(j.wait() != 0 for j in jobs):
                sys.exit("nvcc failed on cuda/*.cu")
            ext.define_macros.append(("SJ_HAVE_CUDA", "1"))
            ext.library_dirs.append(libdir)
            ext.runtime_library_dirs.append(libdir)
            ext.libraries += ["cudart", "cublasLt", "cublas", "stdc++"]
            print(f"smedjan: CUDA backend built with {nvcc}")
        else:
            print("smedjan: nvcc not found or SMEDJAN_CUDA=0 -> CPU-only build")
        super().build_extension(ext)


# The tokenizer's Unicode class table is generated from this Python's unicodedata
# before anything compiles; it lands in build/gen (untracked), found via include_dirs.
GEN_DIR = os.path.join("build", "gen")
subprocess.run([sys.executable, os.path.join(HERE, "csrc", "tokenizer", "gen_unicode.py"),
                os.path.join(HERE, GEN_DIR)], check=True)

flags = ["-std=c11", "-O3", "-fPIC", "-pthread", "-D_GNU_SOURCE", "-fno-math-errno",
         "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
flags += [f for f in ("-march=native", "-fopenmp-simd") if cc_accepts(f)]

setup(
    ext_modules=[Extension(
        "smedjan._C",
        sources=C_SOURCES,
        include_dirs=["csrc", GEN_DIR],
        extra_compile_args=flags,
        extra_link_args=["-pthread", "-lm"],
    )],
    cmdclass={"build_ext": BuildExt},
)
