"""Bad input gets a clear Python exception, never a crash."""
import numpy as np
import pytest

import smedjan


@pytest.fixture(scope="module")
def model():
    return smedjan.Model(smedjan.Config.custom(32, 1, 2, vocab_size=50, max_seq_len=16))


def test_token_id_out_of_vocab(model):
    x = np.zeros((2, 8), np.int32)
    x[1, 5] = 50
    with pytest.raises(ValueError, match=r"tokens\[1, 5\] = 50 is out of range for vocab_size 50"):
        model.forward(x)


def test_negative_token_and_bad_target(model):
    x = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(x - 1)
    y = x.copy()
    y[0, 2] = 77
    with pytest.raises(ValueError, match=r"targets\[0, 2\] = 77"):
        model.loss(x, y)


def test_wrong_dtype(model):
    with pytest.raises(TypeError, match="tokens: expected an integer array"):
        model.forward(np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match="targets"):
        model.loss(np.zeros((1, 4), np.int32), np.zeros((1, 4), np.float64))


def test_wrong_shape(model):
    with pytest.raises(ValueError, match=r"expected shape \(batch, seq\)"):
        model.forward(np.zeros((1, 2, 3), np.int32))
    with pytest.raises(ValueError, match="targets must have the dtype and shape of tokens"):
        model.loss(np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match="batch and sequence must be >= 1"):
        model.forward(np.zeros((1, 0), np.int32))


def test_sequence_longer_than_max_seq_len(model):
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_seq_len 16"):
        model.forward(np.zeros((1, 17), np.int32))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match=r"n_heads \(3\) must divide dim \(32\)"):
        smedjan.Config.custom(32, 1, 3)


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must divide n_heads \(4\)"):
        smedjan.Config.custom(32, 1, 4, n_kv_heads=3)


@pytest.mark.parametrize("field,value,message", [
    ("dim", 0, "dim must be"), ("n_layers", -1, "n_layers must be"),
    ("vocab_size", 0, "vocab_size must be"), ("norm_eps", 0.0, "norm_eps must be positive"),
    ("max_seq_len", 0, "max_seq_len must be"), ("ffn_dim", 0, "ffn_dim must be"),
])
def test_config_fields_are_checked(field, value, message):
    base = smedjan.Config.custom(32, 1, 2).to_dict()
    base[field] = value
    with pytest.raises(ValueError, match=message):
        smedjan.Config(**base)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown size 'giant'"):
        smedjan.Model("giant")


def test_trainer_arguments_are_checked(model):
    with pytest.raises(ValueError, match="min_lr must be in"):
        smedjan.Trainer(model, lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        smedjan.Trainer(model, steps=0)


# ---- Trainer: numbers out of range are refused by name --------------------------

def test_trainer_refuses_negative_clip(model):
    msg = r"clip must be a finite number >= 0 \(0: no clipping\), got -1"
    with pytest.raises(ValueError, match=msg):
        smedjan.Trainer(model, clip=-1)


@pytest.mark.parametrize("kw,message", [
    (dict(clip=float("nan")), "clip must be"), (dict(clip=float("inf")), "clip must be"),
    (dict(lr=-1e-3), "lr must be"), (dict(lr=float("nan")), "lr must be"),
    (dict(lr=float("inf")), "lr must be"), (dict(min_lr=float("nan")), "min_lr must be"),
    (dict(warmup=11, steps=10), r"warmup \(11\) must be <= steps \(10\)"),
    (dict(warmup=-1), "warmup must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be"),
    (dict(weight_decay=float("nan")), "weight_decay must be"),
    (dict(weight_decay=float("inf")), "weight_decay must be"),
    (dict(eps=float("inf")), "eps must be"), (dict(eps=0.0), "eps must be"),
    (dict(betas=(float("nan"), 0.95)), "betas must be"), (dict(grad_accum=0), "grad_accum must be"),
    (dict(grad_accum=-2), "grad_accum must be"),
])
def test_trainer_refuses_out_of_range_numbers_by_name(model, kw, message):
    with pytest.raises(ValueError, match=message):
        smedjan.Trainer(model, **kw)


def test_trainer_clip_zero_or_none_turns_clipping_off():
    x = np.random.default_rng(0).integers(0, 50, (2, 9)).astype(np.int32)
    out = {}
    for clip in (0.0, None, 1e-6):
        m = smedjan.Model(smedjan.Config.custom(32, 1, 2, vocab_size=50, max_seq_len=16), seed=1)
        tr = smedjan.Trainer(m, lr=1e-2, steps=5, clip=clip)
        tr.step(x[:, :-1], x[:, 1:])
        out[clip] = m.params["tok_emb"].copy()
    np.testing.assert_array_equal(out[0.0], out[None])
    assert not np.array_equal(out[0.0], out[1e-6])      # a real clip changes the update


@pytest.mark.parametrize("kw,message", [
    (dict(eval_every=0), "eval_every must be an integer >= 1"),
    (dict(eval_batches=0), "eval_batches must be an integer >= 1"),
    (dict(checkpoint_every=-1), "checkpoint_every must be an integer >= 0"),
    (dict(max_steps=-1), "max_steps must be an integer >= 0"),
])
def test_fit_refuses_out_of_range_loop_arguments_by_name(model, kw, message):
    tr = smedjan.Trainer(model, steps=2)
    with pytest.raises(ValueError, match=message):
        tr.fit(iter(()), None, progress=False, **kw)


# ---- SFT JSONL: bad bytes and bad lines name the file and the line ---------------

def _byte_encode(text):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)


def test_sft_jsonl_invalid_utf8_names_file_line_and_column(tmp_path):
    from smedjan.data import load_sft_jsonl
    j = tmp_path / "sft.jsonl"
    j.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    msg = r"sft\.jsonl:2: invalid UTF-8 \(byte 0xe9 at column 16"
    with pytest.raises(ValueError, match=msg) as e:
        load_sft_jsonl(j, _byte_encode, 8)
    assert not isinstance(e.value, UnicodeError)      # ours, not a bare codec error


def test_sft_jsonl_lone_surrogate_names_file_and_line(tmp_path):
    from smedjan.data import load_sft_jsonl
    j = tmp_path / "sft.jsonl"
    j.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "x\\ud800", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"sft\.jsonl:2: text is not valid Unicode") as e:
        load_sft_jsonl(j, _byte_encode, 8)
    assert not isinstance(e.value, UnicodeError)


@pytest.mark.parametrize("line,message", [
    (b'{"prompt": oops}', r"sft\.jsonl:2: invalid JSON \(Expecting value at column 12\)"),
    (b'[1, 2]', r"sft\.jsonl:2: expected a JSON object, got list"),
    (b'{"prompt": "a"}', r"sft\.jsonl:2: expected \{'prompt', 'response'\}"),
    (b'{"prompt": 1, "response": "b"}', r"sft\.jsonl:2: 'prompt' and 'response' must be strings"),
])
def test_sft_jsonl_bad_lines_name_file_line_and_reason(tmp_path, line, message):
    from smedjan.data import load_sft_jsonl
    j = tmp_path / "sft.jsonl"
    j.write_bytes(b'{"prompt": "a", "response": "b"}\n' + line + b"\n")
    with pytest.raises(ValueError, match=message):
        load_sft_jsonl(j, _byte_encode, 8)


def test_sft_jsonl_accepts_a_byte_order_mark(tmp_path):
    from smedjan.data import load_sft_jsonl
    j = tmp_path / "sft.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "bc"}\r\n')
    x, y = load_sft_jsonl(j, _byte_encode, 16)
    assert x.shape == (1, 16) and (y != -1).sum() == 3      # "bc\n" trained


# ---- generation arguments -------------------------------------------------------

GEN_BAD = [
    (dict(max_new_tokens=-1), r"max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer"),
    (dict(temperature=-0.5), r"temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(top_k=-1), r"top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in"),
    (dict(top_p=float("nan")), r"top_p must be in"),
]


@pytest.mark.parametrize("kw,message", GEN_BAD)
def test_generate_refuses_out_of_range_arguments_at_the_call(model, kw, message):
    from smedjan.generate import generate, generate_recompute
    from smedjan.infer import from_model
    args = dict(max_new_tokens=3)
    args.update(kw)
    n = args.pop("max_new_tokens")
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2], n, **args)              # raised at the call, not at next()
    with pytest.raises(ValueError, match=message):
        model.generate([1, 2], n, **args)
    with pytest.raises(ValueError, match=message):
        from_model(model).generate([1, 2], n, **args)
    with pytest.raises(ValueError, match=message):
        next(generate_recompute(model, [1, 2], n, **args))


def test_generate_refuses_negative_max_new_tokens(model):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        model.generate([1, 2], -1)
    assert list(model.generate([1, 2], 0)) == []


def test_generate_refuses_nan_repetition_penalty(model):
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number > 0"):
        model.generate([1, 2], 3, repetition_penalty=float("nan"))


# ---- a checkpoint and a tokenizer of different vocabulary sizes -------------------

@pytest.fixture(scope="module")
def tok_and_models(tmp_path_factory):
    """A tokenizer file and checkpoints whose vocab is smaller / larger than it."""
    from conftest import stdlib_text
    from smedjan.checkpoint import save_weights
    d = tmp_path_factory.mktemp("vocab")
    tok = smedjan.Tokenizer.train([stdlib_text(100_000).decode("utf-8", "replace")],
                                  vocab_size=320, special_tokens=[])
    tok.save(d / "tok.sjt")
    paths = {}
    for name, v in (("small", len(tok) - 20), ("large", len(tok) + 200)):
        m = smedjan.Model(smedjan.Config.custom(32, 1, 2, vocab_size=v, max_seq_len=64), seed=0)
        emb = m.params["tok_emb"]
        emb[len(tok):] *= 4          # the ids past the tokenizer: the likeliest outputs
        paths[name] = str(d / f"{name}.safetensors")
        save_weights(paths[name], m)
    return tok, str(d / "tok.sjt"), paths


def test_checkpoint_smaller_than_tokenizer_is_refused_naming_both(tok_and_models):
    from smedjan.commands import load_for_inference
    tok, tok_path, paths = tok_and_models
    n = len(tok)
    with pytest.raises(ValueError) as e:
        load_for_inference(paths["small"], tok_path)
    msg = str(e.value)
    assert tok_path in msg and paths["small"] in msg, msg
    assert f"{n} tokens" in msg and f"vocab_size {n - 20}" in msg, msg


def test_cli_generate_refuses_a_tokenizer_larger_than_the_checkpoint(tok_and_models, capsys):
    from smedjan.cli import main
    tok, tok_path, paths = tok_and_models
    rc = main(["generate", "--checkpoint", paths["small"], "--tokenizer", tok_path,
               "--prompt", "def ", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert rc == 1 and tok_path in err and paths["small"] in err and "vocab_size" in err, err


def test_python_generate_refuses_a_tokenizer_larger_than_the_model(tok_and_models):
    from smedjan.generate import generate
    from smedjan.checkpoint import model_from_checkpoint
    from smedjan.infer import from_model
    tok, _, paths = tok_and_models
    m = model_from_checkpoint(paths["small"])
    msg = rf"tokenizer has {len(tok)} tokens but the model has vocab_size {len(tok) - 20}"
    with pytest.raises(ValueError, match=msg):
        generate(m, "def ", 3, tokenizer=tok)
    im = from_model(m)
    im.tokenizer = tok
    with pytest.raises(ValueError, match=msg):
        im.generate("def ", 3)


def test_checkpoint_larger_than_tokenizer_generates_only_decodable_ids(tok_and_models, capsys):
    """A model vocab past the tokenizer's is accepted; sampling never picks
    an id the tokenizer cannot decode (those would be most of the picks
    here), so decoding never fails."""
    from smedjan.cli import main
    from smedjan.commands import load_for_inference
    from smedjan.generate import generate, generate_recompute
    tok, tok_path, paths = tok_and_models
    m = load_for_inference(paths["large"], tok_path)
    assert m.config.vocab_size == len(tok) + 200
    for temperature in (0, 2.0):
        ids = list(generate(m, "def ", 40, temperature=temperature, seed=0))
        assert len(ids) == 40 and max(ids) < len(tok), ids
        ids = list(generate_recompute(m, "def ", 10, temperature=temperature, seed=0))
        assert len(ids) == 10 and max(ids) < len(tok), ids
    # without the tokenizer every id is fair (these weights favour the upper ones)
    m.tokenizer = None
    free = list(generate(m, tok.encode("def ").tolist(), 40, temperature=2.0, seed=0))
    assert max(free) >= len(tok), free
    rc = main(["generate", "--checkpoint", paths["large"], "--tokenizer", tok_path, "--prompt",
               "def ", "--max-new-tokens", "30", "--temperature", "2", "--seed", "0", "--stream"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.startswith("def "), out.err


# ---- the command line: a bad number names its flag -------------------------------

def _cli_error(argv, capsys):
    from smedjan.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    return err


TRAIN = ["train", "--data", "d.tok"]
GEN = ["generate", "--checkpoint", "c.safetensors", "--prompt", "x"]
BAD_FLAGS = [
    (TRAIN, "--memory-limit", "abc"), (TRAIN, "--memory-limit", "-1GiB"),
    (TRAIN, "--memory-limit", "nan"), (TRAIN, "--memory-limit", "inf"),
    (TRAIN, "--batch-size", "0"), (TRAIN, "--seq-len", "-3"), (TRAIN, "--steps", "0"),
    (TRAIN, "--grad-accum", "0"), (TRAIN, "--lr", "-1e-3"), (TRAIN, "--lr", "nan"),
    (TRAIN, "--min-lr", "-1"), (TRAIN, "--warmup", "-1"), (TRAIN, "--weight-decay", "-0.1"),
    (TRAIN, "--clip", "-1"), (TRAIN, "--clip", "inf"), (TRAIN, "--val-fraction", "1"),
    (TRAIN, "--eval-every", "0"), (TRAIN, "--eval-batches", "0"),
    (TRAIN, "--checkpoint-every", "-1"), (TRAIN, "--max-steps", "-1"), (TRAIN, "--dim", "0"),
    (TRAIN, "--layers", "0"), (TRAIN, "--heads", "0"), (TRAIN, "--kv-heads", "0"),
    (TRAIN, "--ffn-mult", "0"), (TRAIN, "--vocab-size", "0"), (TRAIN, "--seed", "-1"),
    (GEN, "--max-new-tokens", "-1"), (GEN, "--temperature", "-0.5"), (GEN, "--temperature", "nan"),
    (GEN, "--top-k", "-1"), (GEN, "--top-p", "0"), (GEN, "--top-p", "1.5"), (GEN, "--seed", "x"),
    (["bench"], "--batch-size", "0"), (["bench"], "--seq-len", "0"), (["bench"], "--iters", "0"),
    (["bench"], "--warmup", "-1"), (["bench"], "--decode-tokens", "0"),
    (["bench"], "--threads", "0"), (["bench"], "--grad-accum", "0"),
    (["bench"], "--vocab-size", "0"),
    (["sweep"], "--batch-size", "2,x"), (["sweep"], "--batch-size", "0"),
    (["sweep"], "--grad-accum", "1,0"), (["sweep"], "--seq-len", "abc"),
    (["sweep"], "--fused-ce", "maybe"), (["sweep"], "--grid", "{oops"),
    (["sweep"], "--grid", "[1]"),
    (["sweep"], "--memory-limit", "lots"), (["sweep"], "--steps", "0"),
    (["sweep"], "--warmup-steps", "-1"), (["sweep"], "--threads", "0"),
    (["sweep"], "--timeout", "0"),
    (["demo"], "--minutes", "-1"), (["demo"], "--steps", "0"),
    (["sizes"], "--vocab-size", "0"),
    (["tokenizer", "train", "f.txt", "-o", "t.sjt"], "--vocab-size", "-5"),
    (["tokenizer", "train", "f.txt", "-o", "t.sjt"], "--min-frequency", "-1"),
]


@pytest.mark.parametrize("argv,flag,value", BAD_FLAGS,
                         ids=lambda a: a if isinstance(a, str) else None)
def test_cli_bad_number_names_its_flag(argv, flag, value, capsys):
    err = _cli_error(argv + [f"{flag}={value}"], capsys)
    assert f"argument {flag}" in err and value in err, err


def test_cli_memory_limit_abc_names_the_flag(capsys):
    err = _cli_error(TRAIN + ["--memory-limit", "abc"], capsys)
    assert "argument --memory-limit: expected a size such as 12GiB" in err and "'abc'" in err, err


def test_cli_generate_refuses_negative_max_new_tokens(capsys):
    err = _cli_error(GEN + ["--max-new-tokens", "-1"], capsys)
    assert "argument --max-new-tokens: expected an integer >= 0, got '-1'" in err, err


def test_cli_tokenizer_decode_bad_id_names_the_argument(capsys):
    err = _cli_error(["tokenizer", "decode", "t.sjt", "12", "x"], capsys)
    assert "argument ids" in err and "'x'" in err, err


def test_cli_every_typed_flag_names_itself_on_garbage(capsys):
    """Walk every subcommand's flags that convert their value: 'garbage'
    gives argparse's usage error naming the flag, never a traceback."""
    import argparse
    from smedjan.cli import build_parser

    def walk(parser, prefix):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from walk(sub, prefix + [name])
            elif a.type is not None and a.option_strings:
                yield prefix, a
    seen = 0
    for prefix, a in walk(build_parser(), []):
        flag = a.option_strings[-1]
        err = _cli_error(prefix + [f"{flag}=garbage"], capsys)
        assert f"argument {'/'.join(a.option_strings)}" in err or f"argument {flag}" in err, err
        seen += 1
    assert seen >= 50, seen


def _train_argv(tmp_path, *more):
    from smedjan.data import write_tokens
    path = str(tmp_path / "d.tok")
    write_tokens(path, [np.random.default_rng(0).integers(0, 50, 5_000)], dtype="uint16")
    return ["train", "--data", path, "--vocab-size", "50", "--size", "custom", "--dim", "32",
            "--layers", "1", "--heads", "2", "--batch-size", "2", "--seq-len", "16",
            "--val-fraction", "0", *more]


def test_cli_train_refuses_warmup_longer_than_steps(tmp_path, capsys):
    from smedjan.cli import main
    rc = main(_train_argv(tmp_path, "--steps", "10", "--warmup", "11"))
    err = capsys.readouterr().err
    assert rc == 1 and "--warmup 11 exceeds --steps 10" in err, err


def test_cli_train_default_warmup_fits_a_short_run(tmp_path, capsys):
    from smedjan.cli import main
    rc = main(_train_argv(tmp_path, "--steps", "3"))      # the default warm-up is 50
    out = capsys.readouterr()
    assert rc == 0 and "step 3: loss" in out.out, out.err
