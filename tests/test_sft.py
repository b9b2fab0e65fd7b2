"""SFT from JSONL to a bin2d sample file: the chat templates and their label
masks, bad lines named by file and line, long examples counted, the bytes of
the file exactly as docs/formats.md lays them out, written atomically, the
`smedjan prepare --sft` command, and the stdlib SFT set builder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import smedjan
from smedjan.data import (ChatTemplate, SampleWriter, load_sft_jsonl, prepare_sft, read_sft_jsonl,
                          write_samples)
from conftest import stdlib_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "four"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "six, I think"}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """Two tokenizers trained on real text: one with ChatML's specials, one
    with only <|endoftext|>; saved for the command line."""
    d = tmp_path_factory.mktemp("tok")
    text = [stdlib_text(200_000).decode("utf-8", "replace")]
    chatml = smedjan.Tokenizer.train(text, vocab_size=600,
                                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    plain = smedjan.Tokenizer.train(text, vocab_size=600)
    chatml.save(d / "chatml.sjt")
    plain.save(d / "plain.sjt")
    return dict(chatml=chatml, plain=plain, chatml_path=str(d / "chatml.sjt"),
                plain_path=str(d / "plain.sjt"))


def parse_bin2d(b: bytes) -> dict:
    """A bin2d file read with numpy alone, every size checked (docs/formats.md)."""
    assert b[:8] == b"SMJBIN2D", b[:8]
    version, stride = (int(v) for v in np.frombuffer(b, "<u4", 2, 8))
    n_rows, n_spans = (int(v) for v in np.frombuffer(b, "<u8", 2, 16))
    flags, pad_id = (int(v) for v in np.frombuffer(b, "<u4", 2, 32))
    assert version == 1 and flags in (0, 1) and b[40:64] == bytes(24)
    off = 64
    tokens = np.frombuffer(b, "<u4", n_rows * stride, off).reshape(n_rows, stride)
    off += 4 * n_rows * stride
    lengths = np.frombuffer(b, "<u4", n_rows, off)
    off += 4 * n_rows
    span_start = spans = None
    if flags & 1:
        span_start = np.frombuffer(b, "<u8", n_rows + 1, off)
        off += 8 * (n_rows + 1)
        spans = np.frombuffer(b, "<u4", 2 * n_spans, off).reshape(n_spans, 2)
        off += 8 * n_spans
    else:
        assert n_spans == 0
    assert off == len(b), f"file holds {len(b)} bytes, the header accounts for {off}"
    return dict(stride=stride, pad_id=pad_id, labels=bool(flags & 1), tokens=tokens,
                lengths=lengths, span_start=span_start, spans=spans)


def row_labels(f: dict, r: int) -> np.ndarray:
    """Row r's label mask from the file's span index."""
    mask = np.zeros(int(f["lengths"][r]), bool)
    for begin, end in f["spans"][f["span_start"][r]:f["span_start"][r + 1]]:
        mask[begin:end] = True
    return mask


def labelled_text(f: dict, r: int, tok) -> str:
    """The tokens of row r that are labels, decoded."""
    return tok.decode(f["tokens"][r][:f["lengths"][r]][row_labels(f, r)])


def runs(mask):
    """[begin, end) of each maximal run of True."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def write_jsonl(p, rows):
    p.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return p


# ---- templates -------------------------------------------------------------------

def test_chatml_is_chosen_when_the_tokenizer_has_im_start_and_im_end(toks):
    assert ChatTemplate.for_tokenizer(toks["chatml"]).kind == "chatml"
    assert ChatTemplate.for_tokenizer(toks["plain"]).kind == "plain"
    assert ChatTemplate.for_tokenizer(toks["chatml"], "plain").kind == "plain"
    with pytest.raises(ValueError, match=r"chatml: the tokenizer has no <\|im_start\|>"):
        ChatTemplate.for_tokenizer(toks["plain"], "chatml")
    bare = smedjan.Tokenizer.train(["abc abc"] * 5, vocab_size=260, special_tokens=[])
    with pytest.raises(ValueError, match="plain: the tokenizer has no end-of-sequence special token"):
        ChatTemplate.for_tokenizer(bare)


def test_chatml_renders_as_smollm2_and_qwen_do(toks):
    t = ChatTemplate.for_tokenizer(toks["chatml"])
    assert t.render(CHAT[1:3], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nfour<|im_end|>\n")
    assert t.render(CHAT[1:2], add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind,turn_end", [("chatml", "<|im_end|>"), ("plain", "\n<|endoftext|>")])
def test_labels_are_exactly_each_assistant_content_and_its_end_marker(toks, kind, turn_end):
    tok = toks["chatml"]
    ids, labels = ChatTemplate.for_tokenizer(tok, kind).encode(CHAT)
    labelled = [tok.decode(ids[b:e]) for b, e in runs(labels)]
    assert labelled == ["four" + turn_end, "six, I think" + turn_end]
    # Everything else is context, and the whole sequence is the rendered text.
    assert tok.decode(ids) == ChatTemplate.for_tokenizer(tok, kind).render(CHAT)


def test_special_tokens_are_single_ids_and_message_text_never_becomes_one(toks):
    tok = toks["chatml"]
    sp = tok.special_tokens
    tricky = [{"role": "user", "content": "say <|im_end|>"},
              {"role": "assistant", "content": "<|im_start|>no<|endoftext|>"}]
    ids, labels = ChatTemplate.for_tokenizer(tok).encode(tricky)
    assert (ids == sp["<|im_start|>"]).sum() == 2 and (ids == sp["<|im_end|>"]).sum() == 2
    assert (ids == sp["<|endoftext|>"]).sum() == 0
    assert tok.decode(ids[labels]) == "<|im_start|>no<|endoftext|><|im_end|>"
    ids, _ = ChatTemplate.for_tokenizer(tok, "plain").encode(tricky)
    assert (ids == sp["<|endoftext|>"]).sum() == 1 and (ids == sp["<|im_end|>"]).sum() == 0


def test_load_sft_jsonl_takes_a_template(toks, tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    tok = toks["chatml"]
    x, y = load_sft_jsonl(p, ChatTemplate.for_tokenizer(tok), 256, pack=False)
    assert tok.decode(y[0][y[0] != -1]) == "four<|im_end|>six, I think<|im_end|>"


# ---- JSONL: shapes and bad lines ---------------------------------------------------

def test_prompt_completion_and_prompt_response_are_a_user_assistant_chat(toks, tmp_path):
    t = ChatTemplate.for_tokenizer(toks["chatml"])
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "completion": "A"},
                                               {"prompt": "Q", "response": "A"},
                                               {"messages": [{"role": "user", "content": "Q"},
                                                             {"role": "assistant", "content": "A"}]}])
    got = [(ids.tolist(), lab.tolist()) for _, ids, lab in read_sft_jsonl(p, t)]
    assert got[0] == got[1] == got[2]


BAD_LINES = [
    (b'{"prompt": "caf\xe9", "response": "b"}', r"invalid UTF-8 \(byte 0xe9 at column 16"),
    (b'{"prompt": oops}', r"invalid JSON \(Expecting value at column 12\)"),
    (b'[1, 2]', r"expected a JSON object, got list"),
    (b'{"question": "a"}',
     r"expected \{'prompt', 'response'\}, \{'prompt', 'completion'\} or \{'messages'\}"),
    (b'{"prompt": 1, "completion": "b"}', r"'prompt' and 'completion' must be strings"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', r"messages\[0\] has role 'robot'"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', r"no assistant message"),
    (b'{"prompt": "a", "response": ""}', r"the assistant turns are empty after tokenisation"),
    (b'{"prompt": "x\\ud800", "response": "b"}', r"text is not valid Unicode"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_a_bad_line_stops_prepare_with_file_line_and_reason(toks, tmp_path, line, reason):
    p = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, line])
    out = tmp_path / "out.bin2d"
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: " + reason):
        prepare_sft(p, toks["chatml"], 32, out)
    assert not out.exists() and os.listdir(tmp_path) == ["sft.jsonl"]


def test_skip_bad_lines_counts_them_and_keeps_every_good_one(toks, tmp_path):
    good = [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(5)]
    lines = [good[0], BAD_LINES[1][0], good[1], b"", good[2], BAD_LINES[6][0], good[3],
             BAD_LINES[0][0], good[4]]
    p = write_jsonl(tmp_path / "mixed.jsonl", lines)
    out = tmp_path / "mixed.bin2d"
    st = prepare_sft(p, toks["chatml"], 64, out, skip_bad_lines=True)
    assert (st.rows, st.examples, st.bad_lines) == (5, 5, 3)
    assert [r.split(": ")[0] for r in st.bad_reasons] == [f"{p}:2", f"{p}:6", f"{p}:8"]
    assert json.loads((tmp_path / "mixed.bin2d.json").read_text())["bad_lines"] == 3
    f = parse_bin2d(out.read_bytes())
    tok = toks["chatml"]
    got = [labelled_text(f, r, tok) for r in range(5)]
    assert got == [f"answer {i}<|im_end|>" for i in range(5)]


def test_lines_encoded_in_chunks_give_the_same_examples_and_the_first_error(toks, tmp_path):
    t = ChatTemplate.for_tokenizer(toks["chatml"])
    lines = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(7)]
    lines[3], lines[5] = BAD_LINES[8][0], BAD_LINES[1][0]        # a surrogate, invalid JSON
    p = write_jsonl(tmp_path / "c.jsonl", lines)
    got = {}
    for chunk in (1, 2, 1024):
        bad = []
        examples = read_sft_jsonl(p, t, skip_bad_lines=True, bad_lines=bad, chunk_lines=chunk)
        got[chunk] = [(w, i.tolist(), m.tolist()) for w, i, m in examples]
        assert [b.split(": ")[0] for b in bad] == [f"{p}:4", f"{p}:6"]
        with pytest.raises(ValueError, match=r"c\.jsonl:4: text is not valid Unicode"):
            list(read_sft_jsonl(p, t, chunk_lines=chunk))
    assert got[1] == got[2] == got[1024] and len(got[1]) == 5


def test_long_examples_are_truncated_or_dropped_and_counted(toks, tmp_path):
    tok = toks["chatml"]
    rows = [{"prompt": "short", "response": "yes"},
            {"prompt": "q", "response": "word " * 200},            # answer runs past the stride
            {"prompt": "word " * 200, "response": "late"}]         # no label left once cut
    p = write_jsonl(tmp_path / "long.jsonl", rows)
    st = prepare_sft(p, tok, 32, tmp_path / "t.bin2d")
    assert (st.rows, st.truncated, st.dropped_long, st.no_label) == (2, 2, 0, 1)
    f = parse_bin2d((tmp_path / "t.bin2d").read_bytes())
    assert f["lengths"].tolist()[1] == 33 and row_labels(f, 1)[-1]
    full, _ = ChatTemplate.for_tokenizer(tok).encode(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}])
    np.testing.assert_array_equal(f["tokens"][1], full[:33])
    st = prepare_sft(p, tok, 32, tmp_path / "d.bin2d", on_long="drop")
    assert (st.rows, st.truncated, st.dropped_long, st.no_label) == (1, 0, 2, 0)
    with pytest.raises(ValueError, match="on_long must be one of truncate, drop"):
        prepare_sft(p, tok, 32, tmp_path / "x.bin2d", on_long="wrap")


# ---- write_samples: the bytes -------------------------------------------------------

def test_write_samples_writes_exactly_the_bin2d_format(tmp_path):
    T = np.array
    samples = [
        (T([7, 8, 9, 10, 11]), T([True, True, False, True, True])),   # position 0 is never a label
        (T([1, 2, 3, 4, 5, 6, 7, 8]), T([False, True, False, True, False, True, True, True])),
        (T([70000, 4_000_000_000]), T([False, True])),
    ]
    p = tmp_path / "s.bin2d"
    assert write_samples(p, samples, stride=8, pad_id=99) == 3
    b = p.read_bytes()
    assert len(b) == 64 + 4 * 3 * 8 + 4 * 3 + 8 * 4 + 8 * 6
    f = parse_bin2d(b)
    assert (f["stride"], f["pad_id"], f["labels"]) == (8, 99, True)
    assert f["lengths"].tolist() == [5, 8, 2]
    assert f["tokens"].tolist() == [[7, 8, 9, 10, 11, 99, 99, 99], [1, 2, 3, 4, 5, 6, 7, 8],
                                    [70000, 4_000_000_000, 99, 99, 99, 99, 99, 99]]
    assert f["span_start"].tolist() == [0, 2, 5, 6]
    assert f["spans"].tolist() == [[1, 2], [3, 5], [1, 2], [3, 4], [5, 8], [1, 2]]


def test_without_labels_there_is_no_index_and_every_row_trains(tmp_path):
    p = tmp_path / "plain.bin2d"
    assert write_samples(p, [np.arange(3), (np.arange(4), None), np.arange(1)], 4, labels=False) == 2
    f = parse_bin2d(p.read_bytes())
    assert not f["labels"] and f["lengths"].tolist() == [3, 4]
    assert len(p.read_bytes()) == 64 + 4 * 2 * 4 + 4 * 2


def test_short_and_unlabelled_rows_are_skipped_and_counted(tmp_path):
    with SampleWriter(tmp_path / "s.bin2d", 4) as w:
        assert w.write(np.array([1, 2]), np.array([False, True]))
        assert not w.write(np.array([1]), np.array([True]))                  # one token
        assert not w.write(np.array([1, 2, 3]), np.array([True, False, False]))  # only position 0
        assert not w.write(np.zeros(0, np.int64), np.zeros(0, bool))
    assert (w.rows, w.skipped, w.tokens, w.label_tokens) == (1, 3, 2, 1)
    assert parse_bin2d((tmp_path / "s.bin2d").read_bytes())["lengths"].tolist() == [2]


@pytest.mark.parametrize("sample,stride,err,msg", [
    ((np.array([1, -1]), np.array([False, True])), 4, ValueError, r"token -1 is outside uint32"),
    ((np.array([1, 2 ** 32]), np.array([False, True])), 4, ValueError, r"token 4294967296 is outside uint32"),
    ((np.arange(5), np.ones(5, bool)), 4, ValueError, r"5 tokens, more than the stride 4"),
    ((np.arange(3), np.ones(2, bool)), 4, ValueError, r"3 tokens but 2 labels"),
    ((np.arange(3), np.ones(3, np.int8)), 4, TypeError, r"labels have dtype int8, expected bool"),
    ((np.arange(3), None), 4, ValueError, r"no label mask"),
    ((np.array([1.0, 2.0]), np.ones(2, bool)), 4, TypeError, r"tokens have dtype float64"),
    ((np.arange(3), np.ones(3, bool)), 1, ValueError, r"stride must be in \[2,"),
])
def test_write_samples_refuses_bad_rows_and_leaves_no_file(tmp_path, sample, stride, err, msg):
    p = tmp_path / "s.bin2d"
    with pytest.raises(err, match=msg):
        write_samples(p, [(np.arange(3), np.ones(3, bool)), sample], stride)
    assert os.listdir(tmp_path) == []


def test_write_samples_is_atomic_and_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "s.bin2d"
    write_samples(p, [(np.arange(4), np.ones(4, bool))], 4)
    before = p.read_bytes()

    def stream():
        for i in range(100):
            yield np.arange(4) + i, np.ones(4, bool)
            if i == 50:
                raise RuntimeError("source failed mid-stream")
    with pytest.raises(RuntimeError, match="mid-stream"):
        write_samples(p, stream(), 4)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["s.bin2d"]
    monkeypatch.setenv("SMEDJAN_FAILPOINT", "write:ENOSPC:20")      # the disk fills up
    with pytest.raises(OSError, match="s.bin2d: write failed"):
        write_samples(p, ((np.arange(4), np.ones(4, bool)) for _ in range(100)), 4)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["s.bin2d"]
    monkeypatch.setenv("SMEDJAN_FAILPOINT", "rename:EIO")
    with pytest.raises(OSError, match="rename failed"):
        write_samples(p, [(np.arange(4), np.ones(4, bool))] * 3, 4)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["s.bin2d"]


# ---- the command line ---------------------------------------------------------------

def smedjan_cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "smedjan", *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    if check and r.returncode != 0:
        raise AssertionError(r.stderr)
    return r


def test_prepare_sft_on_the_command_line_end_to_end(toks, tmp_path):
    rows = [{"messages": CHAT}, {"prompt": "Name a colour.", "completion": "Blue."},
            {"prompt": "Count to three.", "response": "one two three"}]
    p = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "chat.bin2d"
    r = smedjan_cli("prepare", "--sft", str(p), "--tokenizer", toks["chatml_path"], "--seq-len", "128",
                    "-o", str(out))
    f = parse_bin2d(out.read_bytes())
    assert f["stride"] == 129 and len(f["lengths"]) == 3
    tok = toks["chatml"]
    got = [labelled_text(f, r, tok) for r in range(3)]
    assert got == ["four<|im_end|>six, I think<|im_end|>", "Blue.<|im_end|>", "one two three<|im_end|>"]
    label_tokens = sum(int(row_labels(f, r).sum()) for r in range(3))
    assert f"3 rows, {int(f['lengths'].sum())} tokens, {label_tokens} label tokens" in r.stdout
    assert "template chatml" in r.stdout
    # The Python API writes the same bytes.
    prepare_sft(p, tok, 128, tmp_path / "api.bin2d")
    assert (tmp_path / "api.bin2d").read_bytes() == out.read_bytes()
    # The plain template, chosen by flag.
    smedjan_cli("prepare", "--sft", str(p), "--tokenizer", toks["chatml_path"], "--seq-len", "128",
                "-o", str(tmp_path / "plain.bin2d"), "--chat-template", "plain")
    f = parse_bin2d((tmp_path / "plain.bin2d").read_bytes())
    assert labelled_text(f, 1, tok) == "Blue.\n<|endoftext|>"


def test_prepare_sft_command_line_reports_bad_lines(toks, tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, b"{oops",
                                             {"prompt": "c", "response": "d"}])
    args = ["prepare", "--sft", str(p), "--tokenizer", toks["plain_path"], "--seq-len", "64",
            "-o", str(tmp_path / "bad.bin2d")]
    r = smedjan_cli(*args, check=False)
    assert r.returncode == 1 and f"{p}:2: invalid JSON" in r.stderr
    assert not (tmp_path / "bad.bin2d").exists()
    r = smedjan_cli(*args, "--skip-bad-lines")
    assert f"skipped {p}:2: invalid JSON" in r.stderr
    assert "2 rows" in r.stdout and "1 bad lines skipped" in r.stdout
    r = smedjan_cli("prepare", "--sft", str(p), "--tokenizer", toks["plain_path"],
                    "-o", str(tmp_path / "x.bin2d"), check=False)
    assert r.returncode == 1 and "--sft needs --seq-len" in r.stderr
    r = smedjan_cli("prepare", "--tokenizer", toks["plain_path"], "-o", str(tmp_path / "x.bin2d"),
                    check=False)
    assert r.returncode == 1 and "give text files or --sft JSONL, one of the two" in r.stderr


# ---- the stdlib SFT set --------------------------------------------------------------

def test_make_sft_stdlib_builds_valid_chat_jsonl_deterministically(toks, tmp_path):
    script = os.path.join(ROOT, "benchmarks", "make_sft_stdlib.py")
    args = [sys.executable, script, "--modules", "json.decoder,textwrap", "--val-fraction", "0.5"]
    r1, r2 = (subprocess.run(args + ["-o", str(tmp_path / d / "sft")], capture_output=True, text=True,
                             check=True) for d in ("a", "b"))
    sha = lambda out: [line.split("sha256 ")[1] for line in out.splitlines() if "sha256" in line]
    assert sha(r1.stdout) == sha(r2.stdout) and len(sha(r1.stdout)) == 2
    lines = []
    for split in ("train", "val"):
        lines += [json.loads(s) for s in (tmp_path / "a" / f"sft.{split}.jsonl").read_text().splitlines()]
    assert {x["module"] for x in lines} == {"json.decoder", "textwrap"}
    assert len(lines) > 10
    for x in lines:
        user, asst = x["messages"]
        assert (user["role"], asst["role"]) == ("user", "assistant")
        assert user["content"].startswith(("def ", "async def ")) and '"""' in user["content"]
        assert asst["content"].strip() and '"""' not in asst["content"].splitlines()[0]
    dedent = next(x for x in lines if x["name"] == "dedent")
    assert "def dedent(text):" in dedent["messages"][0]["content"]
    assert dedent["messages"][1]["content"].startswith("# Look for the longest leading string")
    st = prepare_sft(tmp_path / "a" / "sft.train.jsonl", toks["chatml"], 256, tmp_path / "sft.bin2d")
    assert st.rows > 0 and st.bad_lines == 0 and st.label_tokens > 0
