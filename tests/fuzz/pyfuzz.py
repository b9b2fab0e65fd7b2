"""pyfuzz.py — what the Python fuzz targets (py_*.py) share: atheris setup
with smedjan's Python code instrumented for coverage, the input written to a
tmpfs file (the importers take paths), and the contract every importer
keeps: bad input raises ValueError (UnicodeDecodeError and JSON errors are
ValueErrors) or OSError, nothing else. Any other exception is a finding:
its signature (the exception's type and the smedjan function it escapes
from: one bug however many lines raise it) is printed and atheris reports it as a crash and saves the
input. Signatures listed in $SJ_PYFUZZ_KNOWN (one a line; run.py passes the
known open bugs) are let through, so a known bug does not stop every run."""
import os
import sys
import tempfile
import traceback

import atheris

ALLOWED = (ValueError, OSError)
_TMP = tempfile.mkdtemp(prefix="sj_pyfuzz_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


def path(name, data: bytes) -> str:
    p = os.path.join(_TMP, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def signature(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "/smedjan/" in f.filename]
    f = ours[0] if ours else tb[-1]
    return f"{type(e).__name__} escapes {f.name} {os.path.basename(f.filename)}"


def run(test_one):
    known = set()
    if os.environ.get("SJ_PYFUZZ_KNOWN"):
        with open(os.environ["SJ_PYFUZZ_KNOWN"]) as f:
            known = {line.strip() for line in f if line.strip()}

    def wrapped(data):
        try:
            test_one(data)
        except ALLOWED:
            pass
        except Exception as e:
            sig = signature(e)
            if sig in known:
                return
            print(f"SJ_PYFUZZ_SIGNATURE: {sig}", file=sys.stderr, flush=True)
            raise
    atheris.Setup(sys.argv, wrapped)
    atheris.Fuzz()
