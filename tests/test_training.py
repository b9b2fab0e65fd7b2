"""Training you can leave running: exact resume, crash safety, clear
errors on bad files, and a loss that really falls on real text."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import smedjan
from smedjan import checkpoint as ck
from smedjan.commands import prepare
from smedjan.data import Batches, TokenFile, load_sft_jsonl
from smedjan.loop import BEST, FINAL, LATEST, fit
from conftest import stdlib_text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer and a token file made from 1 MB of the stdlib's sources."""
    d = tmp_path_factory.mktemp("corpus")
    text = d / "corpus.txt"
    text.write_bytes(stdlib_text(1_000_000))
    tok = smedjan.Tokenizer.train(files=[str(text)], vocab_size=1024)
    tok.save(d / "tok.sjt")
    prepare([str(text)], tok, str(d / "data.tok"), progress=False)
    return dict(dir=d, tok=tok, tok_path=str(d / "tok.sjt"), data=str(d / "data.tok"))


def tiny_model(vocab, seed=0):
    return smedjan.Model(smedjan.Config.custom(64, 2, 4, 2, vocab_size=vocab, max_seq_len=64),
                         seed=seed)


def run_fit(corpus, ckpt_dir, steps, max_steps=None, resume=False):
    model = tiny_model(len(corpus["tok"]))
    tr = smedjan.Trainer(model, lr=3e-3, warmup=5, steps=steps)
    data = TokenFile(corpus["data"])
    rows = fit(tr, Batches(data, 4, 32, seed=0), Batches(data, 4, 32, split="val", seed=1),
               eval_every=10, eval_batches=2, checkpoint_dir=str(ckpt_dir),
               checkpoint_every=5, resume=resume, max_steps=max_steps, progress=False)
    return rows, model


def test_resume_is_bit_identical(corpus, tmp_path):
    straight, m1 = run_fit(corpus, tmp_path / "a", 40)
    first, _ = run_fit(corpus, tmp_path / "b", 40, max_steps=20)
    second, m2 = run_fit(corpus, tmp_path / "b", 40, resume=True)
    assert [r["step"] for r in first + second] == list(range(1, 41))
    got = [r["loss"] for r in first + second]
    want = [r["loss"] for r in straight]
    assert got == want, next((i, a, b) for i, (a, b) in enumerate(zip(got, want)) if a != b)
    assert [r.get("val_loss") for r in first + second] == [r.get("val_loss") for r in straight]
    np.testing.assert_array_equal(m1.flat_params, m2.flat_params)
    for name in (LATEST, BEST, FINAL, "metrics.jsonl"):
        assert (tmp_path / "b" / name).exists(), name
    logged = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 41))
    assert {"step", "loss", "grad_norm", "lr", "tok_s", "elapsed"} <= set(logged[0])
    assert {"val_loss", "ppl"} <= set(logged[9])


def cli(*args, check=True, **kw):
    r = subprocess.run([sys.executable, "-m", "smedjan", *args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


TRAIN = ["train", "--size", "custom", "--dim", "64", "--layers", "2", "--heads", "4",
         "--kv-heads", "2", "--batch-size", "4", "--seq-len", "32", "--eval-every", "10",
         "--eval-batches", "2", "--warmup", "5"]


def test_cli_checkpoints_load_in_python_and_back(corpus, tmp_path):
    d = tmp_path / "ck"
    cli(*TRAIN, "--data", corpus["data"], "--tokenizer", corpus["tok_path"], "--steps", "20",
        "--max-steps", "10", "--checkpoint-dir", str(d), "--checkpoint-every", "5")
    c = ck.load_checkpoint(d / LATEST)
    assert c.step == 10 and c.has_optimizer and c.config.n_kv_heads == 2
    model = ck.model_from_checkpoint(d / LATEST)
    tr = smedjan.Trainer(model, **c.trainer)
    ck.restore(c, model, tr)
    # Python continues one step and saves; the CLI resumes from that file.
    data = Batches(TokenFile(corpus["data"]), 4, 32, seed=0)
    data.load_state_dict(c.loader["train"])
    tr.step(*next(data))
    loader = dict(c.loader, train=data.state_dict())
    ck.save_checkpoint(d / LATEST, model, tr, step=tr.step_count, loader_state=loader, extra=c.extra)
    r = cli(*TRAIN, "--data", corpus["data"], "--checkpoint-dir", str(d), "--resume",
            "--steps", "20")
    assert "resuming" in r.stdout and "at step 11" in r.stdout
    assert ck.load_checkpoint(d / LATEST).step == 20
    out = cli("generate", "--checkpoint", str(d / FINAL), "--prompt", "def ", "--max-new-tokens",
              "5", "--seed", "0").stdout
    assert out.startswith("def ")


def test_sigkill_never_leaves_a_corrupt_checkpoint(corpus, tmp_path):
    """SIGKILL at random points of a run that checkpoints every step (20
    kills here; SMEDJAN_KILLS=100 for the long run in docs/reliability.md)."""
    d = tmp_path / "kill"
    rnd = random.Random(0)
    steps_seen = []
    args = [*TRAIN, "--data", corpus["data"], "--tokenizer", corpus["tok_path"], "--steps",
            "100000", "--checkpoint-dir", str(d), "--checkpoint-every", "1"]
    for i in range(int(os.environ.get("SMEDJAN_KILLS", 20))):
        p = subprocess.Popen([sys.executable, "-m", "smedjan", *args, *(["--resume"] if i else [])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rnd.uniform(1.5, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        latest = d / LATEST
        assert latest.exists(), p.stderr.read().decode()[-2000:]
        for f in d.iterdir():                   # every file under a final name loads
            if f.suffix == ".safetensors":
                ck.load_checkpoint(f)           # raises on any corruption
        steps_seen.append(ck.load_checkpoint(latest).step)
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] > steps_seen[0], steps_seen
    # Resumed after 20 kills, the run reaches the uninterrupted run's weights bit for bit.
    target = steps_seen[-1] + 3
    cli(*args, "--resume", "--max-steps", "3")
    ref = tmp_path / "straight"
    cli(*args[:-4], "--checkpoint-dir", str(ref), "--max-steps", str(target))
    a, b = ck.load_checkpoint(d / LATEST), ck.load_checkpoint(ref / LATEST)
    assert a.step == b.step == target
    for name, t in b.tensors.items():
        np.testing.assert_array_equal(a.tensors[name], t, err_msg=name)


def test_resume_with_more_steps_trains_on_and_fewer_is_refused(corpus, tmp_path):
    d = tmp_path / "more"
    args = [*TRAIN, "--data", corpus["data"], "--tokenizer", corpus["tok_path"],
            "--checkpoint-dir", str(d), "--checkpoint-every", "3"]
    cli(*args, "--steps", "6")
    r = cli(*args, "--resume", "--steps", "9")
    assert "re-fitted from 6 to 9 steps" in r.stdout
    c = ck.load_checkpoint(d / LATEST)
    assert c.step == 9 and c.trainer["steps"] == 9
    final = ck.load_checkpoint(d / FINAL)              # the final weights are step 9's
    for name, t in final.tensors.items():
        np.testing.assert_array_equal(t, c.tensors[name], err_msg=name)
    r = cli(*args, "--resume", "--steps", "5", check=False)
    assert r.returncode == 1 and str(d / LATEST) in r.stderr and "already at step 9" in r.stderr


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """The uninterrupted 6-step run the killed ones must reach."""
    d = tmp_path_factory.mktemp("straight")
    cli(*TRAIN, "--data", corpus["data"], "--tokenizer", corpus["tok_path"], "--steps", "6",
        "--checkpoint-dir", str(d), "--checkpoint-every", "1")
    return ck.load_checkpoint(d / LATEST)


SAVE_STEPS = [("open", 1), ("write", 1), ("write", 3), ("fsync", 1), ("close", 1),
              ("rename", 1), ("dirsync", 1)]


@pytest.mark.parametrize("op,nth", SAVE_STEPS, ids=lambda x: str(x))
def test_sigkill_inside_each_step_of_a_save(corpus, straight_run, tmp_path, op, nth):
    """A process killed inside a save (SMEDJAN_FAILPOINT=op:KILL:n, before
    that call of op): every file under a final name loads, latest is the
    previous checkpoint byte for byte or, once the rename happened, the new
    one; the next run clears the dead writer's temporary and reaches the
    uninterrupted run's weights bit for bit."""
    d = tmp_path / "ck"
    args = [*TRAIN, "--data", corpus["data"], "--tokenizer", corpus["tok_path"], "--steps", "6",
            "--checkpoint-dir", str(d), "--checkpoint-every", "1"]
    cli(*args, "--max-steps", "2")
    before = (d / LATEST).read_bytes()
    r = cli(*args, "--resume", check=False, env={**os.environ, "SMEDJAN_FAILPOINT": f"{op}:KILL:{nth}"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    for f in d.iterdir():
        if f.suffix == ".safetensors":
            ck.load_checkpoint(f)
    step = ck.load_checkpoint(d / LATEST).step
    if op == "dirsync":
        assert step == 3
    else:
        assert (d / LATEST).read_bytes() == before
    temps = [f.name for f in d.iterdir() if ".tmp." in f.name]
    assert len(temps) == (op not in ("open", "dirsync")), temps
    cli(*args, "--resume")
    assert not [f.name for f in d.iterdir() if ".tmp." in f.name]
    got = ck.load_checkpoint(d / LATEST)
    assert got.step == straight_run.step == 6
    for name, t in straight_run.tensors.items():
        np.testing.assert_array_equal(got.tensors[name], t, err_msg=name)


def test_bad_files_give_clear_errors_and_keep_checkpoints(corpus, tmp_path):
    d = tmp_path / "bad"
    cli(*TRAIN, "--data", corpus["data"], "--tokenizer", corpus["tok_path"], "--steps", "6",
        "--checkpoint-dir", str(d), "--checkpoint-every", "3")
    latest = d / LATEST
    good = latest.read_bytes()
    # A bit flipped in the middle of the data: CRC names the tensor.
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x10
    latest.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="CRC"):
        ck.load_checkpoint(latest)
    r = cli(*TRAIN, "--data", corpus["data"], "--checkpoint-dir", str(d), "--resume",
            "--steps", "10", check=False)
    assert r.returncode != 0 and str(latest) in r.stderr and "CRC" in r.stderr
    assert latest.read_bytes() == bytes(flipped)          # not overwritten
    # Truncated.
    latest.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=str(latest)):
        ck.load_checkpoint(latest)
    # Missing.
    with pytest.raises(OSError, match="nope.safetensors"):
        ck.load_checkpoint(d / "nope.safetensors")
    # A token file with a wrong header.
    bad = tmp_path / "bad.tok"
    bad.write_bytes(b"NOTATOKENFILE" + b"\0" * 64)
    with pytest.raises(ValueError, match="bad.tok"):
        TokenFile(bad)
    r = cli(*TRAIN, "--data", str(bad), "--steps", "2", check=False)
    assert r.returncode == 1 and "bad.tok" in r.stderr
    # Malformed JSONL names the file and the line.
    j = tmp_path / "sft.jsonl"
    j.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"sft.jsonl:2: invalid JSON"):
        load_sft_jsonl(j, corpus["tok"].encode, 32)


def test_validation_loss_falls_well_below_unigram_entropy(corpus):
    data = TokenFile(corpus["data"])
    counts = np.bincount(np.asarray(data.tokens), minlength=len(corpus["tok"])).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    model = smedjan.Model("tiny", vocab_size=len(corpus["tok"]), seed=0)
    tr = smedjan.Trainer(model, lr=3e-3, min_lr=3e-4, warmup=20, steps=300)
    rows = fit(tr, Batches(data, 8, 64, seed=0), Batches(data, 8, 64, split="val", seed=1),
               eval_every=300, eval_batches=8, progress=False)
    val = rows[-1]["val_loss"]
    assert val < unigram - 1.0, (val, unigram)


def test_generate_streams_and_is_seeded(corpus):
    model = tiny_model(len(corpus["tok"]))
    model.tokenizer = corpus["tok"]
    a = list(model.generate("def f(x):", 12, temperature=1.0, seed=3))
    b = list(model.generate("def f(x):", 12, temperature=1.0, seed=3))
    assert a == b and len(a) == 12
    it = model.generate("import", 5, temperature=0)
    assert next(iter(it)) is not None
    # Greedy equals the argmax of a full forward, token by token.
    ids = list(corpus["tok"].encode("class A:"))
    greedy = list(model.generate(ids, 6, temperature=0))
    ctx = list(ids)
    for t in greedy:
        assert t == int(np.argmax(model.forward(np.array([ctx], np.int32))[0, -1]))
        ctx.append(t)
    assert list(model.generate(ids, 6, temperature=0.7, top_k=1, seed=1)) == greedy
    # A stop token ends generation before it is yielded.
    stop = greedy[2]
    assert list(model.generate(ids, 6, temperature=0, stop=stop)) == greedy[:greedy.index(stop)]
    text = corpus["tok"].decode(greedy[:3])
    stopped = list(model.generate(ids, 6, temperature=0, stop=text[-1:]))
    assert len(stopped) <= 3


def test_generate_rejects_bad_arguments(corpus):
    model = tiny_model(len(corpus["tok"]))
    with pytest.raises(ValueError, match="no tokenizer"):
        next(model.generate("hello", 3))
    with pytest.raises(ValueError, match="empty"):
        next(model.generate([], 3))
    with pytest.raises(ValueError, match="temperature"):
        next(model.generate([1, 2], 3, temperature=-1))


def test_demo_runs_end_to_end(tmp_path):
    """`make demo`'s job with a few steps: tokenizer, token file, training with
    checkpoints, a loss plot and a generated sample."""
    out = tmp_path / "demo"
    r = cli("demo", "--steps", "12", "--out", str(out), timeout=600)
    assert "5. sample:" in r.stdout, r.stdout[-2000:]
    for f in ("tokenizer.sjt", "corpus.tok", "loss.png", "checkpoints/final.safetensors",
              "checkpoints/latest.safetensors", "checkpoints/metrics.jsonl"):
        assert (out / f).exists(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_config_file_with_flags_that_override_it(corpus, tmp_path):
    """--config run.toml gives the options (flag names as keys, - or _);
    a flag on the command line wins; the resolved options are saved as
    train.toml beside the checkpoints, and that file alone reruns the run."""
    conf = tmp_path / "run.toml"
    conf.write_text(f'data = "{corpus["data"]}"\ntokenizer = "{corpus["tok_path"]}"\n'
                    'size = "custom"\ndim = 64\nlayers = 2\nheads = 4\nkv_heads = 2\n'
                    'batch-size = 4\nseq-len = 32\nsteps = 50\nwarmup = 2\nlr = 0.002\n'
                    'fused-ce = true\n')
    d = tmp_path / "a"
    cli("train", "--config", str(conf), "--steps", "4", "--checkpoint-dir", str(d))
    c = ck.load_checkpoint(d / LATEST)
    assert c.step == 4 and c.trainer["steps"] == 4 and c.trainer["lr"] == 0.002
    assert c.config.dim == 64 and c.config.n_kv_heads == 2
    saved = (d / "train.toml").read_text()
    assert "steps = 4\n" in saved and "batch-size = 4\n" in saved and "resume" not in saved
    cli("train", "--config", str(d / "train.toml"), "--checkpoint-dir", str(tmp_path / "b"))
    again = ck.load_checkpoint(tmp_path / "b" / LATEST)
    for name, t in c.tensors.items():
        np.testing.assert_array_equal(again.tensors[name], t, err_msg=name)


@pytest.mark.parametrize("text,message", [
    ("stepz = 3\n", "unknown option 'stepz'"),
    ("steps = -3\n", "argument --steps"),
    ("resume = 1\n", "resume must be true or false"),
    ("steps = [\n", "invalid TOML"),
])
def test_a_bad_config_file_is_named(corpus, tmp_path, text, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(f'data = "{corpus["data"]}"\n' + text)
    r = cli("train", "--config", str(conf), check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    if "argument" not in message:
        assert str(conf) in r.stderr
