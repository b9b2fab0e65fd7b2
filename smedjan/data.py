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


# ---- SFT ----------------------------------------------------------------------
#
# Chat template: each message renders as "<|{role}|>\n{content}\n". Only the
# assistant's "{content}\n" (and eos_id after it, when given) are trained;
# role headers, system and user turns are context (target ignore_index).
# {"prompt": p, "response": r} is the chat [user: p, assistant: r].

ROLES = ("system", "user", "assistant")


def render_chat(messages: List[dict], *, add_generation_prompt: bool = False) -> str:
    """The chat template as text; with add_generation_prompt the text ends in
    "<|assistant|>\\n", ready for generation.

    >>> render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    '<|user|>\\nhi\\n<|assistant|>\\n'
    """
    s = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return s + "<|assistant|>\n" if add_generation_prompt else s


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
    if "prompt" in obj and "response" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["response"], str):
            raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
        return [{"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj["response"]}]
    raise ValueError(f"{where}: expected {{'prompt', 'response'}} or {{'messages'}}, got keys "
                     f"{sorted(obj)}")


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


def _encode(encode: Callable, text: str, where: str) -> np.ndarray:
    try:
        a = np.asarray(encode(text))
    except UnicodeEncodeError as e:     # a lone surrogate, from a \ud800-style JSON escape
        raise ValueError(f"{where}: text is not valid Unicode ({e.reason}: "
                         f"{text[e.start:e.end]!r})") from None
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise ValueError(f"{where}: encode() must return a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _render_tokens(msgs, encode, eos_id, where) -> Tuple[np.ndarray, np.ndarray]:
    toks, train = [], []
    for m in msgs:
        head = _encode(encode, f"<|{m['role']}|>\n", where)
        body = _encode(encode, m["content"] + "\n", where)
        toks += [head, body]
        is_asst = m["role"] == "assistant"
        train += [np.zeros(len(head), bool), np.full(len(body), is_asst)]
        if is_asst and eos_id is not None:
            toks.append(np.array([eos_id], np.int64))
            train.append(np.ones(1, bool))
    return np.concatenate(toks), np.concatenate(train)


def load_sft_jsonl(path, encode: Callable[[str], np.ndarray], seq_len: int, *, pack: bool = True,
                   eos_id: Optional[int] = None, ignore_index: int = -1
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """SFT examples from JSONL -> (inputs, targets), int32 arrays (n, seq_len).

    Each line is {"prompt": ..., "response": ...} or {"messages": [{"role":
    "system"|"user"|"assistant", "content": ...}, ...]}, rendered with the
    chat template above. targets[i, t] is the next token where that token is
    trained (assistant content, eos), else ignore_index. pack=True
    concatenates examples into full rows (the last row padded); pack=False
    gives one row per example, truncated to seq_len + 1 tokens or padded.
    Padding uses eos_id (0 without one) in inputs and ignore_index in
    targets; rows without any trained target are dropped. The file is
    UTF-8 (a leading byte-order mark is allowed); a malformed line (invalid
    UTF-8, invalid JSON, a wrong shape) raises ValueError naming the file,
    the line number and the problem."""
    p = os.fspath(path)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    pad = 0 if eos_id is None else int(eos_id)
    examples = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            line = _utf8_line(raw, where, bom=lineno == 1)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(_render_tokens(_example_messages(obj, where), encode, eos_id, where))
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


__all__ = ["write_tokens", "TokenFile", "Batches", "load_sft_jsonl", "render_chat", "HEADER_BYTES",
           "SampleFile", "SampleBatches", "is_sample_file"]
