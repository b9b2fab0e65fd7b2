"""The package as users get it: the sdist holds the whole tree, installs
on its own (compiled from the sdist, away from this checkout) and runs."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

import smedjan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATED = {"PKG-INFO", "setup.cfg"}     # plus smedjan.egg-info/*, written by setuptools


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out),
                    ROOT], check=True, capture_output=True, cwd=out)
    (path,) = out.glob("smedjan-*.tar.gz")
    return path


def git_files():
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True)
    return {f for f in out.stdout.decode().split("\0") if f}


def test_sdist_holds_exactly_the_tracked_files(sdist):
    prefix = f"smedjan-{smedjan.__version__}/"
    with tarfile.open(sdist) as t:
        names = {m.name[len(prefix):] for m in t.getmembers() if m.isfile()}
    names = {n for n in names if n not in GENERATED and not n.startswith("smedjan.egg-info/")}
    tracked = git_files()
    assert sorted(tracked - names) == [], "tracked but missing from the sdist"
    assert sorted(names - tracked) == [], "in the sdist but not tracked"


def test_sdist_installs_and_trains_away_from_the_checkout(sdist, tmp_path):
    """pip builds the extension from the sdist alone (no isolation: the
    test machine's setuptools; no dependencies: numpy and tqdm are here),
    portable: no -march=native in any compile command."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(sdist)],
                       capture_output=True, text=True,
                       env={**os.environ, "SMEDJAN_CUDA": "0", "SMEDJAN_NATIVE": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "smedjan" / "py.typed").exists()
    script = ("import json, smedjan, numpy as np\n"
              "assert smedjan.__file__.startswith(%r), smedjan.__file__\n"
              "m = smedjan.Model(smedjan.Config.custom(32, 1, 2, 1, vocab_size=64), seed=0)\n"
              "t = smedjan.Trainer(m, lr=1e-2, steps=3)\n"
              "x = np.arange(32, dtype=np.int32).reshape(2, 16) %% 64\n"
              "losses = [t.step(x, x).loss for _ in range(3)]\n"
              "print(json.dumps([losses, smedjan._C.BUILD_FLAGS, smedjan.build_info()]))\n") % str(target)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    losses, flags, info = json.loads(r.stdout)
    assert losses[-1] < losses[0]
    assert "-march=native" not in flags, flags
    assert info["build"] == "portable", info
    r = subprocess.run([sys.executable, "-m", "smedjan", "--version"], capture_output=True,
                       text=True, cwd=tmp_path, env=env)
    assert r.stdout.strip() == f"smedjan {smedjan.__version__}"
