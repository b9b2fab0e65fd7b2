"""bin2d sample files and the batches drawn from them (smedjan.data
re-exports both): one row per sample, padded to a fixed stride, with a
label index saying which positions train (docs/formats.md "bin2d").

The engine validates the file at open and assembles every batch in C
without the GIL, on a prefetch thread when asked; this module picks the
split's rows and keeps the position (epoch, batches handed out) that makes
resume exact.

>>> # f = SampleFile("sft.bin2d", load="memory", vocab_size=8192)
>>> # b = SampleBatches(f, 32, bucket_sizes=[128, 256, 512], shuffle_buffer=512,
>>> #                   prefetch_batches=4, seed=0)
>>> # x, y = next(b)          # int32 (32, T), T one of the buckets
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from . import _C

MAGIC = b"SMJBIN2D"
HEADER_BYTES = 64
LOADS = ("memory", "mmap")


def is_sample_file(path) -> bool:
    """True when the file starts with the bin2d magic (any other file,
    including one too short to say, is not)."""
    with open(os.fspath(path), "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


class SampleFile:
    """A validated bin2d file.

    Open checks every header field against the file size, every length, the
    span index and every span; errors name the file and the field or row
    ("sft.bin2d: row 7 (length 12): span 9 [4, 15) is past the row's end").
    load="memory" reads the tokens into memory and checks them against
    vocab_size (when given) once; load="mmap" reads each batch's rows with
    pread() and checks their ids there, so a file cut short after open is an
    OSError naming it, never a SIGBUS.

    Attributes: path, load, stride, n_rows, n_spans, pad_id, has_labels,
    vocab_size; lengths (uint32, n_rows), span_start (uint64, n_rows + 1) and
    spans (uint32, (n_spans, 2)) — the last two None without a label index.

    >>> # SampleFile("sft.bin2d").lengths[:4]
    """

    def __init__(self, path, load: str = "memory", vocab_size: Optional[int] = None):
        self.path = os.fspath(path)
        if load not in LOADS:
            raise ValueError(f"{self.path}: load must be 'memory' or 'mmap', got {load!r}")
        if vocab_size is not None and int(vocab_size) < 1:
            raise ValueError(f"{self.path}: vocab_size must be >= 1, got {vocab_size}")
        if not os.path.exists(self.path):
            raise FileNotFoundError(2, f"{self.path}: no such file", self.path)
        self.load, self.vocab_size = load, vocab_size
        self._f = _C.SampleFile(self.path, load, int(vocab_size or 0))
        self.stride, self.n_rows, self.n_spans = self._f.stride, self._f.n_rows, self._f.n_spans
        self.pad_id, self.has_labels = self._f.pad_id, bool(self._f.flags & 1)
        lengths, span_start, spans = self._f.index()
        self.lengths = np.frombuffer(lengths, np.uint32)
        self.span_start = None if span_start is None else np.frombuffer(span_start, np.uint64)
        self.spans = None if spans is None else np.frombuffer(spans, np.uint32).reshape(-1, 2)

    @property
    def row_labels(self) -> np.ndarray:
        """Label positions per row (int64, n_rows): all of 1..L-1 without a
        label index."""
        if self.spans is None:
            return self.lengths.astype(np.int64) - 1
        per_span = self.spans[:, 1].astype(np.int64) - self.spans[:, 0]
        ends = np.concatenate([[0], np.cumsum(per_span)])
        return ends[self.span_start[1:].astype(np.int64)] - ends[self.span_start[:-1].astype(np.int64)]

    def batch(self, rows: Sequence[int], seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
        """(x, y) int32 (len(rows), seq_len) for these rows (-1: a padding row),
        as SampleBatches makes them."""
        rows = np.ascontiguousarray(rows, np.int64)
        x = np.empty((len(rows), int(seq_len)), np.int32)
        y = np.empty_like(x)
        self._f.batch(rows, x, y)
        return x, y

    def __len__(self) -> int:
        return self.n_rows

    def __reduce__(self):
        return (SampleFile, (self.path, self.load, self.vocab_size))

    def __repr__(self) -> str:
        return (f"SampleFile({self.path!r}, rows={self.n_rows:,}, stride={self.stride}, "
                f"spans={self.n_spans:,}, load={self.load!r})")


def _bucket_sizes(bucket_sizes) -> Optional[Tuple[int, ...]]:
    if bucket_sizes is None:
        return None
    if isinstance(bucket_sizes, str):
        bucket_sizes = [v for v in bucket_sizes.split(",") if v.strip()]
    sizes = tuple(int(v) for v in bucket_sizes)
    if not sizes or any(v < 1 for v in sizes) or list(sizes) != sorted(set(sizes)):
        raise ValueError(f"bucket_sizes must be ascending integers >= 1, got {list(sizes)}")
    return sizes


class SampleBatches:
    """(x, y) int32 batches of shape (batch_size, T) from a bin2d file, in a
    schedule that is a pure function of (seed, epoch).

    The split is the first (train) or last (val) val_fraction of the rows;
    rows without a label are left out. Each epoch visits every other row of
    the split exactly once: in file order (shuffle_buffer=0) or through a
    streaming shuffle buffer of shuffle_buffer rows seeded from (seed,
    epoch). With bucket_sizes (ascending), a row joins the smallest bucket
    >= its length - 1 (rows longer than the largest are cut to it) and a
    full bucket gives a batch with T = that bucket; at the end of an epoch
    the partial buckets give batches filled up with padding rows (every
    target ignored), so the batch size never changes. Without buckets T =
    seq_len (default: stride - 1). Targets are -1 where a position is not a
    label. label_count is the number of targets that are not -1 in the
    batch last handed out.

    prefetch_batches=N > 0 assembles the next N batches on a thread (in C,
    without the GIL); the batches are identical with and without it, and
    the state counts only batches handed out. Iteration never ends;
    one_pass() walks the split once for evaluation. state_dict() /
    load_state_dict() resume exactly: the position is (epoch, batch), the
    skipped batches are recomputed, not read. close() (or the garbage
    collector) stops the thread.

    >>> # b = SampleBatches("sft.bin2d", 8, bucket_sizes=[128, 256], shuffle_buffer=256)
    >>> # x, y = next(b); b.label_count
    """

    def __init__(self, samples: Union[SampleFile, str, os.PathLike], batch_size: int, *,
                 seq_len: Optional[int] = None, bucket_sizes: Optional[Sequence[int]] = None,
                 shuffle_buffer: int = 0, prefetch_batches: int = 0, seed: int = 0,
                 split: str = "train", val_fraction: float = 0.05):
        f = samples if isinstance(samples, SampleFile) else SampleFile(samples)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for name, v, least in (("batch_size", batch_size, 1), ("shuffle_buffer", shuffle_buffer, 0),
                               ("prefetch_batches", prefetch_batches, 0), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or v < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {v!r}")
        if seq_len is not None and (not isinstance(seq_len, (int, np.integer)) or seq_len < 1):
            raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        self.file, self.batch_size = f, int(batch_size)
        self.bucket_sizes = _bucket_sizes(bucket_sizes)
        self.seq_len = int(seq_len) if seq_len is not None else f.stride - 1
        self.shuffle_buffer, self.prefetch_batches = int(shuffle_buffer), int(prefetch_batches)
        self.seed, self.split, self.val_fraction = int(seed), split, val_fraction
        n_val = int(f.n_rows * val_fraction)
        lo, hi = (0, f.n_rows - n_val) if split == "train" else (f.n_rows - n_val, f.n_rows)
        rows = np.arange(lo, hi, dtype=np.int64)
        self.rows = rows[f.row_labels[lo:hi] > 0]
        if len(self.rows) == 0:
            raise ValueError(f"{f.path}: the {split} split (rows {lo}..{hi - 1}) holds no row with a label")
        self._loader = self._open(self.shuffle_buffer, self.seed, self.prefetch_batches)
        self.epoch = 0          # the epoch of the next batch
        self.batch = 0          # batches of that epoch handed out
        self.batches = 0        # batches handed out in all
        self.label_count = 0    # targets that are not -1 in the last batch

    def _open(self, shuffle_buffer: int, seed: int, prefetch: int):
        return _C.SampleLoader(self.file._f, self.rows, self.batch_size, self.seq_len,
                               self.bucket_sizes, shuffle_buffer, seed, prefetch)

    @property
    def max_seq_len(self) -> int:
        """The largest T a batch can have."""
        return self.bucket_sizes[-1] if self.bucket_sizes else self.seq_len

    @property
    def pad_id(self) -> int:
        return self.file.pad_id

    @property
    def epoch_batches(self) -> int:
        """Batches in every epoch (padded ones included)."""
        return self._loader.epoch_batches

    @staticmethod
    def _take(loader, batch_size: int):
        T = loader.peek()
        x = np.empty((batch_size, T), np.int32)
        y = np.empty_like(x)
        labels, epoch, index = loader.next(x, y)
        return x, y, labels, epoch, index

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> Tuple[np.ndarray, np.ndarray]:
        x, y, self.label_count, epoch, index = self._take(self._loader, self.batch_size)
        self.epoch, self.batch = epoch, index + 1
        self.batches += 1
        return x, y

    def one_pass(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Every row of the split once, in file order and the same buckets
        (for evaluation); does not touch the loader's state."""
        loader = self._open(0, 0, self.prefetch_batches)
        try:
            for _ in range(loader.epoch_batches):
                x, y = self._take(loader, self.batch_size)[:2]
                yield x, y
        finally:
            loader.close()

    def close(self) -> None:
        """Stop the prefetch thread and free its buffers (iteration ends)."""
        self._loader.close()

    def __enter__(self) -> "SampleBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    _MATCH = ("split", "batch_size", "seq_len", "bucket_sizes", "shuffle_buffer", "seed",
              "val_fraction", "split_rows")

    def _param(self, key: str):
        if key == "split_rows":
            return len(self.rows)
        v = getattr(self, key)
        return list(v) if isinstance(v, tuple) else v

    def state_dict(self) -> dict:
        """JSON-serialisable: the position (epoch, batch) and the parameters
        that must match on resume."""
        return {"version": 1, "kind": "samples", **{k: self._param(k) for k in self._MATCH},
                "epoch": self.epoch, "batch": self.batch, "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (no token of the skipped
        batches is read). ValueError when it was taken from a loader with
        another split, file or schedule."""
        if state.get("version") != 1 or state.get("kind") != "samples":
            raise ValueError(f"{self.file.path}: loader state is not a SampleBatches state (version "
                             f"{state.get('version')!r}, kind {state.get('kind')!r})")
        for key in self._MATCH:
            if state.get(key) != self._param(key):
                raise ValueError(f"{self.file.path}: loader state has {key}={state.get(key)!r} but this "
                                 f"loader has {key}={self._param(key)!r}")
        self._loader.seek(int(state["epoch"]), int(state["batch"]))
        self.epoch, self.batch, self.batches = int(state["epoch"]), int(state["batch"]), int(state["batches"])

    def __repr__(self) -> str:
        shape = f"buckets={list(self.bucket_sizes)}" if self.bucket_sizes else f"seq_len={self.seq_len}"
        return (f"SampleBatches({self.file.path!r}, batch_size={self.batch_size}, {shape}, "
                f"shuffle_buffer={self.shuffle_buffer}, prefetch_batches={self.prefetch_batches}, "
                f"split={self.split!r}, rows={len(self.rows):,})")


__all__ = ["SampleFile", "SampleBatches", "is_sample_file"]
