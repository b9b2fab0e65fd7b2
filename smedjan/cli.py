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


def config_argv(sub: argparse.ArgumentParser, path: str) -> list:
    """A TOML file of options as the flags they stand for (keys are flag
    names, with - or _; true switches a flag on), so argparse checks each
    value as if typed. Flags given after these on the command line win."""
    try:
        import tomllib
    except ImportError:                             # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("--config needs Python >= 3.11 or the tomli package") from None
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None
    flags = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}
    argv = []
    for key, value in table.items():
        action = flags.get(key.replace("-", "_"))
        if action is None:
            raise ValueError(f"{path}: unknown option {key!r} for 'smedjan {sub.prog.split()[-1]}'")
        flag = max(action.option_strings, key=len)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ValueError(f"{path}: {key} must be true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)
        elif isinstance(value, (dict, list)) and not value:
            continue
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def write_config(path: str, args: argparse.Namespace, skip=()) -> None:
    """The resolved options of a command as a TOML file that --config
    reads back (None values left out), written atomically."""
    lines = []
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command", "config", "verbose", *skip) or value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, (list, tuple)):
            text = "[" + ", ".join(json.dumps(v) for v in value) + "]"
        else:
            text = json.dumps(str(value))
        lines.append(f"{key.replace('_', '-')} = {text}\n")
    from .io import write_text_atomic
    write_text_atomic(path, "".join(lines))


def _with_config(parser: argparse.ArgumentParser, argv: list) -> list:
    """argv with the options of its --config file spliced in after the
    command name (before the user's flags, so those win)."""
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, a in enumerate(argv) if a in sub.choices), None)
    if path is None or at is None:
        return argv
    return argv[:at + 1] + config_argv(sub.choices[argv[at]], path) + argv[at + 1:]


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _with_config(parser, argv)
    except (ValueError, OSError, ImportError) as e:
        print(f"smedjan: error: {e}", file=sys.stderr)
        return 1
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
