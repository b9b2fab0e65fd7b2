"""`smedjan prepare`, `smedjan train` and `smedjan generate`: thin command
wrappers over smedjan.data, Trainer.fit and Model.generate."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Optional

import numpy as np

from .argtypes import (ascending_sizes, byte_size, eps_value, float_tuple, fraction, int_list,
                       json_fields, json_list, nonneg_float, nonneg_int, parse_bytes,
                       positive_float, positive_int, probability)

log = logging.getLogger("smedjan")
TOKENIZER_FILE = "tokenizer.sjt"
RUN_CONFIG = "train.toml"     # the resolved options of the last `smedjan train` there


def _text_chunks(path: str, size: int = 1 << 20):
    """A file's text in ~size pieces that end at a newline, so that no word
    is cut in two (the pre-tokeniser never splits across a newline)."""
    with open(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(size)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                rest = block
                continue
            rest = block[cut:]
            yield block[:cut]
        if rest:
            yield rest


def prepare(files, tokenizer, out: str, *, dtype: str = "auto", eot: bool = True,
            progress: bool = True) -> int:
    """Encode text files into a token file; an end-of-text token separates
    files when the tokenizer has one. Returns the token count."""
    from tqdm.auto import tqdm
    from .data import write_tokens
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"prepare: no such file: {f}")
    if dtype == "auto":
        dtype = "uint16" if len(tokenizer) <= 65536 else "uint32"
    total = sum(os.path.getsize(f) for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None if progress else True)

    def chunks():
        for f in files:
            batch, size = [], 0
            for piece in _text_chunks(f):
                batch.append(piece)
                size += len(piece)
                if size >= 16 << 20:
                    yield from tokenizer.encode_batch(batch, allowed_special=())
                    bar.update(size)
                    batch, size = [], 0
            if batch:
                yield from tokenizer.encode_batch(batch, allowed_special=())
                bar.update(size)
            if eot and tokenizer.eot_id is not None:
                yield np.array([tokenizer.eot_id], dtype=np.int32)

    try:
        return write_tokens(out, chunks(), dtype=dtype)
    finally:
        bar.close()


def cmd_prepare(args) -> int:
    from .tokenizer import Tokenizer
    if bool(args.files) == bool(args.sft):
        raise ValueError("give text files or --sft JSONL, one of the two")
    tok = Tokenizer.load(args.tokenizer)
    if args.sft:
        return _prepare_sft(args, tok)
    n = prepare(args.files, tok, args.output, dtype=args.dtype, eot=not args.no_eot)
    print(f"{n:,} tokens -> {args.output}")
    return 0


def cmd_convert_tokens(args) -> int:
    from .data import convert_tokens
    n = convert_tokens(args.source, args.output, format=args.format)
    print(f"{n:,} tokens -> {args.output}")
    return 0


def _prepare_sft(args, tok) -> int:
    from .data import prepare_sft
    if args.seq_len is None:
        raise ValueError("--sft needs --seq-len (the training sequence length)")
    st = prepare_sft(args.sft, tok, args.seq_len, args.output, chat_template=args.chat_template,
                     skip_bad_lines=args.skip_bad_lines, on_long=args.on_long)
    for reason in st.bad_reasons:
        print(f"skipped {reason}", file=sys.stderr)
    if st.bad_lines > len(st.bad_reasons):
        print(f"... and {st.bad_lines - len(st.bad_reasons):,} more bad lines (all counted in "
              f"{args.output}.json)", file=sys.stderr)
    print(st.summary())
    return 0


def _per_layer(kind, choices=()):
    """A per-layer CLI value: one value, or a comma list repeated as a period."""
    def parse(text: str):
        vals = [kind(v) for v in text.split(",")]
        bad = [v for v in vals if choices and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
        return vals[0] if len(vals) == 1 else vals
    parse.__name__ = kind.__name__
    return parse


def _rope_scaling(text: str) -> dict:
    """TYPE:FACTOR[:ORIGINAL_CONTEXT], e.g. yarn:4:2048, linear:2."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("linear", "dynamic", "yarn"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected linear|dynamic|yarn:FACTOR"
                                         "[:ORIGINAL_CONTEXT]")
    try:
        d = {"type": parts[0], "factor": float(parts[1])}
        if len(parts) == 3:
            d["original_max_seq_len"] = int(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: FACTOR is a number, ORIGINAL_CONTEXT an "
                                         "integer") from None
    return d


def add_architecture_args(p) -> None:
    g = p.add_argument_group("architecture (per-layer values: one, or a comma list repeated "
                             "as a period)")
    g.add_argument("--mixer", type=_per_layer(str, ("attention", "mla", "mamba2", "linear")),
                   help="attention (default), mla (multi-head latent attention), mamba2 or "
                        "linear, e.g. mamba2,mamba2,mamba2,attention")
    g.add_argument("--mla", type=json_fields, metavar="JSON",
                   help='the mla layers\' sizes, e.g. \'{"kv_lora_rank": 256, "q_lora_rank": 384}\' '
                        "(left out: DeepSeek-V3's proportions to the head size)")
    g.add_argument("--ffn", type=_per_layer(str, ("swiglu", "relu2", "moe", "none")),
                   help="swiglu (default), relu2, moe (routed experts) or none (Mamba-2 blocks), "
                        "e.g. swiglu,moe")
    g.add_argument("--moe", type=json_fields, metavar="JSON",
                   help='the moe layers\' experts, e.g. \'{"n_experts": 8, "top_k": 2, "expert_dim": 512, '
                        '"aux_loss": 0.01}\' (docs/architectures.md)')
    g.add_argument("--ssm", type=json_fields, metavar="JSON",
                   help='Mamba-2 layers\' shape, e.g. \'{"d_state": 64, "head_dim": 64}\'')
    g.add_argument("--linear", type=json_fields, metavar="JSON",
                   help='linear attention options, e.g. \'{"feature": "elu1", "decay": "gated"}\'')
    g.add_argument("--qk-norm", type=_per_layer(str, ("none", "weighted", "plain")),
                   help="none (default), weighted or plain")
    g.add_argument("--window", type=_per_layer(int), metavar="N",
                   help="sliding-window attention in tokens (0: the whole context), e.g. "
                        "1024,1024,1024,0")
    g.add_argument("--rope-scaling", type=_rope_scaling, metavar="TYPE:FACTOR[:ORIG]",
                   help="linear, dynamic or yarn RoPE scaling, e.g. yarn:4:2048")
    g.add_argument("--rope-theta", type=positive_float)
    g.add_argument("--untied-head", action="store_true", help="a separate output head")
    g.add_argument("--paired-heads", action="store_true",
                   help="seed 001: adjacent heads' q, k, v averaged")
    g.add_argument("--value-mix", type=fraction, help="seed 001: v mixed with layer 0's")
    g.add_argument("--embed-skip", type=float, help="seed 001: the embedding added to each block")


def architecture_from_args(args) -> dict:
    """The Config fields the architecture options set (the rest default)."""
    over = {k: getattr(args, k) for k in ("mixer", "mla", "ffn", "moe", "qk_norm", "window",
                                          "rope_scaling", "rope_theta", "value_mix", "embed_skip",
                                          "ssm", "linear")
            if getattr(args, k, None) is not None}
    if getattr(args, "untied_head", False):
        over["tied_head"] = False
    if getattr(args, "paired_heads", False):
        over["paired_heads"] = True
    return over


def _config_from_args(args, vocab_size: int):
    from .config import Config
    arch = architecture_from_args(args)
    if args.size == "custom":
        if not (args.dim and args.layers and args.heads):
            raise ValueError("--size custom needs --dim, --layers and --heads")
        return Config.custom(args.dim, args.layers, args.heads, args.kv_heads,
                             ffn_mult=args.ffn_mult, vocab_size=vocab_size,
                             max_seq_len=max(args.seq_len, 256), **arch)
    over = dict(arch)
    if args.kv_heads:
        over["n_kv_heads"] = args.kv_heads
    cfg = Config.preset(args.size, vocab_size, **over)
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the {args.size} preset's "
                         f"max_seq_len {cfg.max_seq_len}")
    return cfg


def _loaders(args, vocab: int):
    """The train and val loaders for --data: a token file (Batches) or a
    bin2d sample file (SampleBatches, recognised by its magic). Sets
    args.seq_len to the longest T a batch will have. Returns (train, val,
    a one-line description of the data)."""
    from .data import Batches, SampleBatches, SampleFile, TokenFile, is_sample_file
    if is_sample_file(args.data):
        data = SampleFile(args.data, load=args.load, vocab_size=vocab)

        def loader(split, seed):
            return SampleBatches(data, args.batch_size, seq_len=args.seq_len,
                                 bucket_sizes=args.bucket_sizes, shuffle_buffer=args.shuffle_buffer,
                                 prefetch_batches=args.prefetch_batches, seed=seed, split=split,
                                 val_fraction=args.val_fraction)
        train = loader("train", args.seed)
        val = loader("val", args.seed + 1) if args.val_fraction > 0 else None
        args.seq_len = train.max_seq_len
        shape = f"buckets {args.bucket_sizes}" if args.bucket_sizes else f"seq {args.seq_len}"
        return train, val, f"{data.n_rows:,} samples (bin2d, {args.load}); batch {args.batch_size}{{accum}} x {shape}"
    for flag, given in (("--bucket-sizes", args.bucket_sizes), ("--shuffle-buffer", args.shuffle_buffer),
                        ("--prefetch-batches", args.prefetch_batches)):
        if given:
            raise ValueError(f"{flag} needs a bin2d sample file, and {args.data} is a token file")
    data = TokenFile(args.data)
    top = data.max()
    if top >= vocab:
        raise ValueError(f"{args.data}: holds token id {top}, but the vocabulary has {vocab} "
                         f"entries (give --tokenizer or --vocab-size)")
    args.seq_len = args.seq_len or 256
    train = Batches(data, args.batch_size, args.seq_len, split="train",
                    val_fraction=args.val_fraction, seed=args.seed)
    val = Batches(data, args.batch_size, args.seq_len, split="val",
                  val_fraction=args.val_fraction, seed=args.seed + 1) if args.val_fraction > 0 else None
    return train, val, f"{len(data):,} tokens; batch {args.batch_size}{{accum}} x seq {args.seq_len}"


DEFAULT_STEPS = 1000


def cmd_train(args) -> int:
    from . import checkpoint as ck
    from .loop import LATEST, fit
    from .model import Model
    from .trainer import Trainer
    tok_path = args.tokenizer
    vocab = args.vocab_size
    if tok_path:
        from .tokenizer import Tokenizer
        vocab = len(Tokenizer.load(tok_path))
    train, val, about = _loaders(args, vocab)
    latest = os.path.join(args.checkpoint_dir, LATEST) if args.checkpoint_dir else None
    if args.resume and not (latest and os.path.exists(latest)):
        raise FileNotFoundError(f"--resume: no checkpoint at {latest}")
    if args.resume:
        c = ck.load_checkpoint(latest)
        model = Model(c.config, seed=args.seed)
        hp, given = dict(c.trainer), optimizer_options(args)
        if given.get("optimizer", c.optimizer) != c.optimizer:
            # another optimizer: its own settings on the checkpoint's schedule and groups
            hp = {k: hp[k] for k in SCHEDULE_KEYS if k in hp}
        hp.update(given)
        if args.steps is not None and args.steps != hp["steps"]:
            if args.steps <= c.step:
                raise ValueError(f"--steps {args.steps}: {latest} is already at step {c.step}")
            print(f"--steps {args.steps}: the schedule is re-fitted from {hp['steps']} "
                  f"to {args.steps} steps")
            hp["steps"] = args.steps
        check_memory_limit(model, args, hp.get("optimizer", "adamw"), hp.get("momentum"),
                           hp.get("optim_state_dtype", "fp32"))
        trainer = Trainer(model, **hp, **lever_options(args), **guard_options(args))
        print(f"resuming {latest} at step {c.step}")
    else:
        model = Model(_config_from_args(args, vocab), seed=args.seed)
        check_memory_limit(model, args, args.optimizer or "adamw", args.momentum,
                           args.optim_state_dtype or "fp32")
        steps = DEFAULT_STEPS if args.steps is None else args.steps
        warmup = min(50, steps) if args.warmup is None else args.warmup
        if warmup > steps:
            raise ValueError(f"--warmup {warmup} exceeds --steps {steps}")
        opts = optimizer_options(args)
        if opts.get("optimizer", "adamw") == "adamw":
            opts.setdefault("lr", 1e-3)
        trainer = Trainer(model, min_lr=args.min_lr, warmup=warmup, steps=steps,
                          clip=args.clip, **opts, **lever_options(args), **guard_options(args))
    if args.checkpoint_dir:
        from .cli import write_config
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        if not args.resume:     # a resumed run keeps the options that made the checkpoint
            write_config(os.path.join(args.checkpoint_dir, RUN_CONFIG), args, skip=("resume",))
    if args.checkpoint_dir and tok_path:
        dst = os.path.join(args.checkpoint_dir, TOKENIZER_FILE)
        if os.path.abspath(tok_path) != os.path.abspath(dst):
            shutil.copyfile(tok_path, dst)
    accum = f" x accum {args.grad_accum}" if args.grad_accum > 1 else ""
    print(f"{model!r}\n{about.format(accum=accum)}; {trainer.steps} steps")
    rows = fit(trainer, train, val, eval_every=args.eval_every, eval_batches=args.eval_batches,
               checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
               resume=args.resume, max_steps=args.max_steps, reset_optimizer=args.reset_optimizer)
    if rows:
        last = rows[-1]
        msg = f"step {last['step']}: loss {last['loss']:.4f}"
        if "val_loss" in last:
            msg += f", val {last['val_loss']:.4f} (ppl {last['ppl']:.1f})"
        print(msg)
    return 0


#: what a resumed run keeps from its checkpoint when --optimizer changes
SCHEDULE_KEYS = ("min_lr", "warmup", "steps", "clip", "param_groups", "decay_embedding")
#: the optimizer flags (argparse dest = Trainer keyword)
OPTIMIZER_FLAGS = ("optimizer", "lr", "weight_decay", "betas", "eps", "momentum", "dampening",
                   "nesterov", "beta2_decay", "d", "ns_steps", "ns_coefficients",
                   "adjust_lr_fn", "adamw_lr", "adamw_betas", "adamw_eps", "param_groups",
                   "optim_state_dtype")


def optimizer_options(args) -> dict:
    """Trainer options from the optimizer flags that were given (the rest:
    the optimizer's defaults, or a resumed checkpoint's)."""
    out = {k: getattr(args, k) for k in OPTIMIZER_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "no_decay_embedding", False):
        out["decay_embedding"] = False
    return out


def add_optimizer_flags(p) -> None:
    """--optimizer and each optimizer's settings (torch.optim's names)."""
    from .trainer import OPTIMIZERS, STATE_DTYPES
    g = p.add_argument_group("optimizer (defaults: the optimizer's own, as torch.optim's)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default adamw")
    g.add_argument("--lr", type=nonneg_float,
                   help="peak learning rate (default 1e-3 for adamw, else the optimizer's)")
    g.add_argument("--weight-decay", type=nonneg_float,
                   help="decoupled weight decay of the matrices (adamw default 0.1)")
    g.add_argument("--betas", type=float_tuple(2), metavar="B1,B2", help="adamw, lion")
    g.add_argument("--eps", type=eps_value, metavar="EPS",
                   help="adamw; muon's Newton-Schulz floor; adafactor: EPS1,EPS2 (EPS1 may be "
                        "none)")
    g.add_argument("--momentum", type=nonneg_float, help="sgd, muon")
    g.add_argument("--dampening", type=nonneg_float, help="sgd")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="sgd, muon")
    g.add_argument("--beta2-decay", type=float, help="adafactor (<= 0)")
    g.add_argument("--d", type=float, help="adafactor's update clipping threshold (>= 1)")
    g.add_argument("--ns-steps", type=positive_int, help="muon: Newton-Schulz iterations")
    g.add_argument("--ns-coefficients", type=float_tuple(3), metavar="A,B,C", help="muon")
    g.add_argument("--adjust-lr-fn", choices=["original", "match_rms_adamw"], help="muon")
    g.add_argument("--adamw-lr", type=nonneg_float, help="muon: its AdamW part's peak lr")
    g.add_argument("--adamw-betas", type=float_tuple(2), metavar="B1,B2", help="muon")
    g.add_argument("--adamw-eps", type=positive_float, help="muon")
    g.add_argument("--param-groups", type=json_list, metavar="JSON",
                   help='per-tensor settings, e.g. \'[{"params": "layers.*.w_*", "lr_mult": 0.5, '
                        '"weight_decay": 0}]\' (globs over parameter names)')
    g.add_argument("--no-decay-embedding", action="store_true",
                   help="no weight decay on the embedding (norm gains never decay by default)")
    g.add_argument("--optim-state-dtype", choices=list(STATE_DTYPES),
                   help="how moments and momenta are stored (default fp32; bf16: stochastic "
                        "rounding; 8bit: blockwise dynamic quantisation); the math is fp32")
    g.add_argument("--reset-optimizer", action="store_true",
                   help="--resume with another optimizer (or state shape or dtype): start its "
                        "state afresh")


def lever_options(args) -> dict:
    """Trainer options from the memory-lever flags."""
    return dict(grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing,
                cheap_recompute=args.cheap_recompute, fused_ce=args.fused_ce,
                fp16_activations=args.fp16_activations, memory_limit=parse_bytes(args.memory_limit),
                sparse_loss=args.sparse_loss, label_bucket_sizes=args.label_bucket_sizes)


def guard_options(args) -> dict:
    """Trainer options from the non-finite and loss-spike flags."""
    return dict(max_skipped_steps=args.max_skipped_steps or None, spike_window=args.spike_window,
                spike_threshold=args.spike_threshold or None)


def add_guard_flags(p) -> None:
    g = p.add_argument_group("non-finite steps and loss spikes")
    g.add_argument("--max-skipped-steps", type=int, default=3, metavar="N",
                   help="stop with an error after N updates in a row skipped for a non-finite "
                        "gradient norm (default 3; 0: never)")
    g.add_argument("--spike-window", type=int, default=100, metavar="N",
                   help="losses the spike detector compares each loss with (default 100)")
    g.add_argument("--spike-threshold", type=float, default=6.0, metavar="Z",
                   help="log a loss whose z-score passes Z as a spike (default 6; 0: off)")


def check_memory_limit(model, args, optimizer: str = "adamw",
                       momentum: Optional[float] = None, optim_state_dtype: str = "fp32") -> None:
    """--memory-limit: refuse before the optimizer state and activations are
    allocated when the planned peak of a training step exceeds the limit."""
    limit = parse_bytes(args.memory_limit)
    if not limit:
        return
    model.set_levers(gradient_checkpointing=args.gradient_checkpointing, fused_ce=args.fused_ce,
                     fp16_activations=args.fp16_activations, cheap_recompute=args.cheap_recompute,
                     sparse_loss=args.sparse_loss, label_bucket_sizes=args.label_bucket_sizes)
    plan = model.plan_memory(args.batch_size, args.seq_len, "train", args.grad_accum,
                             optimizer=optimizer, momentum=momentum,
                             optim_state_dtype=optim_state_dtype)
    if plan["peak_bytes"] > limit:
        from . import OutOfMemoryError
        mib = 1 << 20
        raise OutOfMemoryError(
            f"--memory-limit {limit / mib:.1f} MiB: batch {args.batch_size} x seq {args.seq_len} "
            f"plans a peak of {plan['peak_bytes'] / mib:.1f} MiB (parameters, gradients and {optimizer} "
            f"state {plan['fixed_bytes'] / mib:.1f} MiB + activations "
            f"{plan['arena_bytes'] / mib:.1f} MiB); pull a lever: smaller --batch-size or "
            f"--seq-len, --grad-accum, --cheap-recompute, --gradient-checkpointing, --fused-ce")


def add_sample_flags(p) -> None:
    """How batches are drawn from a bin2d sample file."""
    g = p.add_argument_group("bin2d sample files")
    g.add_argument("--bucket-sizes", type=int_list(1), metavar="T1,T2,...",
                   help="length buckets: each batch's T is the smallest bucket that fits its rows, "
                        "e.g. 128,256,512")
    g.add_argument("--shuffle-buffer", type=nonneg_int, default=0, metavar="N",
                   help="streaming shuffle over N rows, seeded per epoch (0: file order)")
    g.add_argument("--prefetch-batches", type=nonneg_int, default=0, metavar="N",
                   help="batches assembled ahead on a loader thread (0: none)")
    g.add_argument("--load", choices=["memory", "mmap"], default="memory",
                   help="read the tokens into memory at start (default), or per batch")


def add_lever_flags(p) -> None:
    """The memory levers, pulled in this order when a run does not fit."""
    g = p.add_argument_group("memory levers")
    g.add_argument("--grad-accum", type=positive_int, default=1, metavar="N",
                   help="N micro-batches of --batch-size per step (effective batch = batch x N)")
    g.add_argument("--cheap-recompute", action="store_true",
                   help="redo the RMSNorm and SwiGLU outputs in backward instead of keeping them "
                        "(about a third of the activations kept; 3 elementwise kernels a layer)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory, ~1.3x compute)")
    g.add_argument("--fused-ce", action="store_true",
                   help="chunked LM head + loss: the batch x seq x vocab logits never exist")
    g.add_argument("--fp16-activations", action="store_true",
                   help="store the activations kept for backward as fp16 (half their memory)")
    g.add_argument("--memory-limit", type=byte_size, metavar="BYTES",
                   help="refuse a run whose planned peak exceeds this (e.g. 12GiB, 800MiB)")
    g.add_argument("--sparse-loss", action="store_true",
                   help="final norm, LM head and loss only at label positions (targets not "
                        "ignored): the same loss, without the other positions' logits")
    g.add_argument("--label-bucket-sizes", type=ascending_sizes, metavar="N,N,...",
                   help="with --sparse-loss: a batch's label rows padded to the smallest of "
                        "these that holds them (e.g. 64,128,256,512), so shapes repeat "
                        "(default: a multiple of 64)")


def load_for_inference(path: str, tokenizer: str = None):
    """A model from a checkpoint, with the tokenizer saved beside it (or given).

    A tokenizer with more tokens than the checkpoint's vocab_size is refused
    here, naming both files and both sizes; one with fewer is accepted
    (generation then samples only ids the tokenizer can decode)."""
    from .checkpoint import model_from_checkpoint
    from .infer import check_vocab
    model = model_from_checkpoint(path)
    tok = tokenizer or os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_FILE)
    if os.path.exists(tok):
        from .tokenizer import Tokenizer
        t = Tokenizer.load(tok)
        check_vocab(t, model.config.vocab_size, f"checkpoint {path}", f"tokenizer {tok}")
        model.tokenizer = t
    elif tokenizer:
        raise FileNotFoundError(f"--tokenizer: no such file: {tokenizer}")
    return model


def cmd_generate(args) -> int:
    model = load_for_inference(args.checkpoint, args.tokenizer)
    tok = getattr(model, "tokenizer", None)
    prompt = args.prompt
    if tok is None:
        try:
            prompt = [int(t) for t in prompt.split()]
        except ValueError:
            raise ValueError(f"{args.checkpoint}: no {TOKENIZER_FILE} beside it; give --tokenizer "
                             "or a prompt of token ids") from None
    if args.draft and args.draft_lookup:
        raise ValueError("give --draft or --draft-lookup, not both")
    draft = load_for_inference(args.draft) if args.draft else None
    from .generate import generate
    stream = generate(model, prompt, args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                      device=args.device, draft=draft, draft_k=args.draft_k,
                      draft_lookup=args.draft_lookup or 0)
    if tok is None:
        print(" ".join(str(t) for t in stream))
    elif not args.stream:
        print(args.prompt + tok.decode(list(stream)))
    else:
        _print_streaming(args.prompt, tok, stream)
    if draft is not None or args.draft_lookup:
        s = model._last_infer.stats()
        print(f"speculative: {s['accepted_tokens']} of {s['draft_tokens']} proposed tokens accepted "
              f"({s['acceptance_rate']:.1%}), {s['mean_accepted_length']:.2f} per verification",
              file=sys.stderr)
    return 0


def _print_streaming(prompt, tok, stream):
    sys.stdout.write(prompt)
    sys.stdout.flush()
    out, shown = [], ""
    for t in stream:                  # decode the whole tail: a character may span tokens
        out.append(t)
        text = tok.decode(out, errors="replace")
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tok.decode(out, errors="replace")[len(shown):] + "\n")


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="encode text files into a token file, or SFT JSONL into "
                                       "a sample file",
                       description="Encode text files with a tokenizer into a token file, or "
                                   "with --sft chat/prompt-completion JSONL into a bin2d sample "
                                   "file with loss masks (see docs/formats.md, docs/sft.md).")
    p.add_argument("files", nargs="*", help="UTF-8 text files")
    p.add_argument("--tokenizer", required=True, help="tokenizer file (smedjan tokenizer train)")
    p.add_argument("-o", "--output", required=True, help="token or sample file to write")
    p.add_argument("--dtype", choices=["auto", "uint16", "uint32"], default="auto")
    p.add_argument("--no-eot", action="store_true", help="no end-of-text token between files")
    from .data import CHAT_TEMPLATES, ON_LONG
    sft = p.add_argument_group("SFT (--sft)")
    sft.add_argument("--sft", metavar="JSONL", help="SFT examples: {\"messages\": [...]}, "
                     "{\"prompt\", \"completion\"} or {\"prompt\", \"response\"} per line")
    sft.add_argument("--seq-len", type=positive_int,
                     help="training sequence length T; rows hold T+1 tokens")
    sft.add_argument("--chat-template", choices=CHAT_TEMPLATES, default="auto",
                     help="auto: chatml when the tokenizer has <|im_start|> and <|im_end|>, else plain")
    sft.add_argument("--skip-bad-lines", action="store_true",
                     help="skip (and count) malformed lines instead of stopping at the first")
    sft.add_argument("--on-long", choices=ON_LONG, default="truncate",
                     help="examples longer than T+1 tokens: cut them, or leave them out")
    p.set_defaults(func=cmd_prepare)

    c = sub.add_parser("convert-tokens", help="a nanoGPT or llm.c token file as a smedjan one",
                       description="Convert nanoGPT's train.bin/val.bin (raw uint16) or llm.c's "
                                   ".bin token files (with their header) into a token file.")
    c.add_argument("source")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--format", choices=["auto", "nanogpt", "llmc"], default="auto",
                   help="auto: llm.c when its magic is there, else nanoGPT")
    c.set_defaults(func=cmd_convert_tokens)

    t = sub.add_parser("train", help="train a model on a token file or bin2d sample file",
                       description="Train a model; checkpoints (latest, best, final) and "
                                   "metrics.jsonl go to --checkpoint-dir.")
    t.add_argument("--config", help="TOML file of these options (keys are the flag names); "
                                    "flags on the command line override it")
    t.add_argument("--data", required=True, help="token file or bin2d sample file (smedjan prepare)")
    t.add_argument("--tokenizer", help="tokenizer file; sets the vocabulary size and is copied "
                                       "beside the checkpoints")
    t.add_argument("--vocab-size", type=positive_int, default=8192)
    t.add_argument("--size", default="small", help="preset name or 'custom'")
    t.add_argument("--dim", type=positive_int)
    t.add_argument("--layers", type=positive_int)
    t.add_argument("--heads", type=positive_int)
    t.add_argument("--kv-heads", type=positive_int, help="grouped-query attention: KV heads")
    t.add_argument("--ffn-mult", type=positive_float, default=2.67)
    add_architecture_args(t)
    t.add_argument("--batch-size", type=positive_int, default=8)
    t.add_argument("--seq-len", type=positive_int,
                   help="tokens per row (default 256; a bin2d file: its stride - 1)")
    t.add_argument("--steps", type=positive_int,
                   help=f"steps of the learning-rate schedule (default {DEFAULT_STEPS}; with "
                        "--resume the checkpoint's, and a larger one re-fits the schedule)")
    t.add_argument("--max-steps", type=nonneg_int, help="stop after this many steps in this run")
    t.add_argument("--min-lr", type=nonneg_float, default=None, help="default lr/10")
    t.add_argument("--warmup", type=nonneg_int, default=None,
                   help="linear warm-up steps (default 50, at most --steps)")
    t.add_argument("--clip", type=nonneg_float, default=1.0,
                   help="global gradient-norm clip (0: off)")
    t.add_argument("--seed", type=nonneg_int, default=0)
    t.add_argument("--val-fraction", type=fraction, default=0.05)
    t.add_argument("--eval-every", type=positive_int, default=100)
    t.add_argument("--eval-batches", type=positive_int, default=10)
    t.add_argument("--checkpoint-dir")
    t.add_argument("--checkpoint-every", type=nonneg_int, default=100,
                   help="steps between checkpoints (0: only at the end)")
    t.add_argument("--resume", action="store_true", help="continue from checkpoint-dir/latest")
    add_sample_flags(t)
    add_optimizer_flags(t)
    add_lever_flags(t)
    add_guard_flags(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--tokenizer", help=f"default: {TOKENIZER_FILE} beside the checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=nonneg_int, default=100)
    g.add_argument("--temperature", type=nonneg_float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=nonneg_int, help="0: off")
    g.add_argument("--top-p", type=probability)
    g.add_argument("--seed", type=nonneg_int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="run on the CPU engine or the GPU engine (bf16)")
    g.add_argument("--draft", metavar="CHECKPOINT",
                   help="speculative decoding: a smaller model with the same tokenizer proposes "
                        "tokens the checkpoint verifies in one forward (same output, faster)")
    g.add_argument("--draft-k", type=positive_int, default=4, metavar="K",
                   help="tokens proposed per verification (default 4)")
    g.add_argument("--draft-lookup", type=positive_int, metavar="N",
                   help="speculative decoding by prompt lookup: propose what followed the last "
                        "earlier occurrence of the context's final N..1 tokens")
    g.set_defaults(func=cmd_generate)
