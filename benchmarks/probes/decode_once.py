"""A few GPU decode steps on small GQA models (one with every architecture
option, sliding windows shorter than the prompt), both modes and both step
paths (persistent kernel, one kernel per phase), for compute-sanitizer:
benchmarks/gpu_check.sh (stage sanitize) runs it under memcheck."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import smedjan  # noqa: E402
from smedjan.config import Config  # noqa: E402
from smedjan.infer import from_model  # noqa: E402

for c in (Config.custom(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=256),
          Config.custom(dim=100, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=200, max_seq_len=256),
          Config.custom(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=256,
                        window=[6, 0, 6], qk_norm=["weighted", "plain", "none"], ffn=["relu2", "swiglu"],
                        paired_heads=True, value_mix=0.25, embed_skip=0.2, tied_head=False)):
    model = smedjan.Model(c, seed=0)
    for mode in ("bf16", "fp32"):
        m = from_model(model, mode, max_ctx=200, device="cuda")
        for persistent in (True, False):
            m.set_options(persistent=persistent)
            m.reset()
            t = int(np.argmax(m.prefill(np.arange(1, 40, dtype=np.int32))))
            for _ in range(3):
                t = m.decode_greedy(t)
            m.greedy(t, 4)
            assert np.isfinite(m.last_logits()).all()
print("decode_once: ok")
