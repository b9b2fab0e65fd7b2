"""The `smedjan` command line (also `python -m smedjan`). Each subcommand
is a thin wrapper over the Python API."""
from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("smedjan")


def cmd_sizes(args) -> int:
    from .commands import architecture_from_args
    from .config import format_count, sizes
    arch = architecture_from_args(args)
    rows = sizes(args.vocab_size, **arch)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"parameter counts at vocab_size {args.vocab_size}" +
          ("".join(f", {k}={v}" for k, v in arch.items()) if arch else " (tied head counted once)"))
    print(f"{'name':<8} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} {'max_seq':>7} "
          f"{'params':>14}")
    for r in rows:
        print(f"{r['name']:<8} {r['dim']:>5} {r['n_layers']:>6} {r['n_heads']:>5} "
              f"{r['n_kv_heads']:>3} {r['ffn_dim']:>6} {r['max_seq_len']:>7} "
              f"{r['params']:>14,} ({format_count(r['params'])})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .argtypes import positive_int
    p = argparse.ArgumentParser(prog="smedjan", description="A language-model forge: "
                                "train and run decoder-only transformers.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"smedjan {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("sizes", help="exact parameter counts of the presets",
                       description="Print the exact parameter count of every preset.")
    s.add_argument("--vocab-size", type=positive_int, default=8192,
                   help="vocabulary size (default 8192)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_sizes)
    from . import commands, demo, exchange, plot, tokenizer
    commands.add_architecture_args(s)
    from .bench import add_commands as add_bench     # smedjan.bench is the function
    from .sweep import add_commands as add_sweep
    tokenizer.add_commands(sub)
    commands.add_commands(sub)
    exchange.add_commands(sub)
    plot.add_commands(sub)
    add_bench(sub)
    add_sweep(sub)
    demo.add_commands(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError, TypeError, FloatingPointError, ImportError) as e:
        print(f"smedjan {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
