"""`smedjan export` and `smedjan import`: checkpoints to and from the
formats other tools read.

    smedjan export hf DIR --checkpoint run/latest.safetensors
    smedjan export gguf model.gguf --type q8_0 --checkpoint run/latest.safetensors
    smedjan import hf DIR -o run/imported.safetensors

A Hugging Face folder gets config.json, model.safetensors and, when the
checkpoint has a tokenizer beside it (or --tokenizer), tokenizer.json and
tokenizer_config.json, so AutoTokenizer, AutoModelForCausalLM and a
text-generation pipeline load it. Import writes a weights file and, when
the folder has a tokenizer.json, the tokenizer beside it, ready for
`smedjan generate`."""
from __future__ import annotations

import json
import os

from .commands import TOKENIZER_FILE, load_for_inference
from .io import write_text_atomic


def export_hf_folder(model, directory, tokenizer=None) -> None:
    """export_hf (config + weights) plus the tokenizer files transformers
    loads with AutoTokenizer."""
    from .hf import export_hf
    export_hf(model, directory)
    if tokenizer is None:
        return
    d = os.fspath(directory)
    tokenizer.save_tokenizer_json(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
           "model_max_length": model.config.max_seq_len}
    if tokenizer.eot_id is not None:
        cfg["eos_token"] = cfg["bos_token"] = "<|endoftext|>"
    write_text_atomic(os.path.join(d, "tokenizer_config.json"),
                      json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def import_hf_folder(directory, output) -> str:
    """A transformers folder as a smedjan weights file at `output`, with the
    folder's tokenizer.json (if any) saved beside it. Returns what it wrote."""
    from .checkpoint import save_weights
    from .hf import load_hf
    from .tokenizer import Tokenizer
    d = os.fspath(directory)
    model = load_hf(d)
    tj = os.path.join(d, "tokenizer.json")
    tok = Tokenizer.from_tokenizer_json(tj) if os.path.exists(tj) else None
    out = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_weights(out, model)
    wrote = out
    if tok is not None:
        tp = os.path.join(os.path.dirname(os.path.abspath(out)), TOKENIZER_FILE)
        tok.save(tp)
        wrote += f" and {tp}"
    return wrote


def _cmd_export(args) -> int:
    model = load_for_inference(args.checkpoint, args.tokenizer)
    tok = getattr(model, "tokenizer", None)
    if args.format == "hf":
        export_hf_folder(model, args.output, tok)
        print(f"{args.checkpoint} -> {args.output}/ (config.json, model.safetensors"
              f"{', tokenizer.json' if tok else ''})")
    else:
        from .gguf import export_gguf
        export_gguf(model, args.output, args.type, tokenizer=tok)
        print(f"{args.checkpoint} -> {args.output} ({args.type})")
    return 0


def _cmd_import(args) -> int:
    print(f"{args.directory} -> {import_hf_folder(args.directory, args.output)}")
    return 0


def add_commands(sub) -> None:
    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder or a GGUF file",
                       description="Export a checkpoint (and the tokenizer beside it).")
    e.add_argument("format", choices=["hf", "gguf"])
    e.add_argument("output", help="folder (hf) or file (gguf)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--tokenizer", help=f"default: {TOKENIZER_FILE} beside the checkpoint")
    e.add_argument("--type", choices=["f32", "q8_0", "q4_0"], default="q8_0",
                   help="GGUF weight type (default q8_0)")
    e.set_defaults(func=_cmd_export)
    i = sub.add_parser("import", help="read a Hugging Face folder into a smedjan weights file",
                       description="Import a Llama/Mistral/Qwen3 transformers folder.")
    i.add_argument("format", choices=["hf"])
    i.add_argument("directory")
    i.add_argument("-o", "--output", required=True, help="weights file to write")
    i.set_defaults(func=_cmd_import)
