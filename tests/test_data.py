"""Token files, batches and SFT data: the header is validated with precise
messages, writes are atomic, a resumed loader yields exactly the batches an
uninterrupted one would, and SFT targets are masked to the response."""
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from smedjan.data import Batches, TokenFile, load_sft_jsonl, render_chat, write_tokens


def text_tokens(text_bytes, n=100_000):
    return np.frombuffer(text_bytes[:n], np.uint8)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_round_trip_streaming_chunks(tmp_path, text_bytes, dtype):
    t = text_tokens(text_bytes).astype(np.int64) * 7
    p = tmp_path / "data.tok"
    chunks = [t[:1000], t[1000:1000], list(t[1000:1010]), t[1010:].astype(np.int32)]
    assert write_tokens(p, chunks, dtype=dtype) == len(t)
    tf = TokenFile(p)
    assert len(tf) == len(t) and tf.tokens.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(tf.tokens, t)
    raw = p.read_bytes()
    assert raw[:8] == b"SMJTOKEN"
    assert struct.unpack("<IIQQ", raw[8:32]) == (1, 2 if dtype == "uint16" else 4, len(t), 0)
    assert len(raw) == 32 + len(t) * (2 if dtype == "uint16" else 4)


def test_empty_token_file(tmp_path):
    p = tmp_path / "e.tok"
    assert write_tokens(p, []) == 0
    assert len(TokenFile(p)) == 0


def corrupt(p, fn):
    b = bytearray(p.read_bytes())
    b = fn(b)
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("how,msg", [
    (lambda b: b[:-4], r"data.tok: header says 1000 tokens but the file holds 998$"),
    (lambda b: b + b"\0\0", r"data.tok: header says 1000 tokens but the file holds 1001"),
    (lambda b: b[:-1], r"data.tok: header says 1000 tokens but the file holds 999 and 1 stray bytes"),
    (lambda b: b[:20], r"data.tok: 20 bytes is too short for a token file"),
    (lambda b: b"SMJTOKEX" + b[8:], r"data.tok: not a smedjan token file"),
    (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], r"data.tok: token file version 2"),
    (lambda b: b[:12] + struct.pack("<I", 3) + b[16:], r"data.tok: token width 3 bytes"),
    (lambda b: b[:24] + struct.pack("<Q", 5) + b[32:], r"data.tok: reserved header field is 5"),
    (lambda b: b[:16] + struct.pack("<Q", 2**63 + 5) + b[24:], r"data.tok: header says 9223372036854775813 tokens"),
])
def test_bad_token_headers_are_refused_precisely(tmp_path, how, msg):
    p = tmp_path / "data.tok"
    write_tokens(p, [np.arange(1000) % 100])
    corrupt(p, how)
    with pytest.raises(ValueError, match=msg):
        TokenFile(p)


def test_missing_token_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tok"):
        TokenFile(tmp_path / "nope.tok")


def test_failed_token_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "data.tok"
    write_tokens(p, [np.arange(10)])
    before = p.read_bytes()

    def chunks():
        yield np.arange(100_000) % 1000
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        write_tokens(p, chunks())
    with pytest.raises(ValueError, match=r"data.tok: chunk 1 holds token 70000, outside uint16"):
        write_tokens(p, [np.arange(5), np.array([70000])])
    with pytest.raises(ValueError, match="holds token -1"):
        write_tokens(p, [np.array([-1])], dtype="uint32")
    with pytest.raises(TypeError, match="chunk 0 has dtype float"):
        write_tokens(p, [np.ones(3)])
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["data.tok"]


# A child process: a SIGBUS there is a failed test, not a dead pytest.
SHRINK_CHILD = """
import os, sys, numpy as np
from smedjan.data import Batches, TokenFile
path, how = sys.argv[1], sys.argv[2]
tf = TokenFile(path)
b = Batches(tf, 8, 64, random=(how == "random"), val_fraction=0.0, seed=0)
next(b)
os.truncate(path, 4096)                      # another process cuts the file short
try:
    if how == "read":
        tf.read(0, len(tf))
    else:
        for _ in range(100_000):
            next(b)
except OSError as e:
    print("OSError:", e)
    print("alive after:", tf.read(0, 4).tolist())   # what is still there reads fine
    sys.exit(0)
print("no error")
sys.exit(3)
"""


@pytest.mark.parametrize("how", ["sequential", "random", "read"])
def test_token_file_cut_short_while_open_is_an_oserror_not_sigbus(tmp_path, how):
    p = tmp_path / "tokens.bin"
    write_tokens(p, [np.arange(1 << 20) % 5000])
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", SHRINK_CHILD, str(p), how], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, (f"child exited with {r.returncode} (-7 is SIGBUS)\n"
                               f"stdout: {r.stdout}\nstderr: {r.stderr[-2000:]}")
    want = f"OSError: {p}: file shrank from {32 + 2 * (1 << 20)} to 4096 bytes while open"
    assert want in r.stdout, r.stdout
    assert "alive after: [0, 1, 2, 3]" in r.stdout, r.stdout


def test_token_file_checked_reads(tmp_path):
    p = tmp_path / "data.tok"
    t = (np.arange(10_000) * 7) % 40_000
    write_tokens(p, [t])
    tf = TokenFile(p)
    np.testing.assert_array_equal(tf.read(123, 456), t[123:579])
    assert tf.read(0, 0).size == 0 and tf.max() == t.max() == tf.max(chunk=999)
    with pytest.raises(ValueError, match=r"data.tok: tokens \[9990, 10010\) lie outside the file's 10000"):
        tf.read(9990, 20)
    import pickle
    assert len(pickle.loads(pickle.dumps(tf))) == len(tf)


@pytest.fixture
def tf(tmp_path, text_bytes):
    p = tmp_path / "data.tok"
    write_tokens(p, [text_tokens(text_bytes, 20_000)])
    return TokenFile(p)


def test_batches_are_shifted_windows_of_the_file(tf):
    b = Batches(tf, 4, 32, seed=3)
    toks = np.asarray(tf.tokens)
    for _ in range(5):
        x, y = next(b)
        assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            starts = [s for s in np.flatnonzero(toks[:len(toks) - 33] == row_x[0])
                      if (toks[s:s + 33] == np.r_[row_x, row_y[-1]]).all()]
            assert starts, "a batch row that is not a window of the file"


def test_split_train_and_val_never_mix(tf):
    n_val = int(len(tf) * 0.1)
    tr = Batches(tf, 8, 16, split="train", val_fraction=0.1, seed=0)
    va = Batches(tf, 8, 16, split="val", val_fraction=0.1, seed=0, random=False)
    assert len(tr.tokens) == len(tf) - n_val and len(va.tokens) == n_val
    np.testing.assert_array_equal(va.tokens, tf.tokens[len(tf) - n_val:])
    x, _ = next(va)
    np.testing.assert_array_equal(x[0], tf.tokens[len(tf) - n_val:][:16])
    with pytest.raises(ValueError, match="val split holds 0 tokens"):
        Batches(tf, 1, 16, split="val", val_fraction=0.0)


def test_sequential_batches_walk_in_order_and_wrap(tf):
    b = Batches(tf, 3, 100, random=False, val_fraction=0.0)
    n = b.n_windows
    rows = []
    while b.epoch == 0:
        x, _ = next(b)
        rows.extend(x)
    np.testing.assert_array_equal(rows[0], tf.tokens[:100])
    np.testing.assert_array_equal(rows[1], tf.tokens[100:200])
    np.testing.assert_array_equal(rows[n], tf.tokens[:100])       # wrapped to the start
    assert sum(1 for _ in b.one_pass()) == n // 3


def test_same_seed_same_batches_different_seed_different(tf):
    a, b, c = Batches(tf, 2, 8, seed=1), Batches(tf, 2, 8, seed=1), Batches(tf, 2, 8, seed=2)
    xa, xb, xc = next(a)[0], next(b)[0], next(c)[0]
    np.testing.assert_array_equal(xa, xb)
    assert not np.array_equal(xa, xc)


@pytest.mark.parametrize("random", [True, False])
def test_loader_resume_is_exact(tf, random):
    ref = Batches(tf, 4, 64, seed=11, random=random)
    expected = [next(ref) for _ in range(400)]   # sequential: wraps around the file
    run = Batches(tf, 4, 64, seed=11, random=random)
    for _ in range(137):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))      # as stored in a checkpoint
    resumed = Batches(tf, 4, 64, seed=999, random=random)
    resumed.load_state_dict(state)
    for k in range(137, 400):
        x, y = next(resumed)
        np.testing.assert_array_equal(x, expected[k][0], err_msg=f"batch {k}")
        np.testing.assert_array_equal(y, expected[k][1])
    assert resumed.batches == 400


def test_loader_state_from_another_loader_is_refused(tf):
    s = Batches(tf, 4, 64).state_dict()
    with pytest.raises(ValueError, match="seq_len=64 but this loader has seq_len=32"):
        Batches(tf, 4, 32).load_state_dict(s)
    with pytest.raises(ValueError, match="split_tokens"):
        Batches(tf, 4, 64, val_fraction=0.2).load_state_dict(s)


def enc(s):
    return np.frombuffer(s.encode("utf-8"), np.uint8)


def write_jsonl(p, rows):
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_sft_targets_only_the_response(tmp_path):
    p = tmp_path / "sft.jsonl"
    write_jsonl(p, [{"prompt": "Hi?", "response": "Yo."}])
    x, y = load_sft_jsonl(p, enc, 64, pack=False, eos_id=3)
    text = render_chat([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}])
    full = np.r_[enc(text), 3]
    assert x.shape == y.shape == (1, 64) and x.dtype == y.dtype == np.int32
    n = len(full) - 1
    np.testing.assert_array_equal(x[0, :n], full[:-1])
    assert (x[0, n:] == 3).all()                          # padded with eos
    trained = y[0][y[0] != -1]
    np.testing.assert_array_equal(trained, np.r_[enc("Yo.\n"), 3])
    first = np.flatnonzero(y[0] != -1)[0]                  # predicted from "<|assistant|>\n"
    assert bytes(x[0, first - 13:first + 1].astype(np.uint8)) == b"<|assistant|>\n"
    assert (y[0, n:] == -1).all()


def test_sft_messages_train_every_assistant_turn_only(tmp_path):
    p = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"},
            {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"},
            {"role": "assistant", "content": "D"}]
    write_jsonl(p, [{"messages": msgs}, ""])
    x, y = load_sft_jsonl(p, enc, 128, pack=False, ignore_index=-100)
    assert bytes(y[0][y[0] != -100].astype(np.uint8)) == b"B\nD\n"


def test_sft_packing_fills_rows_and_no_pack_truncates(tmp_path):
    p = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"question {i}", "response": "answer " * (i + 1)} for i in range(20)]
    write_jsonl(p, rows)
    stream = np.concatenate([np.r_[enc(render_chat([{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["response"]}])), 0]
                             for r in rows]).astype(np.int64)
    train = np.concatenate([np.r_[np.zeros(len(enc(f"<|user|>\n{r['prompt']}\n<|assistant|>\n")), bool),
                                  np.ones(len(enc(r["response"] + "\n")) + 1, bool)] for r in rows])
    want_x, want_y = [], []
    for s in range(0, len(stream) - 1, 32):          # rows of 33 tokens, stride 32
        t, m = stream[s:s + 33], train[s:s + 33]
        yx = np.where(m[1:], t[1:], -1)
        if (yx != -1).any():                          # rows with nothing to learn are dropped
            want_x.append(np.pad(t[:-1], (0, 32 - len(t) + 1)))
            want_y.append(np.pad(yx, (0, 32 - len(t) + 1), constant_values=-1))
    x, y = load_sft_jsonl(p, enc, 32, pack=True, eos_id=0)
    np.testing.assert_array_equal(x, np.array(want_x))
    np.testing.assert_array_equal(y, np.array(want_y))
    assert len(x) > 40
    xn, yn = load_sft_jsonl(p, enc, 64, pack=False)
    assert xn.shape == (20, 64)                        # one row per example
    assert (xn[5:, -1] != 0).all()                     # long examples truncated, not dropped
    assert (xn[0, -10:] == 0).all() and (yn[0, -10:] == -1).all()   # short ones padded
    assert load_sft_jsonl(p, enc, 30, pack=False)[0].shape == (0, 30)  # no response fits: dropped


@pytest.mark.parametrize("line,msg", [
    ("{not json", r"bad.jsonl:2: invalid JSON"),
    (json.dumps({"prompt": "x"}), r"bad.jsonl:2: expected"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"bad.jsonl:2: messages\[0\] has role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r"bad.jsonl:2: no assistant message"),
    (json.dumps({"prompt": 1, "response": "x"}), r"bad.jsonl:2: 'prompt' and 'response' must be strings"),
    (json.dumps([1, 2]), r"bad.jsonl:2: expected a JSON object"),
])
def test_malformed_sft_line_names_file_and_line(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=msg):
        load_sft_jsonl(p, enc, 16)


def llmc_file(path, ids, magic=20240520, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = magic, version, len(ids) if count is None else count
    dtype = "<u2" if magic == 20240520 else "<u4"
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(ids, dtype).tobytes())


def test_nanogpt_and_llmc_token_files_convert_exactly(tmp_path):
    from smedjan.data import convert_tokens
    ids = np.random.default_rng(0).integers(0, 50257, 100_001)
    np.asarray(ids, "<u2").tofile(tmp_path / "train.bin")          # nanoGPT's prepare.py
    assert convert_tokens(tmp_path / "train.bin", tmp_path / "a.tok") == len(ids)
    llmc_file(tmp_path / "gpt2.bin", ids)
    assert convert_tokens(tmp_path / "gpt2.bin", tmp_path / "b.tok", chunk=4096) == len(ids)
    big = np.concatenate([ids, [128_000]])                          # llama-3 ids need 32 bits
    llmc_file(tmp_path / "llama3.bin", big, magic=20240801, version=7)
    convert_tokens(tmp_path / "llama3.bin", tmp_path / "c.tok")
    for name, want in (("a", ids), ("b", ids), ("c", big)):
        got = TokenFile(tmp_path / f"{name}.tok")
        np.testing.assert_array_equal(got.read(0, len(got)), want, err_msg=name)
    assert TokenFile(tmp_path / "a.tok").tokens.dtype == np.uint16
    assert TokenFile(tmp_path / "c.tok").tokens.dtype == np.uint32


def test_a_bad_foreign_token_file_is_named_and_writes_nothing(tmp_path):
    from smedjan.data import convert_tokens
    llmc_file(tmp_path / "short.bin", np.arange(10), count=11)
    llmc_file(tmp_path / "version.bin", np.arange(10), version=2)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    for name, fmt, msg in (("short.bin", "auto", "header says 11 tokens"),
                           ("version.bin", "auto", "goes with version 1, the header says 2"),
                           ("odd.bin", "nanogpt", "not a whole number of uint16"),
                           ("odd.bin", "llmc", "not an llm.c token file")):
        with pytest.raises(ValueError, match=f"{name}: .*{msg}"):
            convert_tokens(tmp_path / name, tmp_path / "out.tok", format=fmt)
        assert not (tmp_path / "out.tok").exists()


def test_convert_tokens_command(tmp_path):
    llmc_file(tmp_path / "val.bin", np.arange(1000) % 300)
    r = subprocess.run([sys.executable, "-m", "smedjan", "convert-tokens", str(tmp_path / "val.bin"),
                        "-o", str(tmp_path / "val.tok")], capture_output=True, text=True)
    assert r.returncode == 0 and "1,000 tokens" in r.stdout, r.stderr
    assert len(TokenFile(tmp_path / "val.tok")) == 1000


def test_batches_say_what_they_are(tmp_path):
    write_tokens(tmp_path / "d.tok", [np.arange(5000) % 50])
    b = Batches(TokenFile(tmp_path / "d.tok"), 2, 8, random=False)
    next(b)
    assert repr(b) == (f"Batches({str(tmp_path / 'd.tok')!r}, batch_size=2, seq_len=8, "
                       "split='train' (4,750 tokens), sequential, epoch=0, batches=1)")
