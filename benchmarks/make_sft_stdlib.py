"""A real SFT set from text nobody wrote for us: the Python standard library
installed on this machine. For every function or method with a docstring,

    user      = its signature and docstring, as they stand in the source
    assistant = the rest of its body (the docstring removed), dedented

as chat `messages` JSONL (smedjan prepare --sft reads it). Modules are read
in sorted order and functions in source order, so the same Python gives the
same bytes; the printed sha256 names the set. The split is by module (a
module's functions all go to train or all to val, by a hash of its name),
so val measures code the model has not seen a sibling of.

    python benchmarks/make_sft_stdlib.py -o data/stdlib_sft [--max-examples N]
        [--modules json,textwrap] [--val-fraction 0.05] [--max-body-lines 60]
    # -> data/stdlib_sft.train.jsonl, data/stdlib_sft.val.jsonl
    smedjan prepare --sft data/stdlib_sft.train.jsonl --tokenizer tok.sjt --seq-len 512 \\
        -o data/stdlib_sft.train.bin2d

Skipped: test packages, files that do not parse, bodies longer than
--max-body-lines or --max-body-chars, and bodies that are only the
docstring. Each line also names its origin ("module", "name", "source").
"""
import argparse
import ast
import hashlib
import json
import os
import sys
import sysconfig
import textwrap

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_modules(root):
    """(module name, path) of every .py file under root, sorted by name."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(d, f), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out.append((".".join(rel), os.path.join(d, f)))
    return sorted(out)


def _functions(tree):
    """(qualified name, node) of every function, in source order."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)
    visit(tree, "")
    return out


def examples_of(module, path, max_body_lines, max_body_chars):
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()
    for name, fn in _functions(tree):
        if ast.get_docstring(fn, clean=False) is None or len(fn.body) < 2:
            continue
        doc = fn.body[0]
        if doc.lineno == fn.lineno:           # def f(): "doc" on one line
            continue
        head = "\n".join(lines[fn.lineno - 1:doc.end_lineno])
        body = "\n".join(lines[doc.end_lineno:fn.end_lineno]).strip("\n")
        body = textwrap.dedent(body)
        if not body.strip() or body.count("\n") + 1 > max_body_lines or len(body) > max_body_chars:
            continue
        yield {"messages": [{"role": "user", "content": textwrap.dedent(head)},
                            {"role": "assistant", "content": body}],
               "module": module, "name": name, "source": f"{module}:{fn.lineno}"}


def is_val(module, val_fraction):
    h = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "little")
    return h / 2 ** 64 < val_fraction


def build(out, *, modules=None, max_examples=None, val_fraction=0.05, max_body_lines=60,
          max_body_chars=4000, root=None):
    """Write out.train.jsonl and out.val.jsonl; returns {split: (path, examples, sha256)}."""
    root = root or sysconfig.get_paths()["stdlib"]
    mods = stdlib_modules(root)
    if modules:
        wanted = set(modules)
        mods = [(m, p) for m, p in mods if m in wanted]
        missing = wanted - {m for m, _ in mods}
        if missing:
            raise SystemExit(f"make_sft_stdlib: no such modules under {root}: {sorted(missing)}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = {s: f"{out}.{s}.jsonl" for s in ("train", "val")}
    files = {s: open(p, "w", encoding="utf-8") for s, p in paths.items()}
    counts = {s: 0 for s in paths}
    digests = {s: hashlib.sha256() for s in paths}
    total = 0
    try:
        for module, path in mods:
            split = "val" if is_val(module, val_fraction) else "train"
            for ex in examples_of(module, path, max_body_lines, max_body_chars):
                if max_examples is not None and total >= max_examples:
                    break
                line = json.dumps(ex, ensure_ascii=False) + "\n"
                files[split].write(line)
                digests[split].update(line.encode("utf-8"))
                counts[split] += 1
                total += 1
    finally:
        for f in files.values():
            f.close()
    return {s: (paths[s], counts[s], digests[s].hexdigest()) for s in paths}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="stdlib_sft",
                    help="path prefix: writes PREFIX.train.jsonl and PREFIX.val.jsonl")
    ap.add_argument("--max-examples", type=int, help="stop after this many (train + val)")
    ap.add_argument("--modules", help="comma-separated module names (default: all)")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="share of modules in val")
    ap.add_argument("--max-body-lines", type=int, default=60)
    ap.add_argument("--max-body-chars", type=int, default=4000)
    a = ap.parse_args(argv)
    res = build(a.output, modules=a.modules.split(",") if a.modules else None,
                max_examples=a.max_examples, val_fraction=a.val_fraction,
                max_body_lines=a.max_body_lines, max_body_chars=a.max_body_chars)
    print(f"python {sys.version.split()[0]}, stdlib {sysconfig.get_paths()['stdlib']}")
    for split, (path, n, digest) in res.items():
        print(f"{split}: {n:,} examples -> {path}  sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
