"""smedjan: a language-model forge. A C engine with hand-written kernels,
used from Python.

>>> import smedjan
>>> model = smedjan.Model("tiny", seed=0)
>>> trainer = smedjan.Trainer(model, lr=1e-3, steps=100)
"""
from . import _C
from ._C import OutOfMemoryError
from .config import PRESETS, Config, sizes
from .model import Model
from .tokenizer import Tokenizer
from .trainer import StepResult, Trainer, lr_at
from .bench import bench
from .sweep import sweep

__version__ = "0.1.0"


def threads(n: int = 0) -> int:
    """The engine's worker-thread count (set it when n > 0)."""
    return _C.threads(n)


def build_info() -> dict:
    """What was compiled in, and what this machine offers.

    `isa`: the instruction-set level the CPU kernels run at (the best of
    "scalar", "avx2", "avx512", "avx512vnni" this CPU runs, capped by the
    environment variable SMEDJAN_ISA); `isa_build`: the compiled copy running
    it ("x86-64", "x86-64-v3", "x86-64-v4", or "native"); `build`: "portable"
    (one copy per level, chosen at load) or "native" (SMEDJAN_NATIVE=1).

    >>> smedjan.build_info()["isa"] in ("scalar", "avx2", "avx512", "avx512vnni")
    True
    """
    import os
    info = _C.cuda_info()
    isa = _C.isa()
    return {"version": __version__, "cuda_compiled": bool(_C.HAVE_CUDA),
            "cuda_devices": info["devices"], "gpus": info["names"],
            "threads": _C.threads(), "cpus": os.cpu_count(),
            "isa": isa["isa"], "isa_build": isa["isa_build"],
            "build": "native" if isa["native"] else "portable"}


def cuda_available() -> bool:
    """True when the CUDA backend is compiled in and a GPU is present."""
    return bool(_C.HAVE_CUDA) and _C.cuda_info()["devices"] > 0


__all__ = ["Model", "Tokenizer", "Trainer", "Config", "StepResult", "OutOfMemoryError", "sizes",
           "PRESETS", "lr_at", "threads", "build_info", "cuda_available", "bench", "sweep"]
