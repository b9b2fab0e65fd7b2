"""Byte-level BPE tokenizer: the Python face of the engine's csrc/tokenizer.

Training, encoding and decoding run in C (GIL released, multi-threaded where
it pays); this module translates arguments, reads and writes the JSON/text
formats of GPT-2 and Hugging Face, and draws progress bars.

    >>> from smedjan.tokenizer import Tokenizer
    >>> tok = Tokenizer.train(["hello world"] * 100, vocab_size=300)
    >>> tok.decode(tok.encode("hello world"))
    'hello world'
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from . import _C

__all__ = ["Tokenizer", "bytes_to_unicode", "add_commands"]

PathLike = Union[str, "os.PathLike[str]"]
_AS_TEXT, _ALLOW, _REFUSE = 0, 1, 2
_FEED_BYTES = 8 << 20      # text handed to the engine per call while training


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map (used by vocab.json, merges.txt
    and HF's ByteLevel), e.g. b' ' -> 'Ġ'."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_B2U = bytes_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


def _to_bytelevel(b: bytes) -> str:
    return "".join(_B2U[x] for x in b)


def _from_bytelevel(s: str, where: str) -> bytes:
    try:
        return bytes(_U2B[c] for c in s)
    except KeyError as e:
        raise ValueError(f"{where}: {s!r} is not a byte-level token "
                         f"(character {e.args[0]!r} maps to no byte)") from None


def _file_blocks(path: PathLike, last_cut, block: int = 64 << 20):
    """A file's bytes in blocks cut where last_cut (the trainer's, which feed
    also uses) says the whole file's pre-tokens end, so blocks count exactly
    as the whole file would."""
    with open(path, "rb") as f:
        rest = b""
        while True:
            data = f.read(block)
            if not data:
                if rest:
                    yield rest
                return
            buf = rest + data
            cut = last_cut(buf)
            if cut == 0:
                rest = buf
                continue
            yield buf[:cut]
            rest = buf[cut:]


class Tokenizer:
    """A byte-level BPE tokenizer with GPT-2's pre-tokenisation.

    Every byte string encodes (the 256 bytes are tokens), special tokens such
    as ``<|endoftext|>`` are never split or merged, and the same input always
    gives the same ids.

        >>> tok = Tokenizer.train(["a cat sat on a mat"] * 10, vocab_size=270)
        >>> tok.encode("a cat").tolist() == tok.encode_batch(["a cat"])[0].tolist()
        True
    """

    def __init__(self, handle: "_C.Tokenizer"):
        self._h = handle
        self._tokens = None
        specials = handle.special_ids()
        self._special = {handle.token(i)[0].decode("utf-8", "surrogateescape"): i for i in specials}
        self._special_order = [handle.token(i)[0].decode("utf-8", "surrogateescape") for i in specials]
        self._modes_cache = {}

    # ---- construction -------------------------------------------------------

    @classmethod
    def train(cls, texts: Optional[Iterable[Union[str, bytes]]] = None, *,
              files: Optional[Sequence[PathLike]] = None, vocab_size: int = 8192,
              special_tokens: Sequence[str] = ("<|endoftext|>",), min_frequency: int = 0,
              progress: Optional[bool] = None) -> "Tokenizer":
        """Learn a byte-level BPE from an iterable of documents and/or files.

        vocab_size counts the 256 byte tokens, the learned merges and the
        special tokens (which take the last ids). Ties between equally
        frequent pairs go to the smallest (left id, right id) in GPT-2's byte
        order, as HF's BpeTrainer does, so training is deterministic.
        progress: None shows a bar only on a terminal (tqdm's disable=None).

            >>> tok = Tokenizer.train(["low lower lowest"] * 50, vocab_size=262, special_tokens=[])
            >>> len(tok)
            262
        """
        if texts is None and not files:
            raise ValueError("train: give texts (an iterable of str) and/or files")
        if isinstance(texts, (str, bytes)):
            raise TypeError("train: texts must be an iterable of documents, not one str; "
                            "wrap it in a list, or pass files=[...] for paths")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"train: vocab_size must be an int >= {256 + len(special_tokens)} "
                             f"(256 bytes + {len(special_tokens)} special tokens), got {vocab_size!r}")
        specials = [s.encode("utf-8") for s in special_tokens]
        if len(set(specials)) != len(specials) or any(not s for s in specials):
            raise ValueError(f"train: special tokens must be distinct and non-empty: {list(special_tokens)}")
        from tqdm.auto import tqdm
        disable = None if progress is None else not progress
        trainer = _C.BpeTrainer(specials)
        with tqdm(desc="counting", unit="B", unit_scale=True, disable=disable) as bar:
            for path in files or ():
                for block in _file_blocks(path, trainer.last_cut):
                    trainer.feed([block])
                    bar.update(len(block))
            if texts is not None:
                batch, size = [], 0
                for i, t in enumerate(texts):
                    if not isinstance(t, (str, bytes)):
                        raise TypeError(f"train: document {i} is {type(t).__name__}, not str or bytes")
                    batch.append(t)
                    size += len(t)
                    if size >= _FEED_BYTES:
                        trainer.feed(batch)
                        bar.update(size)
                        batch, size = [], 0
                if batch:
                    trainer.feed(batch)
                    bar.update(size)
        todo = trainer.begin(vocab_size, min_frequency)
        with tqdm(total=max(todo, 0), desc="merging", unit="merge", disable=disable) as bar:
            while True:
                done = trainer.step(256)
                bar.update(done)
                if done < 256:
                    break
        return cls(trainer.finish())

    @classmethod
    def from_vocab(cls, tokens: Sequence[bytes], merges: Sequence[tuple],
                   special: Sequence[bool] = ()) -> "Tokenizer":
        """Build from token byte strings (index = id), merges as (left id,
        right id) in rank order, and special flags per id."""
        special = list(special) or [False] * len(tokens)
        return cls(_C.Tokenizer(list(tokens), special, [tuple(m) for m in merges]))

    @classmethod
    def load(cls, path: PathLike) -> "Tokenizer":
        """Load our own format (see docs/tokenizer.md); errors name the file."""
        return cls(_C.tokenizer_load(os.fspath(path)))

    def save(self, path: PathLike) -> None:
        """Save in our own format (versioned, CRC-checked, written atomically)."""
        self._h.save(os.fspath(path))

    @classmethod
    def from_bpe_files(cls, vocab_json: PathLike, merges_txt: PathLike,
                       special_tokens: Optional[Sequence[str]] = None) -> "Tokenizer":
        """Import GPT-2 / HF ``vocab.json`` + ``merges.txt``.

        special_tokens: which vocabulary entries are special (never split);
        default: ``<|endoftext|>`` when present.
        """
        with open(vocab_json, encoding="utf-8") as f:
            try:
                vocab = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{vocab_json}: not valid JSON ({e})") from None
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_json}: expected a JSON object of token -> id")
        with open(merges_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = []
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_txt}:{n}: expected two tokens separated by a space, got {line!r}")
            merges.append(parts)
        if special_tokens is None:
            special_tokens = [s for s in ("<|endoftext|>",) if s in vocab]
        return cls._from_str_vocab(vocab, merges, set(special_tokens), str(vocab_json))

    @classmethod
    def _from_str_vocab(cls, vocab: dict, merges: list, specials: set, where: str) -> "Tokenizer":
        n = len(vocab)
        tokens = [None] * n
        flags = [False] * n
        for s, i in vocab.items():
            if not isinstance(i, int) or not 0 <= i < n or tokens[i] is not None:
                raise ValueError(f"{where}: ids must be the distinct ints 0..{n - 1}; "
                                 f"{s!r} has id {i!r}")
            if s in specials:
                tokens[i], flags[i] = s.encode("utf-8"), True
            else:
                tokens[i] = _from_bytelevel(s, where)
        missing = specials - set(vocab)
        if missing:
            raise ValueError(f"{where}: special tokens {sorted(missing)} are not in the vocabulary")
        pairs = []
        for r, (a, b) in enumerate(merges):
            if a not in vocab or b not in vocab:
                raise ValueError(f"{where}: merge {r} ({a!r} {b!r}) names a token not in the vocabulary")
            pairs.append((vocab[a], vocab[b]))
        try:
            return cls(_C.Tokenizer(tokens, flags, pairs))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @classmethod
    def from_tokenizer_json(cls, path: PathLike) -> "Tokenizer":
        """Import a Hugging Face ``tokenizer.json`` holding a byte-level BPE."""
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        model = d.get("model") if isinstance(d, dict) else None
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
            raise ValueError(f"{path}: not a BPE tokenizer.json (model.type must be BPE)")
        def bad(what):
            return ValueError(f"{path}: {what}")
        pre = d.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else None
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise bad("pre_tokenizer must be an object (or hold a list of objects)")
        kinds = [p.get("type") for p in parts]
        if "ByteLevel" not in kinds:
            raise bad(f"pre_tokenizer is {kinds}, not ByteLevel: not a byte-level BPE")
        vocab, raw_merges = model.get("vocab"), model["merges"]
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int)
                                                  for k, v in vocab.items()):
            raise bad("model.vocab must map token strings to integer ids")
        if not isinstance(raw_merges, list):
            raise bad("model.merges must be a list")
        merges = []
        for r, m in enumerate(raw_merges):
            pair = m.split(" ") if isinstance(m, str) else m
            if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise bad(f"merge {r} is {m!r}: not 'a b' nor a pair of strings")
            merges.append(pair)
        added = d.get("added_tokens", [])
        if not isinstance(added, list) or not all(
                isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)
                for t in added):
            raise bad("added_tokens must be a list of objects with a string 'content' and an integer 'id'")
        specials = {t["content"] for t in added}
        vocab = dict(vocab)
        for t in added:
            vocab.setdefault(t["content"], t["id"])
        return cls._from_str_vocab(vocab, merges, specials, str(path))

    def save_tokenizer_json(self, path: PathLike) -> None:
        """Export as a Hugging Face ``tokenizer.json`` (ByteLevel BPE, no prefix
        space), loadable by ``tokenizers.Tokenizer.from_file``."""
        vocab, added = {}, []
        for i in range(len(self)):
            b, special = self._h.token(i)
            if special:
                s = b.decode("utf-8")
                added.append({"id": i, "content": s, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True})
            else:
                s = _to_bytelevel(b)
            vocab.setdefault(s, i)
        merges = [f"{_to_bytelevel(self._h.token(a)[0])} {_to_bytelevel(self._h.token(b)[0])}"
                  for a, b, _ in self._h.merges()]
        bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        d = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
             "normalizer": None, "pre_tokenizer": bl, "post_processor": None,
             "decoder": dict(bl),
             "model": {"type": "BPE", "dropout": None, "unk_token": None,
                       "continuing_subword_prefix": None, "end_of_word_suffix": None,
                       "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges}}
        from .io import write_text_atomic
        write_text_atomic(path, json.dumps(d, ensure_ascii=False))

    # ---- encode / decode ---------------------------------------------------------

    def _modes(self, allowed_special, disallowed_special) -> Optional[bytes]:
        key = (allowed_special if isinstance(allowed_special, str) else frozenset(allowed_special),
               disallowed_special if isinstance(disallowed_special, str) else frozenset(disallowed_special))
        m = self._modes_cache.get(key)
        if m is not None:
            return m
        names = set(self._special)
        allowed = names if allowed_special == "all" else set(key[0])
        if disallowed_special == "all":
            disallowed = names - allowed
        else:
            disallowed = set(key[1])
        for what, s in (("allowed_special", allowed), ("disallowed_special", disallowed)):
            unknown = s - names
            if unknown:
                raise ValueError(f"{what}: {sorted(unknown)} are not special tokens of this "
                                 f"tokenizer (it has {sorted(names)})")
        m = bytes(_ALLOW if s in allowed else _REFUSE if s in disallowed else _AS_TEXT
                  for s in self._special_order)
        if len(self._modes_cache) < 64:
            self._modes_cache[key] = m
        return m

    def encode(self, text: Union[str, bytes], *, allowed_special="all",
               disallowed_special="all") -> np.ndarray:
        """Text (or raw bytes) -> int32 ids.

        Special tokens named in allowed_special ("all" or a set) become their
        ids; those in disallowed_special ("all" = every special token not
        allowed) raise ValueError; any other is encoded as plain text. Pass
        ``allowed_special=()`` and ``disallowed_special=()`` to treat all
        special-token text as ordinary text (tiktoken's encode_ordinary).

            >>> tok = Tokenizer.train(["hi there"] * 5, vocab_size=260)
            >>> tok.decode(tok.encode("hi<|endoftext|>")[-1:])
            '<|endoftext|>'
        """
        modes = self._modes(allowed_special, disallowed_special)
        return np.frombuffer(self._h.encode(text, modes), dtype=np.int32)

    def encode_batch(self, texts: Sequence[Union[str, bytes]], *, allowed_special="all",
                     disallowed_special="all") -> list:
        """Many texts at once, on all engine threads with the GIL released;
        equals ``[encode(t) for t in texts]``.

            >>> tok = Tokenizer.train(["ab ab"] * 5, vocab_size=258, special_tokens=[])
            >>> [a.tolist() for a in tok.encode_batch(["ab", ""])] == [tok.encode("ab").tolist(), []]
            True
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch: expected a list of texts, got one text; use encode()")
        modes = self._modes(allowed_special, disallowed_special)
        ids, offs = self._h.encode_batch(texts, modes)
        ids = np.frombuffer(ids, dtype=np.int32)
        offs = np.frombuffer(offs, dtype=np.int64)
        return [ids[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)]

    def _ids(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"decode: expected a 1-D sequence of ids, got shape {a.shape}")
        if a.size == 0:
            return np.zeros(0, np.int32)
        if a.dtype.kind not in "iu":
            raise TypeError(f"decode: ids must be integers, got dtype {a.dtype}")
        if a.dtype not in (np.int32, np.uint16):
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= len(self):
                bad = lo if lo < 0 else hi
                raise ValueError(f"decode: id {bad} is not in 0..{len(self) - 1}")
            a = a.astype(np.int32)
        return np.ascontiguousarray(a)

    def decode_bytes(self, ids) -> bytes:
        """Ids -> the exact bytes they stand for."""
        return self._h.decode(self._ids(ids))

    def decode(self, ids, errors: str = "replace") -> str:
        """Ids -> text. errors: how bytes that are not UTF-8 are handled
        ("replace", "strict", "ignore", "surrogateescape", ...), as in bytes.decode.

            >>> tok = Tokenizer.train(["é"] * 3, vocab_size=256, special_tokens=[])
            >>> tok.decode(tok.encode("é")[:1], errors="replace")
            '\\ufffd'
        """
        return self.decode_bytes(ids).decode("utf-8", errors)

    # ---- vocabulary ---------------------------------------------------------------

    def __len__(self) -> int:
        return self._h.vocab_size()

    @property
    def vocab_size(self) -> int:
        return self._h.vocab_size()

    @property
    def special_tokens(self) -> dict:
        """Special token text -> id."""
        return dict(self._special)

    @property
    def eot_id(self) -> Optional[int]:
        """The id of ``<|endoftext|>``, if this tokenizer has it."""
        return self._special.get("<|endoftext|>")

    def id_to_token(self, i: int) -> bytes:
        return self._h.token(int(i))[0]

    def token_to_id(self, token: Union[str, bytes]) -> Optional[int]:
        if isinstance(token, str):
            if token in self._special:
                return self._special[token]
            token = token.encode("utf-8")
        i = self._h.lookup(bytes(token))
        return None if i < 0 else i

    def merges(self) -> list:
        """[(left bytes, right bytes)] in rank order."""
        tok = [self._h.token(i)[0] for i in range(len(self))]
        return [(tok[a], tok[b]) for a, b, _ in self._h.merges()]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={len(self)}, merges={len(self._h.merges())}, "
                f"special_tokens={list(self._special)})")


# ---- command line ---------------------------------------------------------------


def _cmd_tokenizer(args) -> int:
    import sys
    import time
    if args.action == "train":
        t0 = time.perf_counter()
        tok = Tokenizer.train(files=args.files, vocab_size=args.vocab_size,
                              special_tokens=args.special or [], min_frequency=args.min_frequency)
        tok.save(args.output)
        if args.hf_json:
            tok.save_tokenizer_json(args.hf_json)
        print(f"{tok!r} trained in {time.perf_counter() - t0:.1f}s -> {args.output}")
    elif args.action == "encode":
        tok = Tokenizer.load(args.tokenizer)
        text = sys.stdin.read() if args.text is None else args.text
        print(" ".join(map(str, tok.encode(text).tolist())))
    elif args.action == "decode":
        tok = Tokenizer.load(args.tokenizer)
        sys.stdout.write(tok.decode(args.ids))
        sys.stdout.write("\n")
    elif args.action == "info":
        tok = Tokenizer.load(args.tokenizer)
        print(repr(tok))
    elif args.action == "export":
        Tokenizer.load(args.tokenizer).save_tokenizer_json(args.output)
    return 0


def _cmd_import_bpe(args) -> int:
    if args.tokenizer_json:
        tok = Tokenizer.from_tokenizer_json(args.tokenizer_json)
    elif args.vocab and args.merges:
        tok = Tokenizer.from_bpe_files(args.vocab, args.merges, args.special)
    else:
        raise SystemExit("import-bpe: give VOCAB MERGES, or --tokenizer-json FILE")
    tok.save(args.output)
    print(f"{tok!r} -> {args.output}")
    return 0


def add_commands(subparsers) -> None:
    """Register ``tokenizer`` and ``import-bpe`` on an argparse subparsers object."""
    from .argtypes import nonneg_int, positive_int
    p = subparsers.add_parser("tokenizer", help="train, inspect and use byte-level BPE tokenizers")
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="learn a BPE from text files")
    t.add_argument("files", nargs="+", help="UTF-8 text files (each one document)")
    t.add_argument("-o", "--output", required=True, help="where to save (our format)")
    t.add_argument("--vocab-size", type=positive_int, default=8192)
    t.add_argument("--special", action="append", help="special token (repeatable); default none")
    t.add_argument("--min-frequency", type=nonneg_int, default=0)
    t.add_argument("--hf-json", help="also export a Hugging Face tokenizer.json here")
    e = sub.add_parser("encode", help="print the ids of a text (or stdin)")
    e.add_argument("tokenizer")
    e.add_argument("text", nargs="?")
    d = sub.add_parser("decode", help="print the text of ids")
    d.add_argument("tokenizer")
    d.add_argument("ids", nargs="+", type=nonneg_int, help="token ids")
    i = sub.add_parser("info", help="describe a tokenizer file")
    i.add_argument("tokenizer")
    x = sub.add_parser("export", help="write a Hugging Face tokenizer.json")
    x.add_argument("tokenizer")
    x.add_argument("output")
    p.set_defaults(func=_cmd_tokenizer)

    q = subparsers.add_parser("import-bpe", help="import GPT-2/HF vocab.json + merges.txt (or tokenizer.json)")
    q.add_argument("vocab", nargs="?", help="vocab.json (GPT-2's encoder.json)")
    q.add_argument("merges", nargs="?", help="merges.txt (GPT-2's vocab.bpe)")
    q.add_argument("--tokenizer-json", help="a Hugging Face tokenizer.json instead")
    q.add_argument("--special", action="append", help="special token (default <|endoftext|> if present)")
    q.add_argument("-o", "--output", required=True)
    q.set_defaults(func=_cmd_import_bpe)
