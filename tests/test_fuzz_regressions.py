"""Every input the fuzzers found a failure with (tests/fuzz/regressions/<target>/)
is replayed through its target's harness: the engine built with ASan + UBSan
(the same binaries as `make fuzz`), or the Python importer under atheris.
A bug still open is listed in tests/fuzz/regressions/known.json with
"status": "open" and is xfail(strict=True): its replay must still fail, so
the fix flips the entry to "fixed" (or removes it) in the same commit.

Needs clang with libFuzzer (apt-get install clang llvm; `make test` installs
it). Without it these tests are skipped, except under CI, where they fail.
"""
import json
import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).parent / "fuzz"
REGRESSIONS = HERE / "regressions"
sys.path.insert(0, str(HERE))
import engine_build  # noqa: E402
import run as fuzzrun  # noqa: E402

KNOWN = json.loads((REGRESSIONS / "known.json").read_text()) if (REGRESSIONS / "known.json").exists() else {}


class StillFails(Exception):
    """The replay failed exactly as recorded (the bug is still open)."""


def _cases():
    for key in sorted(KNOWN):
        e = KNOWN[key]
        marks = [pytest.mark.xfail(strict=True, raises=StillFails, reason=e["reason"])] \
            if e.get("status", "open") == "open" else []
        yield pytest.param(key, marks=marks, id=key)


def _unavailable(why):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must run the fuzz regressions)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def harness():
    cc = engine_build.find_clang()
    if cc is None:
        _unavailable("clang with libFuzzer is not installed: apt-get install clang llvm")
    targets = sorted({k.split("/")[0] for k in KNOWN})
    if any(t in fuzzrun.PY_TARGETS for t in targets):
        try:
            import atheris  # noqa: F401
        except ImportError:
            _unavailable("atheris is not installed: pip install atheris==3.0.0")
    return fuzzrun.build(cc, targets), fuzzrun.make_seeds()


def test_every_regression_file_is_listed():
    files = {f"{p.parent.name}/{p.name}" for p in REGRESSIONS.glob("*/*") if p.is_file()}
    assert files == set(KNOWN), (f"not in known.json: {sorted(files - set(KNOWN))}; "
                                 f"listed but missing: {sorted(set(KNOWN) - files)}")
    for key, e in KNOWN.items():
        assert key.split("/")[0] in fuzzrun.TARGETS, f"{key}: unknown target"
        assert e.get("reason") and e.get("signature"), f"{key}: needs a reason and a signature"


@pytest.mark.parametrize("key", list(_cases()))
def test_regression_replays_cleanly(harness, key, capfd):
    bin_dir, seeds = harness
    target = key.split("/")[0]
    rc = fuzzrun.replay(target, [REGRESSIONS / key], bin_dir, seeds)
    out = capfd.readouterr().out
    if rc == 0:
        return
    sig = KNOWN[key]["signature"]
    if KNOWN[key].get("status", "open") == "open" and (sig in out or sig.split()[-1] in out):
        raise StillFails(sig)
    # A fixed bug that fails again, or an open one failing somewhere else: a real failure.
    pytest.fail(f"{key} fails (recorded as {sig}):\n{out[-3000:]}")
