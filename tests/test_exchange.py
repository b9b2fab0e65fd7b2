"""`smedjan export hf|gguf` and `smedjan import hf`: a checkpoint goes out
to transformers and llama.cpp's format with its tokenizer, and comes back."""
import subprocess
import sys

import numpy as np
import pytest

import smedjan
from smedjan import checkpoint as ck
from smedjan.commands import prepare
from conftest import stdlib_text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "def main(argv):\n    "


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "smedjan", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained by the CLI, its tokenizer beside the checkpoint."""
    d = tmp_path_factory.mktemp("run")
    (d / "text.txt").write_bytes(stdlib_text(300_000))
    tok = smedjan.Tokenizer.train(files=[str(d / "text.txt")], vocab_size=600,
                                  special_tokens=["<|endoftext|>"])
    tok.save(d / "tok.sjt")
    prepare([str(d / "text.txt")], tok, str(d / "data.tok"), progress=False)
    cli("train", "--size", "custom", "--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads",
        "2", "--batch-size", "4", "--seq-len", "64", "--steps", "30", "--lr", "3e-3",
        "--data", str(d / "data.tok"), "--tokenizer", str(d / "tok.sjt"),
        "--checkpoint-dir", str(d / "ck"))
    return dict(dir=d, tok=tok, latest=str(d / "ck" / "latest.safetensors"))


def greedy(checkpoint):
    return cli("generate", "--checkpoint", checkpoint, "--prompt", PROMPT, "--temperature", "0",
               "--max-new-tokens", "12")


def test_export_hf_loads_in_transformers_with_its_tokenizer(run, tmp_path):
    out = tmp_path / "hf"
    cli("export", "hf", str(out), "--checkpoint", run["latest"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = stdlib_text(4000).decode()
    assert hf_tok.encode(text) == run["tok"].encode(text).tolist()
    assert hf_tok.eos_token == "<|endoftext|>"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = run["tok"].encode(PROMPT).astype(np.int32)[None]
    with torch.no_grad():
        want = hf(torch.from_numpy(ids).long()).logits.numpy()
    model = ck.model_from_checkpoint(run["latest"])
    np.testing.assert_allclose(model(ids), want, rtol=1e-4, atol=1e-4)
    pipe = transformers.pipeline("text-generation", model=str(out), tokenizer=str(out))
    got = pipe(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert got.startswith(PROMPT) and len(got) > len(PROMPT)


def test_import_hf_round_trips_weights_and_tokenizer(run, tmp_path):
    cli("export", "hf", str(tmp_path / "hf"), "--checkpoint", run["latest"])
    back = tmp_path / "back" / "imported.safetensors"
    cli("import", "hf", str(tmp_path / "hf"), "-o", str(back))
    a, b = ck.load_checkpoint(run["latest"]), ck.load_checkpoint(back)
    for name in ck.model_from_checkpoint(back).params:
        np.testing.assert_array_equal(a.tensors[name], b.tensors[name], err_msg=name)
    assert smedjan.Tokenizer.load(back.parent / "tokenizer.sjt").encode(PROMPT).tolist() == \
        run["tok"].encode(PROMPT).tolist()
    assert greedy(str(back)) == greedy(run["latest"])


def test_export_gguf_generates_in_the_gguf_engine(run, tmp_path):
    from smedjan.infer import load_gguf
    out = tmp_path / "m.gguf"
    cli("export", "gguf", str(out), "--type", "f32", "--checkpoint", run["latest"])
    m = load_gguf(out, mode="fp32")
    ids = run["tok"].encode(PROMPT).astype(np.int32)
    want = ck.model_from_checkpoint(run["latest"])(ids)[-1]
    np.testing.assert_allclose(m.forward(ids)[-1], want, rtol=1e-4, atol=1e-4)
    assert m.tokenizer.encode(PROMPT).tolist() == ids.tolist()


def test_export_names_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "smedjan", "export", "hf", str(tmp_path / "x"),
                        "--checkpoint", str(tmp_path / "nope.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "nope.safetensors" in r.stderr
    assert not (tmp_path / "x").exists()
