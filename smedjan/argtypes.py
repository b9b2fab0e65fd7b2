"""argparse `type=` functions for the command line's numeric flags, and the
size parser behind --memory-limit.

Each one raises argparse.ArgumentTypeError on bad input, so argparse itself
names the flag: "smedjan train: error: argument --batch-size: expected an
integer >= 1, got '0'". Range checks live here as well as in the API (the
API names its argument, the command line its flag). Never does: read a
file, or accept a value that the command would refuse later.
"""
from __future__ import annotations

import argparse
import json
import math

_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "k": 1 << 10,
          "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "kb": 1000, "mb": 10 ** 6,
          "gb": 10 ** 9, "tb": 10 ** 12, "b": 1}


def parse_bytes(text) -> int:
    """'12GiB', '800MiB', '2G', '1e9' -> bytes (a bare number is bytes);
    None -> 0. ValueError for anything else, a negative or a non-finite size.

    >>> parse_bytes("1.5KiB")
    1536
    """
    if text is None:
        return 0
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size must be >= 0, got {text}")
        return text
    if isinstance(text, float):
        num, scale, shown = text, 1, text
    else:
        t = str(text).strip().lower().replace(" ", "")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u)), "")
        scale, shown = _UNITS.get(unit, 1), text
        try:
            num = float(t[:len(t) - len(unit)])
        except ValueError:
            raise ValueError(f"expected a size such as 12GiB, 800MiB, 2G or 1e9 (bytes), "
                             f"got {shown!r}") from None
    if not math.isfinite(num) or num < 0:
        raise ValueError(f"a size must be finite and >= 0, got {shown!r}")
    return int(num * scale)


def _checked(cast, what: str, ok):
    def parse(text):
        try:
            v = cast(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    parse.__name__ = what
    return parse


def _finite(text) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


positive_int = _checked(int, "an integer >= 1", lambda v: v >= 1)
nonneg_int = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(_finite, "a number > 0", lambda v: v > 0)
nonneg_float = _checked(_finite, "a number >= 0", lambda v: v >= 0)
fraction = _checked(_finite, "a number in [0, 1)", lambda v: 0 <= v < 1)
probability = _checked(_finite, "a number in (0, 1]", lambda v: 0 < v <= 1)


def byte_size(text) -> int:
    """--memory-limit and kin: a size (see parse_bytes)."""
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_list(least: int = 1):
    """A comma-separated list of integers >= least, e.g. "2,4,8"."""
    def parse(text):
        out = []
        for piece in str(text).split(","):
            try:
                v = int(piece.strip())
            except ValueError:
                v = None
            if v is None or v < least:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers >= {least}, got {piece.strip()!r} "
                    f"in {text!r}")
            out.append(v)
        return ",".join(map(str, out))
    parse.__name__ = f"integer list >= {least}"
    return parse


def ascending_sizes(text) -> list:
    """Comma-separated sizes >= 1 in ascending order, e.g. "64,128,256,512"
    (--label-bucket-sizes) -> [64, 128, 256, 512]."""
    sizes = [int(v) for v in int_list(1)(text).split(",")]
    for a, b in zip(sizes, sizes[1:]):
        if b <= a:
            raise argparse.ArgumentTypeError(f"expected ascending sizes, got {b} after {a} "
                                             f"in {text!r}")
    return sizes


def on_off_list(text) -> str:
    """A comma-separated list of on/off (true/false, yes/no, 1/0)."""
    for piece in str(text).split(","):
        if piece.strip().lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected on/off values, got {piece.strip()!r} "
                                             f"in {text!r}")
    return text


def float_tuple(n: int, none_first: bool = False):
    """n comma-separated finite numbers, e.g. "0.9,0.95"; with none_first the
    first may be "none" (Adafactor's eps1)."""
    def parse(text):
        pieces = [p.strip() for p in str(text).split(",")]
        try:
            if len(pieces) != n:
                raise ValueError(text)
            return tuple(None if none_first and i == 0 and p.lower() == "none" else _finite(p)
                         for i, p in enumerate(pieces))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got "
                                             f"{text!r}") from None
    parse.__name__ = f"{n} numbers"
    return parse


def eps_value(text):
    """--eps: one number, or Adafactor's two (eps1 or none, eps2)."""
    return float_tuple(2, True)(text) if "," in str(text) else _finite(text)


def _json(text, kind: type, what: str):
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e}) in {text!r}") from None
    if not isinstance(v, kind):
        raise argparse.ArgumentTypeError(f"expected {what}, got a {type(v).__name__}: {text!r}")
    return v


def json_list(text) -> list:
    """A JSON list, e.g. '[{"params": "layers.*", "lr_mult": 0.5}]'."""
    return _json(text, list, "a JSON list")


def json_object(text) -> dict:
    """A JSON object, e.g. '{"lr": [1e-3, 3e-4]}'."""
    return _json(text, dict, "a JSON object of lists")


def json_fields(text) -> dict:
    """A JSON object of a config field's settings, e.g. '{"d_state": 64}'."""
    return _json(text, dict, "a JSON object")
