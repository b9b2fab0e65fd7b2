"""py_checkpoint.py — smedjan.checkpoint.load_checkpoint on arbitrary bytes:
the safetensors container (engine) and the checkpoint metadata (format,
version, config, step, trainer / rng / loader / extra JSON) checked in
Python. A checkpoint that loads and whose model is small (under a million
parameters) is also restored into a fresh model, as model_from_checkpoint
does. The harness drops the crc32:* metadata entries of an input whose
header parses (such files are valid: CRCs are optional), so mutations of the
metadata are not all stopped by a CRC mismatch; the C target
(fuzz_safetensors) fuzzes the container with them."""
import json

import pyfuzz

import atheris

with atheris.instrument_imports(include=["smedjan"]):
    from smedjan import checkpoint
    from smedjan.model import Model


def without_crcs(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        return data
    try:
        h = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):
        return data
    meta = h.get("__metadata__") if isinstance(h, dict) else None
    if not isinstance(meta, dict):
        return data
    h["__metadata__"] = {k: v for k, v in meta.items() if not k.startswith("crc32:")}
    head = json.dumps(h, ensure_ascii=False).encode("utf-8", "surrogatepass")
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data[8 + n:]


def test_one(data: bytes):
    ck = checkpoint.load_checkpoint(pyfuzz.path("ckpt.safetensors", without_crcs(data)))
    if ck.config.n_params < 1_000_000 and ck.config.max_seq_len <= 4096:
        checkpoint.restore(ck, Model(ck.config, seed=0))


if __name__ == "__main__":
    pyfuzz.run(test_one)
