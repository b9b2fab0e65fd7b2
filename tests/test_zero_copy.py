"""Parameters and gradients are views into the engine's own buffers; token
arrays go in without a copy; the GIL is released and Ctrl-C stops a call."""
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import smedjan
from smedjan.model import as_tokens


def tiny():
    return smedjan.Model(smedjan.Config.custom(32, 1, 2, vocab_size=40, max_seq_len=32), seed=1)


def test_a_write_through_a_view_is_seen_by_the_engine():
    m = tiny()
    x = np.arange(8, dtype=np.int32)[None] % 40
    before = m.forward(x)
    m.params["final_norm"][:] = 0.0          # zero gain -> all logits exactly zero
    assert before.any() and not m.forward(x).any()
    m.params["final_norm"][:] = 1.0
    np.testing.assert_array_equal(m.forward(x), before)


def test_named_views_share_the_flat_buffer():
    m = tiny()
    for name, v in m.params.items():
        assert np.shares_memory(v, m.flat_params), name
        assert v.base is not None
    assert sum(v.size for v in m.params.values()) == m.n_params == m.config.n_params


def test_a_view_keeps_its_owner_alive():
    m = tiny()
    w = m.params["layers.0.wq"]
    expect = w.copy()
    del m
    gc.collect()
    _ = [np.ones(10000) for _ in range(100)]   # churn the allocator
    np.testing.assert_array_equal(w, expect)


def test_views_are_counted_by_the_owner():
    m = tiny()
    h = m._h
    n = h.exports()
    extra = np.frombuffer(h.params(), np.float32)
    assert h.exports() == n + 1
    del extra
    gc.collect()
    assert h.exports() == n


def test_grads_views_see_backward():
    m = tiny()
    x = np.random.default_rng(0).integers(0, 40, (2, 8)).astype(np.int32)
    m.loss(x, x, backward=True)
    assert np.abs(m.grads["tok_emb"]).sum() > 0


def test_tokens_go_in_without_a_copy():
    x = np.zeros((2, 8), np.int32)
    assert as_tokens(x) is x
    u = np.zeros((2, 8), np.uint16)
    assert as_tokens(u) is u


def test_the_gil_is_released_during_engine_calls():
    m = smedjan.Model(smedjan.Config.custom(64, 2, 4, vocab_size=500, max_seq_len=256))
    x = np.random.default_rng(0).integers(0, 500, (8, 256)).astype(np.int32)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    t0 = time.perf_counter()
    for _ in range(3):
        m.loss(x, x, backward=True)
    elapsed = time.perf_counter() - t0
    stop.set()
    t.join()
    # With the GIL held the ticker would be frozen for the whole call.
    assert elapsed > 0.05 and len(ticks) > 10, (elapsed, len(ticks))


def test_ctrl_c_interrupts_a_long_call_cleanly():
    code = r"""
import numpy as np, smedjan, sys, time
m = smedjan.Model(smedjan.Config.custom(256, 8, 4, vocab_size=2000, max_seq_len=2048))
x = np.zeros((4, 2048), np.int32)
print("ready", flush=True)
t = time.time()
try:
    for _ in range(100):
        m.loss(x, x, backward=True)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted after %.1fs" % (time.time() - t), flush=True)
    print("still usable", m.forward(x[:, :4]).shape, flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert "interrupted after" in out and "still usable (4, 4, 2000)" in out, out
    assert p.returncode == 0
