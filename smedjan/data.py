"""Training data: token files (written by `smedjan prepare`), batches drawn
from them with a resumable, exactly reproducible position, SFT examples
from JSONL, and bin2d sample files with their batches (smedjan.samples).

Token file: a 32-byte header ("SMJTOKEN", u32 version 1, u32 width 2|4,
u64 count, u64 reserved) then the tokens little-endian (docs/formats.md).
The header is validated by the engine; tokens are then read with pread(),
so a file cut short by another process is an OSError, never a SIGBUS.

>>> import tempfile, os, numpy as np
>>> p = os.path.join(tempfile.mkdtemp(), "data.tok")
>>> write_tokens(p, [np.arange(1000) % 50])
1000
>>> b = Batches(TokenFile(p), batch_size=2, seq_len=8, seed=0)
>>> x, y = next(b)
>>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
((2, 8), True)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import _C
from .samples import SampleBatches, SampleFile, is_sample_file

HEADER_BYTES = 32
_WIDTH = {"uint16": 2, "uint32": 4}


# ---- token files -------------------------------------------------------------

def write_tokens(path, chunks: Iterable, dtype: str = "uint16") -> int:
    """Stream token chunks (any integer arrays or lists) into a token file,
    atomically: the file appears under `path` only when complete. Values
    must fit the dtype ("uint16" for vocabularies up to 65536, else
    "uint32"). Returns the token count."""
    if dtype not in _WIDTH:
        raise ValueError(f"{os.fspath(path)}: dtype must be 'uint16' or 'uint32', got {dtype!r}")
    np_dtype = np.dtype(dtype).newbyteorder("=")
    hi = np.iinfo(np_dtype).max
    w = _C.TokenWriter(os.fspath(path), _WIDTH[dtype])
    try:
        for i, chunk in enumerate(chunks):
            a = np.asarray(chunk)
            if a.size == 0:
                continue
            if a.dtype.kind not in "iu":
                raise TypeError(f"{os.fspath(path)}: chunk {i} has dtype {a.dtype}, expected integers")
            if a.dtype != np_dtype:
                lo_v, hi_v = int(a.min()), int(a.max())
                if lo_v < 0 or hi_v > hi:
                    raise ValueError(f"{os.fspath(path)}: chunk {i} holds token {lo_v if lo_v < 0 else hi_v}, "
                                     f"outside {dtype} [0, {hi}]")
                a = a.astype(np_dtype)
            w.append(np.ascontiguousarray(a.reshape(-1)))
        return w.close()
    except BaseException:
        w.abort()
        raise


# llm.c's token files: 256 int32 of header (magic, version, token count), then the ids.
LLMC_MAGIC = {20240520: (1, "uint16"), 20240801: (7, "uint32")}   # magic -> (version, dtype)


def convert_tokens(src, dst, *, format: str = "auto", chunk: int = 1 << 24) -> int:
    """A nanoGPT or llm.c token file as a smedjan token file at `dst`
    (uint16 when every id fits, else uint32). Returns the token count.

    format "llmc": llm.c's .bin (a 1024-byte header: magic 20240520 with
    uint16 ids, or 20240801 with uint32 ids, then the count); "nanogpt":
    nanoGPT's train.bin/val.bin, raw little-endian uint16 ids without a
    header; "auto": llm.c when the file starts with its magic, else nanoGPT."""
    p = os.fspath(src)
    size = os.path.getsize(p)
    head = np.fromfile(p, dtype="<i4", count=3) if size >= 12 else np.zeros(0, np.int32)
    if format == "auto":
        format = "llmc" if len(head) and int(head[0]) in LLMC_MAGIC else "nanogpt"
    if format == "llmc":
        if size < 1024 or int(head[0]) not in LLMC_MAGIC:
            raise ValueError(f"{p}: not an llm.c token file (no magic 20240520/20240801 in a "
                             f"1024-byte header)")
        version, dtype = LLMC_MAGIC[int(head[0])]
        if int(head[1]) != version:
            raise ValueError(f"{p}: llm.c magic {int(head[0])} goes with version {version}, "
                             f"the header says {int(head[1])}")
        count, offset = int(head[2]), 1024
        want = offset + count * np.dtype(dtype).itemsize
        if count < 0 or size != want:
            raise ValueError(f"{p}: header says {count} tokens ({want} bytes), the file has "
                             f"{size} bytes")
    elif format == "nanogpt":
        if size % 2:
            raise ValueError(f"{p}: {size} bytes is not a whole number of uint16 tokens")
        dtype, count, offset = "uint16", size // 2, 0
    else:
        raise ValueError(f"format must be 'auto', 'llmc' or 'nanogpt', got {format!r}")
    ids = np.memmap(p, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=offset,
                    shape=(count,)) if count else np.zeros(0, dtype)
    top = max((int(ids[i:i + chunk].max()) for i in range(0, count, chunk)), default=0)
    return write_tokens(dst, (ids[i:i + chunk] for i in range(0, count, chunk)),
                        dtype="uint16" if top < 1 << 16 else "uint32")


class TokenFile:
    """A validated token file, held open and read with checked reads.

    Errors name the file: "data.tok: header says 1000 tokens but the file
    holds 998". Reads (`read`, and every `Batches` batch) go through pread()
    into fresh arrays: if another process cuts the file short while it is
    open, the read raises OSError ("data.tok: file shrank from N to M bytes
    while open ...") and the process lives on.

    `.tokens` is the whole file as a read-only np.memmap (zero-copy, mapped
    on first use, for inspection and analysis). It is a raw mapping: if the
    file shrinks while it is mapped, touching a page past the new end kills
    the process with SIGBUS (POSIX mmap semantics, not catchable safely).
    Use `read` where the file may change under you.

    >>> # tf = TokenFile("data.tok"); tf.read(0, 16)   # the first 16 tokens
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(2, f"{self.path}: no such file", self.path)
        self._reader = _C.TokenReader(self.path)
        self.version, width, self.count = self._reader.version, self._reader.width, self._reader.count
        self.dtype = np.dtype("<u2" if width == 2 else "<u4")
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        """The tokens as a read-only np.memmap of the open file (see the class
        docstring: a file that shrinks under the mapping raises SIGBUS when the
        lost pages are touched)."""
        if self._tokens is None:
            if self.count == 0:
                self._tokens = np.zeros(0, self.dtype)
            else:
                # Map the descriptor the reader validated, not the path: a file
                # renamed over `path` since then is not the one we checked.
                with os.fdopen(os.dup(self._reader.fileno()), "rb") as f:
                    self._tokens = np.memmap(f, dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                                             shape=(self.count,))
        return self._tokens

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) as a new array of the file's dtype;
        OSError naming the file if it was cut short since it was opened."""
        out = np.empty(int(count), self.dtype.newbyteorder("="))
        self._reader.read(int(start), out)
        return out

    def max(self, chunk: int = 1 << 22) -> int:
        """The largest token id (0 for an empty file), in checked chunks."""
        top = 0
        for s in range(0, self.count, chunk):
            top = max(top, int(self.read(s, min(chunk, self.count - s)).max()))
        return top

    def __len__(self) -> int:
        return self.count

    def __reduce__(self):
        return (TokenFile, (self.path,))

    def __repr__(self) -> str:
        return f"TokenFile({self.path!r}, tokens={self.count:,}, dtype={self.dtype.name})"


# ---- batches ------------------------------------------------------------------

class Batches:
    """(x, y) int32 batches of shape (batch_size, seq_len), y = x shifted by one.

    The split is the first (train) or last (val) `val_fraction` of the tokens.
    random=True draws window starts from numpy's PCG64 seeded by `seed`;
    random=False walks the split in order (stride seq_len), wrapping at the
    end. state_dict()/load_state_dict() capture the generator and position
    exactly: a resumed loader yields the same batches as an uninterrupted one.
    Iteration never ends; count steps yourself (or use one_pass()).
    """

    def __init__(self, token_file: Union[TokenFile, str, os.PathLike], batch_size: int,
                 seq_len: int, *, split: str = "train", val_fraction: float = 0.05,
                 random: bool = True, seed: int = 0):
        tf = token_file if isinstance(token_file, TokenFile) else TokenFile(token_file)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.file, self.batch_size, self.seq_len = tf, int(batch_size), int(seq_len)
        self.split, self.val_fraction, self.random, self.seed = split, val_fraction, random, seed
        n_val = int(len(tf) * val_fraction)
        n_train = len(tf) - n_val
        # The split is tokens [_lo, _lo + _n) of the file.
        self._lo, self._n = (0, n_train) if split == "train" else (n_train, n_val)
        if self._n < self.seq_len + 1:
            raise ValueError(f"{tf.path}: the {split} split holds {self._n} tokens, fewer than "
                             f"seq_len + 1 = {self.seq_len + 1}")
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.position = 0     # next sequential window start
        self.epoch = 0        # completed passes (sequential mode)
        self.batches = 0      # batches yielded so far

    @property
    def tokens(self) -> np.ndarray:
        """The split's tokens: a slice of the file's np.memmap (TokenFile.tokens;
        batches never read through it)."""
        return self.file.tokens[self._lo:self._lo + self._n]

    @property
    def n_windows(self) -> int:
        """Non-overlapping windows in the split (stride seq_len)."""
        return (self._n - 1) // self.seq_len

    def _gather(self, starts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        # pread()s each window straight into x and (shifted by one) y: a file
        # cut short under us is an OSError here, not a SIGBUS.
        x = np.empty((len(starts), self.seq_len), np.int32)
        y = np.empty_like(x)
        self.file._reader.read_windows(np.add(starts, self._lo, dtype=np.int64), self.seq_len, x, y)
        return x, y

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.random:
            starts = self._rng.integers(0, self._n - self.seq_len, size=self.batch_size)
        else:
            starts = np.empty(self.batch_size, np.int64)
            for b in range(self.batch_size):
                if self.position + self.seq_len + 1 > self._n:
                    self.position = 0
                    self.epoch += 1
                starts[b] = self.position
                self.position += self.seq_len
        self.batches += 1
        return self._gather(starts)

    def __repr__(self) -> str:
        order = f"random, seed={self.seed}" if self.random else f"sequential, epoch={self.epoch}"
        return (f"Batches({self.file.path!r}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"split={self.split!r} ({self._n:,} tokens), {order}, batches={self.batches})")

    def one_pass(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Every full batch of consecutive windows of the split once, from
        the start (for evaluation); does not touch the loader's state."""
        n = self.n_windows // self.batch_size * self.batch_size
        for b in range(0, n, self.batch_size):
            yield self._gather(np.arange(b, b + self.batch_size, dtype=np.int64) * self.seq_len)

    def state_dict(self) -> dict:
        """JSON-serialisable state: the generator state, position, counts and
        the parameters that must match on resume."""
        return {"version": 1, "split": self.split, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "random": self.random, "seed": self.seed,
                "val_fraction": self.val_fraction, "split_tokens": self._n,
                "position": self.position, "epoch": self.epoch, "batches": self.batches,
                "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. ValueError when it was
        taken from a loader over a different split, file size or shape."""
        if state.get("version") != 1:
            raise ValueError(f"loader state version {state.get('version')!r} is not 1")
        for key in ("split", "batch_size", "seq_len", "random", "split_tokens"):
            mine = self._n if key == "split_tokens" else getattr(self, key)
            if state.get(key) != mine:
                raise ValueError(f"{self.file.path}: loader state has {key}={state.get(key)!r} but this "
                                 f"loader has {key}={mine!r}")
        bg = state["bit_generator"]
        if bg.get("bit_generator") != "PCG64":
            raise ValueError(f"loader state generator is {bg.get('bit_generator')!r}, expected PCG64")
        self._rng.bit_generator.state = bg
        self.position, self.epoch, self.batches = (int(state["position"]), int(state["epoch"]),
                                                   int(state["batches"]))


# ---- sample files (bin2d) -------------------------------------------------------

_U32_MAX = 0xFFFFFFFF


class SampleWriter:
    """Streams rows into a bin2d sample file (docs/formats.md, "bin2d"),
    atomically: the file appears under `path` only when close() succeeds;
    abort(), or leaving a ``with`` block by an exception, removes the
    temporary file and leaves any earlier file at `path` untouched.

    Each row is padded with pad_id to `stride` tokens. With labels=True the
    file carries a label index made from each row's bool mask (True = the
    token is a training target): its maximal runs of True, position 0 left
    out (nothing predicts it). write() refuses ids outside uint32, rows
    longer than the stride (truncate first) and masks of another length; it
    skips rows with fewer than 2 tokens or, with labels, no target, and
    counts them in `skipped`. `rows`, `tokens` and `label_tokens` count
    what was written.

        >>> import tempfile, os, numpy as np
        >>> with SampleWriter(os.path.join(tempfile.mkdtemp(), "s.bin2d"), 8) as w:
        ...     w.write(np.array([5, 6, 7]), np.array([False, False, True]))
        ...     w.write(np.array([5]), np.array([True]))
        True
        False
        >>> w.rows, w.skipped, w.label_tokens
        (1, 1, 1)
    """

    def __init__(self, path, stride: int, *, pad_id: int = 0, labels: bool = True):
        self.path = os.fspath(path)
        if not 2 <= int(stride) <= _U32_MAX:
            raise ValueError(f"{self.path}: stride must be in [2, {_U32_MAX}], got {stride}")
        if not 0 <= int(pad_id) <= _U32_MAX:
            raise ValueError(f"{self.path}: pad_id {pad_id} is outside uint32")
        self.stride, self.pad_id, self.labels = int(stride), int(pad_id), bool(labels)
        self.rows = self.skipped = self.tokens = self.label_tokens = 0
        self._w = _C.SampleWriter(self.path, self.stride, self.pad_id, self.labels)

    def write(self, tokens, labels=None) -> bool:
        """Append one sample; True if written, False if skipped (see the class)."""
        where = f"{self.path}: sample {self.rows + self.skipped}"
        t = np.asarray(tokens)
        if t.ndim != 1:
            raise ValueError(f"{where}: tokens must be 1-D, got shape {t.shape}")
        if t.size and t.dtype.kind not in "iu":
            raise TypeError(f"{where}: tokens have dtype {t.dtype}, expected integers")
        if t.size and t.dtype != np.uint32:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi > _U32_MAX:
                raise ValueError(f"{where}: token {lo if lo < 0 else hi} is outside uint32 [0, {_U32_MAX}]")
        mask = None
        if self.labels:
            if labels is None:
                raise ValueError(f"{where}: no label mask, but the file has a label index")
            mask = np.asarray(labels)
            if mask.dtype != np.bool_:
                raise TypeError(f"{where}: labels have dtype {mask.dtype}, expected bool")
            if mask.shape != t.shape:
                raise ValueError(f"{where}: {t.size} tokens but {mask.size} labels")
        if t.size > self.stride:
            raise ValueError(f"{where}: {t.size} tokens, more than the stride {self.stride} "
                             f"(truncate first)")
        n_labels = int(mask[1:].sum()) if self.labels else t.size - 1
        if t.size < 2 or n_labels == 0:
            self.skipped += 1
            return False
        self._w.append(np.ascontiguousarray(t, dtype=np.uint32),
                       None if mask is None else np.ascontiguousarray(mask).view(np.uint8))
        self.rows += 1
        self.tokens += t.size
        self.label_tokens += n_labels
        return True

    def close(self) -> int:
        """Write the lengths and label index, fsync, rename into place; the row count."""
        return self._w.close()

    def abort(self) -> None:
        """Remove the temporary file; nothing appears under `path`."""
        self._w.abort()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_samples(path, samples: Iterable, stride: int, *, pad_id: int = 0,
                  labels: bool = True) -> int:
    """Write (tokens, labels) samples into a bin2d file, atomically; the
    number of rows written. tokens: 1-D integer ids in uint32; labels: a
    bool array of the same length, True where the token is a training
    target (with labels=False, items may be bare token arrays and masks are
    ignored). The rules are SampleWriter's: rows longer than `stride` are
    refused (truncate first); rows of fewer than 2 tokens or without a
    target are skipped, so `len(samples) - written` were skipped (use
    SampleWriter for the count of a stream).

        >>> import tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "s.bin2d")
        >>> write_samples(p, [(np.array([1, 2, 3]), np.array([False, True, True]))], stride=4)
        1
    """
    with SampleWriter(path, stride, pad_id=pad_id, labels=labels) as w:
        for item in samples:
            tokens, mask = item if isinstance(item, tuple) else (item, None)
            w.write(tokens, mask)
    return w.rows


# ---- chat templates --------------------------------------------------------------
#
# A template turns chat messages into segments: text (encoded as ordinary
# text, so a special token's spelling inside a message stays text) or one
# special token (its id, never its spelling). Each segment is a label
# (trained) or context. Segments are encoded separately, so label
# boundaries are exact. Only assistant content and its end marker are
# labels:
#   plain:  "<|{role}|>\n" {content} "\n" [eos after assistant turns]
#   chatml: <|im_start|> "{role}\n" {content} <|im_end|> "\n"
# {"prompt": p, "response"|"completion": r} is the chat [user: p, assistant: r].

ROLES = ("system", "user", "assistant")
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
CHAT_TEMPLATES = ("auto", "chatml", "plain")


class ChatTemplate:
    """How chat messages become token ids and a label mask.

    Build one with for_tokenizer() (ChatML when the tokenizer has
    ``<|im_start|>`` and ``<|im_end|>`` as special tokens, else the plain
    template with its end-of-sequence special, one of EOS_NAMES) or plain()
    around any encode function.

        >>> t = ChatTemplate.plain(lambda s: np.frombuffer(s.encode(), np.uint8), eos_id=0)
        >>> ids, labels = t.encode([{"role": "user", "content": "hi"},
        ...                         {"role": "assistant", "content": "yo"}])
        >>> bytes(ids[labels][:-1].astype(np.uint8)), int(ids[labels][-1])
        (b'yo\\n', 0)
    """

    def __init__(self, kind: str, encode_texts: Optional[Callable[[List[str]], list]], *,
                 start: Optional[Tuple[str, int]] = None, end: Optional[Tuple[str, int]] = None):
        if kind not in ("chatml", "plain"):
            raise ValueError(f"chat template must be 'chatml' or 'plain', got {kind!r}")
        if kind == "chatml" and (start is None or end is None):
            raise ValueError("chatml needs the <|im_start|> and <|im_end|> special tokens")
        self.kind, self._encode_texts, self.start, self.end = kind, encode_texts, start, end

    @classmethod
    def plain(cls, encode: Optional[Callable[[str], np.ndarray]], *, eos_id: Optional[int] = None,
              eos_text: str = "") -> "ChatTemplate":
        """The plain template over encode(text) -> ids; eos_id (when given)
        ends each assistant turn."""
        texts = None if encode is None else (lambda ts: [encode(t) for t in ts])
        return cls("plain", texts, end=None if eos_id is None else (eos_text, int(eos_id)))

    @classmethod
    def for_tokenizer(cls, tokenizer, kind: str = "auto") -> "ChatTemplate":
        """The template for a smedjan Tokenizer: kind "auto", "chatml" or
        "plain" (ValueError when the tokenizer lacks its special tokens)."""
        if kind not in CHAT_TEMPLATES:
            raise ValueError(f"chat template must be one of {', '.join(CHAT_TEMPLATES)}, got {kind!r}")
        sp = tokenizer.special_tokens
        texts = lambda ts: tokenizer.encode_batch(ts, allowed_special=(), disallowed_special=())
        has_chatml = "<|im_start|>" in sp and "<|im_end|>" in sp
        if kind == "chatml" or (kind == "auto" and has_chatml):
            if not has_chatml:
                raise ValueError(f"chat template chatml: the tokenizer has no <|im_start|> and "
                                 f"<|im_end|> special tokens (it has {sorted(sp)})")
            return cls("chatml", texts, start=("<|im_start|>", sp["<|im_start|>"]),
                       end=("<|im_end|>", sp["<|im_end|>"]))
        eos = next((e for e in EOS_NAMES if e in sp), None)
        if eos is None:
            raise ValueError(f"chat template plain: the tokenizer has no end-of-sequence special token "
                             f"(one of {', '.join(EOS_NAMES)}; it has {sorted(sp)})")
        return cls("plain", texts, end=(eos, sp[eos]))

    def _segments(self, messages, add_generation_prompt: bool):
        """(text, special id or None, is_label, is_content) in order."""
        out = []
        for m in messages:
            asst = m["role"] == "assistant"
            if self.kind == "chatml":
                out += [(self.start[0], self.start[1], False, False), (f"{m['role']}\n", None, False, False),
                        (m["content"], None, asst, asst), (self.end[0], self.end[1], asst, False),
                        ("\n", None, False, False)]
            else:
                out += [(f"<|{m['role']}|>\n", None, False, False), (m["content"], None, asst, asst),
                        ("\n", None, asst, False)]
                if asst and self.end is not None:
                    out.append((self.end[0], self.end[1], True, False))
        if add_generation_prompt:
            out += ([(self.start[0], self.start[1], False, False), ("assistant\n", None, False, False)]
                    if self.kind == "chatml" else [("<|assistant|>\n", None, False, False)])
        return out

    def render(self, messages: List[dict], *, add_generation_prompt: bool = False) -> str:
        """The template as text (special tokens by their spelling); with
        add_generation_prompt it ends where the assistant's reply begins."""
        return "".join(text for text, *_ in self._segments(messages, add_generation_prompt))

    def encode(self, messages: List[dict], where: str = "chat") -> Tuple[np.ndarray, np.ndarray]:
        """(ids int64, labels bool) of one conversation. ValueError naming
        `where` when text is not valid Unicode or the assistant turns encode
        to no tokens."""
        res = self.encode_many([(messages, where)])[0]
        if isinstance(res, ValueError):
            raise res
        return res

    def encode_many(self, conversations: List[Tuple[List[dict], str]]) -> list:
        """encode() of many (messages, where) at once, with one call to the
        tokenizer (its threads pay off on many small texts); each result is
        (ids, labels) or the ValueError that encode() would raise."""
        segs = [self._segments(m, False) for m, _ in conversations]
        texts = [text for conv in segs for text, sid, _, _ in conv if sid is None]
        try:
            encoded = iter(self._encode_texts(texts))
        except UnicodeEncodeError as e:     # a lone surrogate, from a \ud800-style JSON escape
            if len(conversations) > 1:      # find which: one at a time
                return [r for c in conversations for r in self.encode_many([c])]
            return [ValueError(f"{conversations[0][1]}: text is not valid Unicode ({e.reason}: "
                               f"{e.object[e.start:e.end]!r})")]
        out = []
        for conv, (_, where) in zip(segs, conversations):
            ids, labels, n_content = [], [], 0
            for text, sid, is_label, is_content in conv:
                a = np.array([sid], np.int64) if sid is not None else _as_ids(next(encoded), where)
                ids.append(a)
                labels.append(np.full(len(a), is_label))
                n_content += len(a) if is_content else 0
            out.append(ValueError(f"{where}: the assistant turns are empty after tokenisation")
                       if n_content == 0 else (np.concatenate(ids), np.concatenate(labels)))
        return out


def _as_ids(a, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{where}: encode() must return a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def render_chat(messages: List[dict], *, add_generation_prompt: bool = False) -> str:
    """The plain chat template as text; with add_generation_prompt the text
    ends in "<|assistant|>\\n", ready for generation.

    >>> render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    '<|user|>\\nhi\\n<|assistant|>\\n'
    """
    return ChatTemplate.plain(None).render(messages, add_generation_prompt=add_generation_prompt)


# ---- SFT JSONL --------------------------------------------------------------------

def _example_messages(obj, where: str) -> List[dict]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{k}] must be an object with a string 'content'")
            if m.get("role") not in ROLES:
                raise ValueError(f"{where}: messages[{k}] has role {m.get('role')!r}, expected one of "
                                 f"{', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message to train on")
        return msgs
    for reply in ("response", "completion"):
        if "prompt" in obj and reply in obj:
            if not isinstance(obj["prompt"], str) or not isinstance(obj[reply], str):
                raise ValueError(f"{where}: 'prompt' and '{reply}' must be strings")
            return [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj[reply]}]
    raise ValueError(f"{where}: expected {{'prompt', 'response'}}, {{'prompt', 'completion'}} or "
                     f"{{'messages'}}, got keys {sorted(obj)}")


def _utf8_line(raw: bytes, where: str, bom: bool = False) -> str:
    """One line of a UTF-8 file as text; ValueError naming the first bad
    byte and its column (in characters, 1-based) otherwise."""
    if bom and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        col = len(raw[:e.start].decode("utf-8")) + 1
        raise ValueError(f"{where}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}: "
                         f"{e.reason})") from None


def read_sft_jsonl(path, template: ChatTemplate, *, skip_bad_lines: bool = False,
                   bad_lines: Optional[list] = None, chunk_lines: int = 1024
                   ) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
    """(where, ids, labels) for each example of a JSONL file, in file order
    ("where" is "file:line"). The file is UTF-8 (a leading byte-order mark
    is allowed); blank lines are passed over. A bad line (invalid UTF-8,
    invalid JSON, a wrong shape, no assistant turn, empty after
    tokenisation) raises ValueError "file:line: reason"; with
    skip_bad_lines it is left out and its message appended to bad_lines.
    Lines are encoded chunk_lines at a time (ChatTemplate.encode_many)."""
    p = os.fspath(path)

    def parse(lineno, raw):
        """(messages, where), or a ValueError for a bad line, or None for a blank one."""
        where = f"{p}:{lineno}"
        try:
            line = _utf8_line(raw, where, bom=lineno == 1)
            if not line.strip():
                return None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            return _example_messages(obj, where), where
        except ValueError as e:
            return e

    def results(chunk):
        good = [c for c in chunk if not isinstance(c, ValueError)]
        encoded = iter(template.encode_many(good))
        for c in chunk:
            res = c if isinstance(c, ValueError) else next(encoded)
            if isinstance(res, ValueError):
                if not skip_bad_lines:
                    raise res
                if bad_lines is not None:
                    bad_lines.append(str(res))
                continue
            yield (c[1],) + res

    with open(p, "rb") as f:
        chunk = []
        for lineno, raw in enumerate(f, 1):
            item = parse(lineno, raw)
            if item is not None:
                chunk.append(item)
            if len(chunk) == chunk_lines:
                yield from results(chunk)
                chunk = []
        yield from results(chunk)


def load_sft_jsonl(path, encode: Union[Callable[[str], np.ndarray], ChatTemplate], seq_len: int, *,
                   pack: bool = True, eos_id: Optional[int] = None, ignore_index: int = -1
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """SFT examples from JSONL -> (inputs, targets), int32 arrays (n, seq_len),
    in memory (for files on disk and training at scale, see prepare_sft).

    Each line is {"prompt": ..., "response"|"completion": ...} or {"messages":
    [{"role": "system"|"user"|"assistant", "content": ...}, ...]}, rendered
    with `encode` when it is a ChatTemplate, else with the plain template
    over encode(text) -> ids and eos_id after each assistant turn.
    targets[i, t] is the next token where that token is trained (assistant
    content and its end marker), else ignore_index. pack=True concatenates
    examples into full rows (the last row padded); pack=False gives one row
    per example, truncated to seq_len + 1 tokens or padded. Padding uses
    eos_id (0 without one) in inputs and ignore_index in targets; rows
    without any trained target are dropped. A malformed line raises
    ValueError naming the file, the line number and the problem (see
    read_sft_jsonl)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    template = encode if isinstance(encode, ChatTemplate) else ChatTemplate.plain(encode, eos_id=eos_id)
    pad = 0 if eos_id is None else int(eos_id)
    examples = [(t, m) for _, t, m in read_sft_jsonl(path, template)]
    L = seq_len + 1
    rows = []
    if pack:
        if examples:
            toks = np.concatenate([t for t, _ in examples])
            train = np.concatenate([m for _, m in examples])
            for s in range(0, max(len(toks) - 1, 0), seq_len):
                rows.append((toks[s:s + L], train[s:s + L]))
    else:
        rows = [(t[:L], m[:L]) for t, m in examples]
    xs, ys = [], []
    for t, m in rows:
        if len(t) < 2:
            continue
        x = np.full(seq_len, pad, np.int64)
        y = np.full(seq_len, ignore_index, np.int64)
        n = len(t) - 1
        x[:n] = t[:-1]
        y[:n] = np.where(m[1:], t[1:], ignore_index)
        if (y != ignore_index).any():
            xs.append(x)
            ys.append(y)
    if not xs:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.stack(xs).astype(np.int32), np.stack(ys).astype(np.int32)


@dataclasses.dataclass
class SftStats:
    """What prepare_sft wrote and left out. rows/tokens/label_tokens: the
    rows written, their real tokens and their target positions; examples:
    good lines read; bad_lines: lines skipped (skip_bad_lines), the first
    few messages in bad_reasons; truncated / dropped_long: examples longer
    than the stride, cut or left out (on_long); no_label: examples left
    with no target after truncation (skipped)."""
    output: str
    template: str
    seq_len: int
    stride: int
    rows: int = 0
    tokens: int = 0
    label_tokens: int = 0
    examples: int = 0
    bad_lines: int = 0
    bad_reasons: List[str] = dataclasses.field(default_factory=list)
    truncated: int = 0
    dropped_long: int = 0
    no_label: int = 0

    def summary(self) -> str:
        return (f"{self.rows:,} rows, {self.tokens:,} tokens, {self.label_tokens:,} label tokens "
                f"-> {self.output} (template {self.template}, stride {self.stride}); "
                f"{self.bad_lines:,} bad lines skipped, {self.truncated:,} truncated, "
                f"{self.dropped_long:,} dropped as too long, {self.no_label:,} with no label left")


MAX_BAD_REASONS = 10
ON_LONG = ("truncate", "drop")


def prepare_sft(jsonl, tokenizer, seq_len: int, out, *, chat_template: str = "auto",
                skip_bad_lines: bool = False, on_long: str = "truncate", pad_id: int = 0) -> SftStats:
    """Encode an SFT JSONL file (see read_sft_jsonl) into a bin2d sample file
    with a label index: one row per example, stride seq_len + 1 (a row of
    L tokens trains L - 1 positions). chat_template: "auto", "chatml" or
    "plain" (ChatTemplate.for_tokenizer). Examples longer than the stride
    are cut to it (on_long="truncate") or left out ("drop"); examples with
    no target left are skipped; each is counted. Bad lines raise ValueError
    "file:line: reason", or with skip_bad_lines are counted and skipped.
    Written atomically, with the statistics beside it in `out`.json.

        >>> # stats = prepare_sft("chat.jsonl", Tokenizer.load("tok.sjt"), 512, "chat.bin2d")
    """
    out = os.fspath(out)
    if int(seq_len) < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if on_long not in ON_LONG:
        raise ValueError(f"on_long must be one of {', '.join(ON_LONG)}, got {on_long!r}")
    template = ChatTemplate.for_tokenizer(tokenizer, chat_template)
    stats = SftStats(output=out, template=template.kind, seq_len=int(seq_len), stride=int(seq_len) + 1)
    bad: List[str] = []
    with SampleWriter(out, stats.stride, pad_id=pad_id) as w:
        for where, ids, labels in read_sft_jsonl(jsonl, template, skip_bad_lines=skip_bad_lines,
                                                 bad_lines=bad):
            stats.examples += 1
            if len(ids) > stats.stride:
                if on_long == "drop":
                    stats.dropped_long += 1
                    continue
                stats.truncated += 1
                ids, labels = ids[:stats.stride], labels[:stats.stride]
            if not w.write(ids, labels):
                stats.no_label += 1
    stats.rows, stats.tokens, stats.label_tokens = w.rows, w.tokens, w.label_tokens
    stats.bad_lines, stats.bad_reasons = len(bad), bad[:MAX_BAD_REASONS]
    from .io import write_text_atomic
    write_text_atomic(out + ".json", json.dumps(dict(dataclasses.asdict(stats),
                                                     source=os.fspath(jsonl)), indent=1))
    return stats


__all__ = ["write_tokens", "convert_tokens", "TokenFile", "Batches", "SampleWriter", "write_samples",
           "SampleFile", "SampleBatches", "is_sample_file", "ChatTemplate", "render_chat",
           "read_sft_jsonl", "load_sft_jsonl", "prepare_sft", "SftStats", "HEADER_BYTES"]
