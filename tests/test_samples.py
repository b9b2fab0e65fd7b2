"""bin2d sample files and SampleBatches: every labelled row exactly once per
epoch, no label lost, duplicated or made up by padding, a shuffle that is a
seeded permutation per epoch, length buckets, prefetch that changes nothing
but timing, exact resume (also of a training run), and precise errors for
every malformed file."""
import json
import os
import struct
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import smedjan
from smedjan.data import SampleBatches, SampleFile
from smedjan.loop import LATEST, fit

VOCAB = 1000


def write_bin2d(path, rows, stride, masks=None, pad_id=0, header=None):
    """A bin2d file as docs/formats.md lays it out. rows: token lists; masks:
    bool lists (True: the position is a label) or None for no label index.
    header: fields to override (tests of bad files)."""
    n = len(rows)
    tokens = np.full((n, stride), pad_id, "<u4")
    for r, t in enumerate(rows):
        tokens[r, :len(t)] = t
    lengths = np.array([len(t) for t in rows], "<u4")
    body = tokens.tobytes() + lengths.tobytes()
    n_spans = 0
    if masks is not None:
        spans, starts = [], [0]
        for m in masks:
            m = np.concatenate([[False], np.asarray(m, bool), [False]])
            edges = np.flatnonzero(np.diff(m.astype(np.int8)))
            spans += [(b, e) for b, e in zip(edges[::2], edges[1::2])]
            starts.append(len(spans))
        n_spans = len(spans)
        body += np.array(starts, "<u8").tobytes() + np.array(spans, "<u4").reshape(-1, 2).tobytes()
    h = dict(magic=b"SMJBIN2D", version=1, stride=stride, n_rows=n, n_spans=n_spans,
             flags=int(masks is not None), pad_id=pad_id, reserved=bytes(24), **(header or {}))
    head = h["magic"] + struct.pack("<IIQQII", h["version"], h["stride"], h["n_rows"], h["n_spans"],
                                    h["flags"], h["pad_id"]) + h["reserved"]
    path.write_bytes(head + body)
    return path


def make_rows(n, stride, seed=0, unlabelled_every=7):
    """Rows whose first token names them (1 + row index; pad_id 0 marks a
    padding row), random lengths, and label masks with one to three spans
    (every unlabelled_every-th row has none)."""
    r = np.random.default_rng(seed)
    rows, masks = [], []
    for i in range(n):
        L = int(r.integers(2, stride + 1))
        rows.append([1 + i] + list(r.integers(1, VOCAB, L - 1)))
        m = np.zeros(L, bool)
        if i % unlabelled_every:
            for _ in range(int(r.integers(1, 4))):
                b = int(r.integers(1, L))
                m[b:int(r.integers(b + 1, L + 1))] = True
        masks.append(m)
    return rows, masks


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    rows, masks = make_rows(300, 40)
    p = write_bin2d(tmp_path_factory.mktemp("bin2d") / "sft.bin2d", rows, 40, masks)
    return dict(path=p, rows=rows, masks=masks)


def file_labels(rows, masks, ids, cut=None):
    """The (row, position, target) label triples of the given rows (rows cut
    to `cut` tokens when given)."""
    out = Counter()
    for r in ids:
        for p in np.flatnonzero(masks[r]):
            if cut is None or p < cut:
                out[(r, int(p), int(rows[r][p]))] += 1
    return out


def batch_rows(x):
    """Row ids of a batch from their first token (-1: a padding row)."""
    return [int(v) - 1 for v in x[:, 0]]


def epoch_of(b):
    """The batches of one epoch (from the loader's start of an epoch)."""
    return [next(b) for _ in range(b.epoch_batches)]


def labels_of(batches):
    got = Counter()
    for x, y in batches:
        for i, r in enumerate(batch_rows(x)):
            for t in np.flatnonzero(y[i] != -1):
                got[(r, int(t) + 1, int(y[i, t]))] += 1
    return got


def labelled(sft, split_rows):
    return [r for r in split_rows if sft["masks"][r].any()]


OPTIONS = [dict(), dict(shuffle_buffer=32), dict(bucket_sizes=[8, 16, 39]),
           dict(bucket_sizes=[8, 16, 39], shuffle_buffer=500)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("load", ["memory", "mmap"])
def test_every_labelled_row_once_per_epoch_and_every_label_once(sft, opts, load):
    f = SampleFile(sft["path"], load=load, vocab_size=VOCAB)
    b = SampleBatches(f, 8, seed=3, val_fraction=0.1, **opts)
    want_rows = labelled(sft, range(270))
    for epoch in range(2):
        batches = epoch_of(b)
        seen = [r for x, _ in batches for r in batch_rows(x)]
        assert sorted(r for r in seen if r >= 0) == want_rows
        assert labels_of(batches) == file_labels(sft["rows"], sft["masks"], want_rows)
        for x, y in batches:
            pad = np.array(batch_rows(x)) < 0
            assert (y[pad] == -1).all() and (x[pad] == f.pad_id).all()
        assert (b.epoch, b.batch) == (epoch, b.epoch_batches)


def test_val_split_is_the_last_rows(sft):
    b = SampleBatches(sft["path"], 8, split="val", val_fraction=0.1)
    seen = [r for x, _ in b.one_pass() for r in batch_rows(x) if r >= 0]
    assert seen == labelled(sft, range(270, 300))


def test_targets_are_the_next_token_at_label_positions_only(sft):
    f = SampleFile(sft["path"])
    x, y = f.batch([0, 1, 2, -1], 39)
    for i, r in enumerate([0, 1, 2]):
        t, m = np.array(sft["rows"][r]), sft["masks"][r]
        L = len(t)
        np.testing.assert_array_equal(x[i, :L - 1], t[:-1])
        assert (x[i, L - 1:] == f.pad_id).all()
        np.testing.assert_array_equal(y[i, :L - 1], np.where(m[1:], t[1:], -1))
        assert (y[i, L - 1:] == -1).all()
    assert (x[3] == f.pad_id).all() and (y[3] == -1).all()


def test_file_without_label_index_trains_every_position(tmp_path):
    rows, _ = make_rows(20, 12)
    f = SampleFile(write_bin2d(tmp_path / "plain.bin2d", rows, 12))
    assert not f.has_labels and f.span_start is None
    b = SampleBatches(f, 4, val_fraction=0.0)
    masks = [np.arange(len(t)) >= 1 for t in rows]
    assert labels_of(epoch_of(b)) == file_labels(rows, masks, range(20))


def test_shuffle_is_a_seeded_permutation_that_changes_per_epoch(sft):
    def orders(seed, epochs=3, **kw):
        b = SampleBatches(sft["path"], 4, shuffle_buffer=64, seed=seed, val_fraction=0.0, **kw)
        return [[r for x, _ in epoch_of(b) for r in batch_rows(x) if r >= 0] for _ in range(epochs)]
    a, again, other = orders(0), orders(0), orders(1)
    want = labelled(sft, range(300))
    assert all(sorted(o) == want for o in a + other)
    assert a == again
    assert a[0] != a[1] and a[1] != a[2] and a[0] != want
    assert a[0] != other[0]
    plain = SampleBatches(sft["path"], 4, val_fraction=0.0)
    assert [r for x, _ in epoch_of(plain) for r in batch_rows(x) if r >= 0] == want


def test_buckets_pick_the_smallest_fitting_T_and_pad_only_at_epoch_end(sft):
    buckets = [8, 16, 39]
    b = SampleBatches(sft["path"], 8, bucket_sizes=buckets, shuffle_buffer=50, seed=1, val_fraction=0.0)
    batches = epoch_of(b)
    padded = []
    for k, (x, y) in enumerate(batches):
        T = x.shape[1]
        assert x.shape == (8, T) and T in buckets
        for r in batch_rows(x):
            if r >= 0:
                assert T == min(s for s in buckets if s >= len(sft["rows"][r]) - 1)
        if (np.array(batch_rows(x)) < 0).any():
            padded.append(k)
    assert len(padded) <= len(buckets)
    assert padded == list(range(len(batches) - len(padded), len(batches)))


def test_rows_longer_than_the_largest_bucket_are_cut(sft):
    b = SampleBatches(sft["path"], 8, bucket_sizes=[6, 12], val_fraction=0.0)
    batches = epoch_of(b)
    assert {x.shape[1] for x, _ in batches} == {6, 12}
    want = labelled(sft, range(300))
    assert sorted(r for x, _ in batches for r in batch_rows(x) if r >= 0) == want
    assert labels_of(batches) == file_labels(sft["rows"], sft["masks"], want, cut=13)


def test_label_count_is_the_batch_targets(sft):
    b = SampleBatches(sft["path"], 8, bucket_sizes=[8, 39], prefetch_batches=2)
    for _ in range(10):
        x, y = next(b)
        assert b.label_count == int((y != -1).sum())
    b.close()


@pytest.mark.parametrize("load", ["memory", "mmap"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_prefetch_gives_the_same_batches(sft, opts, load):
    f = SampleFile(sft["path"], load=load, vocab_size=VOCAB)
    n = 2 * SampleBatches(f, 8, **opts).epoch_batches + 3
    ref = SampleBatches(f, 8, seed=5, prefetch_batches=0, **opts)
    pre = SampleBatches(f, 8, seed=5, prefetch_batches=4, **opts)
    for _ in range(n):
        (x0, y0), (x1, y1) = next(ref), next(pre)
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
        assert (ref.epoch, ref.batch, ref.label_count) == (pre.epoch, pre.batch, pre.label_count)
    pre.close()


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("taken", [0, 5, 37, 80])
def test_resume_mid_epoch_equals_uninterrupted(sft, prefetch, taken):
    kw = dict(bucket_sizes=[8, 16, 39], shuffle_buffer=40, seed=9, prefetch_batches=prefetch)
    straight = SampleBatches(sft["path"], 8, **kw)
    want = [next(straight) for _ in range(taken + 30)]
    first = SampleBatches(sft["path"], 8, **kw)
    for _ in range(taken):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == taken        # the thread running ahead is not in the state
    first.close()
    resumed = SampleBatches(sft["path"], 8, **kw)
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(want[taken:], (next(resumed) for _ in range(30))):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)


def test_resume_refuses_another_schedule(sft):
    state = SampleBatches(sft["path"], 8, shuffle_buffer=4).state_dict()
    with pytest.raises(ValueError, match="shuffle_buffer=4 but this loader has shuffle_buffer=8"):
        SampleBatches(sft["path"], 8, shuffle_buffer=8).load_state_dict(state)
    with pytest.raises(ValueError, match="not a SampleBatches state"):
        SampleBatches(sft["path"], 8).load_state_dict({"version": 1})


def test_one_pass_leaves_the_position_alone(sft):
    b = SampleBatches(sft["path"], 8, bucket_sizes=[8, 39], shuffle_buffer=16, prefetch_batches=2)
    next(b)
    state = b.state_dict()
    rows = [r for x, _ in b.one_pass() for r in batch_rows(x) if r >= 0]
    assert sorted(rows) == list(b.rows)
    assert b.state_dict() == state


def test_bad_arguments_are_refused_by_name(sft):
    for kw, msg in ((dict(bucket_sizes=[16, 8]), "bucket_sizes must be ascending"),
                    (dict(shuffle_buffer=-1), "shuffle_buffer must be an integer >= 0"),
                    (dict(prefetch_batches=-2), "prefetch_batches must be"),
                    (dict(split="test"), "split must be"),
                    (dict(seq_len=0), "seq_len must be")):
        with pytest.raises(ValueError, match=msg):
            SampleBatches(sft["path"], 8, **kw)
    with pytest.raises(ValueError, match="load must be 'memory' or 'mmap'"):
        SampleFile(sft["path"], load="disk")


# ---- malformed files ----------------------------------------------------------

def small(tmp_path, **kw):
    rows = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    masks = [[0, 0, 1, 1], [0, 1], [0, 1, 1]]
    return write_bin2d(tmp_path / "bad.bin2d", rows, 5, masks, **kw)


def patch(p, offset, fmt, value):
    b = bytearray(p.read_bytes())
    struct.pack_into(fmt, b, offset, value)
    p.write_bytes(bytes(b))


# offsets in small(): tokens 64.., lengths 124.., span_start 136.., spans 168..
@pytest.mark.parametrize("how,msg", [
    (lambda p: p.write_bytes(p.read_bytes()[:-8]),
     r"bad.bin2d: header says 3 rows of stride 5 and 3 spans, which need a different size, but the file "
     r"is 184 bytes \(wrong stride, or cut short\?\)"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), r"bad.bin2d: 40 bytes is too short for a bin2d file"),
    (lambda p: patch(p, 12, "<I", 6), r"bad.bin2d: header says 3 rows of stride 6 .*wrong stride"),
    (lambda p: patch(p, 16, "<Q", 2**62), r"bad.bin2d: header says 4611686018427387904 rows .* out of range"),
    (lambda p: patch(p, 0, "<8s", b"SMJBIN2X"), r"bad.bin2d: not a bin2d sample file"),
    (lambda p: patch(p, 8, "<I", 2), r"bad.bin2d: bin2d version 2 \(this smedjan reads version 1\)"),
    (lambda p: patch(p, 32, "<I", 3), r"bad.bin2d: flags 0x3 has unknown bits"),
    (lambda p: patch(p, 50, "<B", 1), r"bad.bin2d: reserved header byte 50 is 0x01"),
    (lambda p: patch(p, 128, "<I", 1), r"bad.bin2d: row 1: length 1 is outside \[2, stride 5\]"),
    (lambda p: patch(p, 128, "<I", 6), r"bad.bin2d: row 1: length 6 is outside \[2, stride 5\]"),
    (lambda p: patch(p, 136, "<Q", 1), r"bad.bin2d: span_start\[0\] is 1, not 0"),
    (lambda p: patch(p, 160, "<Q", 2), r"bad.bin2d: span_start\[3\] \(the last\) is 2, not n_spans 3"),
    (lambda p: patch(p, 152, "<Q", 0), r"bad.bin2d: row 1: span_start goes back from 1 to 0"),
    (lambda p: patch(p, 172, "<I", 5), r"bad.bin2d: row 0 \(length 4\): span 0 \[2, 5\) is past the row's end"),
    (lambda p: patch(p, 168, "<I", 0), r"bad.bin2d: row 0 \(length 4\): span 0 \[0, 4\) is at position 0"),
    (lambda p: patch(p, 168, "<I", 4), r"bad.bin2d: row 0 \(length 4\): span 0 \[4, 4\) is empty"),
])
def test_malformed_files_are_refused_precisely(tmp_path, how, msg):
    p = small(tmp_path)
    SampleFile(p)
    how(p)
    with pytest.raises(ValueError, match=msg):
        SampleFile(p)


def test_overlapping_and_unordered_spans_are_refused(tmp_path):
    rows = [[1, 2, 3, 4, 5, 6, 7]]
    p = write_bin2d(tmp_path / "bad.bin2d", rows, 8, [[0, 1, 1, 0, 1, 1, 0]])
    SampleFile(p)
    patch(p, 64 + 32 + 4 + 16 + 8, "<I", 2)        # the second span starts inside the first
    with pytest.raises(ValueError, match=r"row 0 \(length 7\): span 1 \[2, 6\) is out of order or overlapping"):
        SampleFile(p)


def test_spans_of_a_file_without_label_index_are_refused(tmp_path):
    p = small(tmp_path)
    patch(p, 32, "<I", 0)
    with pytest.raises(ValueError, match="n_spans is 3 but flags say there is no label index"):
        SampleFile(p)


def test_ids_past_the_vocabulary(tmp_path):
    p = write_bin2d(tmp_path / "ids.bin2d", [[1, 2, 3], [4, 50, 6]], 4, [[0, 1, 1], [0, 1, 1]])
    msg = r"ids.bin2d: row 1, position 1: token id 50 is not below the vocabulary size 10"
    with pytest.raises(ValueError, match=msg):
        SampleFile(p, load="memory", vocab_size=10)
    f = SampleFile(p, load="mmap", vocab_size=10)     # mmap: found when the row is read
    f.batch([0], 3)
    with pytest.raises(ValueError, match=msg):
        f.batch([1], 3)
    b = SampleBatches(f, 1, prefetch_batches=2, val_fraction=0.0)
    next(b)
    with pytest.raises(ValueError, match=msg):       # met on the prefetch thread, raised here
        next(b)
    with pytest.raises(ValueError, match=msg):
        next(b)
    assert b.batches == 1
    b.close()
    with pytest.raises(ValueError, match="pad_id 10 is not below the vocabulary size 10"):
        SampleFile(write_bin2d(tmp_path / "pad.bin2d", [[1, 2]], 4, pad_id=10), vocab_size=10)


def test_file_cut_short_after_open_is_an_oserror_naming_it(tmp_path):
    rows, masks = make_rows(64, 300, seed=2)
    p = write_bin2d(tmp_path / "cut.bin2d", rows, 300, masks)
    f = SampleFile(p, load="mmap")
    b = SampleBatches(f, 4, val_fraction=0.0)
    next(b)
    os.truncate(p, 4096)
    with pytest.raises(OSError, match=rf"{p}: file shrank from \d+ to 4096 bytes while open"):
        for _ in range(b.epoch_batches):
            next(b)
    mem = SampleFile(write_bin2d(tmp_path / "mem.bin2d", rows, 300, masks), load="memory")
    os.truncate(mem.path, 4096)
    assert mem.batch([63], 299)[0][0, 0] == 64         # memory mode holds its own copy


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.bin2d"):
        SampleFile("nope.bin2d")


# ---- training ---------------------------------------------------------------

def tiny_model(seed=0):
    return smedjan.Model(smedjan.Config.custom(32, 2, 4, 2, vocab_size=VOCAB, max_seq_len=64), seed=seed)


def run_fit(sft, ckpt_dir, steps, max_steps=None, resume=False, prefetch=4):
    kw = dict(bucket_sizes=[8, 16, 24, 32, 39], shuffle_buffer=32, prefetch_batches=prefetch)
    f = SampleFile(sft["path"], load="mmap", vocab_size=VOCAB)
    model = tiny_model()
    tr = smedjan.Trainer(model, lr=3e-3, warmup=3, steps=steps, grad_accum=2)
    train = SampleBatches(f, 4, seed=0, **kw)
    val = SampleBatches(f, 4, split="val", seed=1, **kw)
    rows = fit(tr, train, val, eval_every=5, eval_batches=3, checkpoint_dir=str(ckpt_dir),
               checkpoint_every=4, resume=resume, max_steps=max_steps, progress=False)
    train.close()
    val.close()
    return rows, model


def test_training_resumed_mid_epoch_with_every_option_is_bit_identical(sft, tmp_path):
    # Up to 10 shapes (5 buckets, for the micro-batches' backward and for the
    # evaluation's loss): more than the engine's 4 cached plans, so plans are
    # evicted and made again as T changes.
    straight, m1 = run_fit(sft, tmp_path / "a", 24, prefetch=0)
    first, _ = run_fit(sft, tmp_path / "b", 24, max_steps=10)
    second, m2 = run_fit(sft, tmp_path / "b", 24, resume=True)
    assert [r["step"] for r in first + second] == list(range(1, 25))
    got, want = [r["loss"] for r in first + second], [r["loss"] for r in straight]
    assert got == want, next((i, a, b) for i, (a, b) in enumerate(zip(got, want)) if a != b)
    assert [r.get("val_loss") for r in first + second] == [r.get("val_loss") for r in straight]
    np.testing.assert_array_equal(m1.flat_params, m2.flat_params)
    state = smedjan.checkpoint.load_checkpoint(str(tmp_path / "b" / LATEST)).loader["train"]
    assert state["kind"] == "samples" and state["batches"] == 2 * 24


def test_cli_trains_on_a_bin2d_file(sft, tmp_path):
    args = [sys.executable, "-m", "smedjan", "train", "--data", str(sft["path"]), "--size", "custom",
            "--dim", "32", "--layers", "1", "--heads", "2", "--vocab-size", str(VOCAB), "--batch-size", "4",
            "--steps", "6", "--warmup", "1", "--eval-every", "3", "--eval-batches", "2",
            "--bucket-sizes", "16,39", "--shuffle-buffer", "16", "--prefetch-batches", "2", "--load", "mmap",
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "3"]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bin2d, mmap" in r.stdout and "step 6: loss" in r.stdout
    state = smedjan.checkpoint.load_checkpoint(str(tmp_path / "ck" / LATEST)).loader["train"]
    assert state["bucket_sizes"] == [16, 39] and state["batches"] == 6
    tok = tmp_path / "data.tok"
    smedjan.data.write_tokens(tok, [np.arange(500) % 100])
    r = subprocess.run(args[:4] + ["--data", str(tok), "--shuffle-buffer", "8", "--steps", "1"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--shuffle-buffer needs a bin2d sample file" in r.stderr


def test_the_writer_and_the_reader_agree_row_for_row(tmp_path):
    """write_samples (the SFT writer) -> SampleFile/SampleBatches (the
    loader): every row's inputs and exactly its masked targets come back."""
    from smedjan.data import write_samples
    r = np.random.default_rng(7)
    rows = []
    for _ in range(37):
        n = int(r.integers(2, 17))
        rows.append((r.integers(0, 500, n), r.random(n) < 0.4))
    path = tmp_path / "rt.bin2d"
    written = write_samples(path, rows, stride=16, pad_id=3)
    kept = [(t, m) for t, m in rows if m[1:].any()]          # rows with no target are skipped
    assert written == len(kept)
    f = SampleFile(path, vocab_size=500)
    x, y = f.batch(np.arange(len(kept)), 15)
    for i, (t, m) in enumerate(kept):
        n = len(t)
        np.testing.assert_array_equal(x[i, :n - 1], t[:-1])
        assert (x[i, n - 1:] == 3).all()
        np.testing.assert_array_equal(y[i, :n - 1], np.where(m[1:], t[1:], -1))
        assert (y[i, n - 1:] == -1).all()
