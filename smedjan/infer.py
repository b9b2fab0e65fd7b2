"""Inference: a KV-cache engine beside the training model (csrc/infer/).

Load a Llama-family model from GGUF (any of F32/F16/BF16/Q8_0/Q4_0/Q4_1
tensors) or take one from a smedjan Model, choosing the in-memory weight
form at load time whatever the file stores: "fp32" (the token-exact
reference), "bf16", "q8" (GGML Q8_0 blocks) or "q4" (Q4_0 / Q4_1 blocks;
the embedding / tied head stays Q8_0, as llama.cpp's Q4 files keep it).
The prompt runs as one batched forward (prefill), then one token per step.

device="cuda" runs the same handle on a GPU (modes "bf16", the default
there, and "fp32" for parity; quantised files are dequantised at load):
weights and KV cache on the device, the decode step one persistent kernel
(docs/inference.md, "GPU"). Greedy choices are made where the model runs;
sampling with temperature reads the logits on the host.

>>> # m = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", mode="q8")
>>> # for t in m.generate("The capital of France is", 16, temperature=0): ...
>>> # m.stats()  -> prefill/generation tok/s, ttft, resident weight MB
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from . import _C

MODES = ("fp32", "bf16", "q8", "q4")


class _Cfg:
    def __init__(self, d):
        self.__dict__.update(d)
        self.head_dim = self.dim // self.n_heads


def _device(device: str) -> str:
    """"cpu" or "cuda" ("cuda:0" is "cuda": the GPU engine runs on the first GPU)."""
    d = str(device)
    if d.startswith("cuda:"):
        if d != "cuda:0":
            raise ValueError(f"device {d!r}: the GPU inference engine runs on the first GPU (cuda)")
        return "cuda"
    if d not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {d!r}")
    return d


def _default_mode(mode: Optional[str], device: str, cpu_default: str) -> str:
    return mode if mode is not None else ("bf16" if device == "cuda" else cpu_default)


class InferenceModel:
    """A model in the inference engine, with its tokenizer when it has one.

    forward(tokens) gives every position's logits (a fresh cache);
    prefill/decode drive the cache by hand; generate streams token ids."""

    def __init__(self, handle, tokenizer=None, source: str = ""):
        self._h = handle
        self.tokenizer = tokenizer
        self.source = source
        self.config = _Cfg(handle.info())
        self._stats = {}
        self._logits = np.empty(self.config.vocab_size, np.float32)

    # ---- construction -----------------------------------------------------------
    @classmethod
    def load_gguf(cls, path, mode: Optional[str] = None, max_ctx: int = 0, tokenizer: bool = True,
                  device: str = "cpu", kv_dtype: str = "f32") -> "InferenceModel":
        """mode: "q8" by default on the CPU, "bf16" on device="cuda"."""
        device = _device(device)
        mode = _default_mode(mode, device, "q8")
        p = os.fspath(path)
        _check_kv_dtype(kv_dtype)
        if not os.path.exists(p):
            raise FileNotFoundError(2, f"{p}: no such file", p)
        tok = None
        if tokenizer:
            from .gguf import read_gguf
            f = read_gguf(p)
            if "tokenizer.ggml.tokens" in f.kv:
                tok = f.tokenizer()
        m = cls._with_cache(_C.infer_load_gguf(p, device, mode, max_ctx), kv_dtype, tok, p)
        check_vocab(tok, m.config.vocab_size, p, f"{p}: the tokenizer")
        return m

    @classmethod
    def from_model(cls, model, mode: Optional[str] = None, max_ctx: int = 0,
                   device: str = "cpu", kv_dtype: str = "f32") -> "InferenceModel":
        """Copy (and quantise) a smedjan Model's current weights. mode: "fp32"
        by default on the CPU, "bf16" on device="cuda" (the model itself may
        be on either device, in any dtype: the f32 master weights are read)."""
        device = _device(device)
        mode = _default_mode(mode, device, "fp32")
        _check_kv_dtype(kv_dtype)
        return cls._with_cache(_C.infer_from_model(model._h, device, mode, max_ctx), kv_dtype,
                               getattr(model, "tokenizer", None))

    @classmethod
    def _with_cache(cls, h, kv_dtype, tok, source=""):
        if kv_dtype == "f16":
            h.set_kv_f16(True)      # a CPU option: on the GPU the cache is in the weights' mode
        return cls(h, tok, source)

    # ---- properties ---------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._h.info()["mode"]

    @property
    def device(self) -> str:
        return self._h.info()["device"]

    @property
    def pos(self) -> int:
        """Tokens now in the KV cache."""
        return self._h.pos()

    @property
    def kv_dtype(self) -> str:
        """The element type of the K/V cache: "f32" or "f16" on the CPU; on
        the GPU the weights' mode ("bf16" or "fp32")."""
        return self._h.info()["kv_dtype"]

    @property
    def max_ctx(self) -> int:
        return self.config.max_ctx

    def memory(self) -> dict:
        """Bytes of resident weights and of KV cache + run state (GPU memory
        on device="cuda")."""
        i = self._h.info()
        return {"weight_bytes": i["weight_bytes"], "cache_bytes": i["cache_bytes"],
                "device": i["device"]}

    # ---- compute --------------------------------------------------------------------
    def reset(self) -> None:
        self._h.reset()

    def prefill(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the cache; the last position's logits (vocab,),
        or every position's (n, vocab) with all_logits."""
        t = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        if all_logits:
            out = np.empty((t.size, self.config.vocab_size), np.float32)
            self._h.prefill(t, out)
            return out
        self._h.prefill(t)
        return self.last_logits()

    def rewind(self, pos: int) -> None:
        """Move the cache position back to pos, forgetting the later tokens.
        Refused (ValueError, naming the layer) for a model whose cache cannot
        move back: a mamba2 or linear mixer, or a sliding window shorter than
        max_ctx."""
        self._h.rewind(int(pos))

    def decode(self, token: int) -> np.ndarray:
        """One token; its logits (vocab,)."""
        self._h.decode(int(token))
        return self.last_logits()

    def last_logits(self) -> np.ndarray:
        out = np.empty(self.config.vocab_size, np.float32)
        self._h.logits(out)
        return out

    def forward(self, tokens) -> np.ndarray:
        """Logits (T, vocab) of a token sequence from an empty cache."""
        self.reset()
        return self.prefill(tokens, all_logits=True)

    def perplexity(self, tokens, window: Optional[int] = None) -> float:
        """exp(mean next-token cross-entropy) over tokens, in windows of at most
        `window` (default max_ctx) tokens each starting from an empty cache."""
        t = np.asarray(tokens, np.int32)
        w = window or self.max_ctx
        nll, n = 0.0, 0
        for s in range(0, t.size - 1, w):
            chunk = t[s:s + w + 1]
            if chunk.size < 2:
                break
            lg = self.forward(chunk[:-1]).astype(np.float64)
            m = lg.max(-1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(lg - m).sum(-1)))
            nll += float((lse - lg[np.arange(chunk.size - 1), chunk[1:]]).sum())
            n += chunk.size - 1
        return float(np.exp(nll / n))

    # ---- generation ---------------------------------------------------------------------
    def encode(self, prompt) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer: pass token ids")
            return [int(x) for x in self.tokenizer.encode(prompt, allowed_special="all")]
        return [int(x) for x in prompt]

    def generate(self, prompt: Union[str, Sequence[int]], max_new_tokens: int = 64, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop: Union[None, int, str, Sequence[Union[int, str]]] = None,
                 draft=None, draft_k: int = 4, draft_lookup: int = 0) -> Iterator[int]:
        """Stream up to max_new_tokens ids after prompt: one batched prefill,
        then one decode per token on the KV cache. temperature 0 is greedy;
        stop ids end generation (not yielded), stop strings end it once the
        decoded text ends with one. stats() describes the last run.

        Speculative decoding: draft (a smedjan Model, an InferenceModel, or
        a checkpoint / GGUF path, with this model's vocab_size) or
        draft_lookup=N (prompt lookup: the tokens that followed the last
        earlier occurrence of the context's last N..1 tokens) proposes up to
        draft_k tokens, verified in one batched forward: the output is plain
        generation's (greedy: the same tokens; sampled: the same
        distribution).

        >>> # for t in m.generate("Once upon a time", 32, temperature=0.8, seed=0): ...
        """
        check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        check_vocab(self.tokenizer, self.config.vocab_size, self.source or "the model")
        return _generate(self, self.encode(prompt), max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                         seed=seed, stop=stop, tokenizer=self.tokenizer, draft=draft,
                         draft_k=draft_k, draft_lookup=draft_lookup)

    def stats(self) -> dict:
        """Of the last generation: prompt_tokens, generated_tokens, prefill_s,
        prefill_tok_s, gen_tok_s (decode steps after the first token),
        ttft_s (start to the first token: prefill + its sampling), the
        resident weight memory in MB, and the parameters in all (params) and
        those one token's step reads (active_params: MoE layers count their
        top_k experts). After speculative generation also draft_tokens
        (proposed), accepted_tokens, acceptance_rate (accepted / proposed),
        verify_steps (the target's batched forwards over proposals) and
        mean_accepted_length (proposals accepted per verify step, the
        target's own token not counted)."""
        s = dict(self._stats)
        info = self._h.info()
        s["weight_mb"] = info["weight_bytes"] / 1e6
        s["params"], s["active_params"] = info["params"], info["active_params"]
        s["mode"] = self.mode
        s["device"] = self.device
        return s

    def decode_greedy(self, token: int) -> int:
        """One token; the greedy choice from its logits (smallest id of the
        maximum), made where the model runs: no logits leave a GPU."""
        return self._h.decode(int(token), True)

    def greedy(self, token: int, n: int) -> np.ndarray:
        """n greedy steps after token: the n chosen ids. On device="cuda"
        chained on the GPU (one graph replay): the fast path of benchmarks.

        >>> # m.prefill(prompt); ids = m.greedy(int(np.argmax(m.last_logits())), 128)
        """
        out = np.empty(int(n), np.int32)
        self._h.greedy(int(token), out)
        return out

    def set_options(self, *, graphs: Optional[bool] = None, persistent: Optional[bool] = None) -> None:
        """GPU execution choices (tests, benchmarks): CUDA graphs, and the
        persistent one-kernel step vs one kernel per phase. Same results."""
        i = self._h.info()          # a CPU handle has neither: set_options says so
        self._h.set_options(i.get("graphs", True) if graphs is None else bool(graphs),
                            i.get("persistent", True) if persistent is None else bool(persistent))

    def __repr__(self) -> str:
        c = self.config
        return (f"InferenceModel(mode='{c.mode}', device='{self.device}', dim={c.dim}, n_layers={c.n_layers}, "
                f"n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}, vocab_size={c.vocab_size}, "
                f"max_ctx={c.max_ctx})")


def _check_kv_dtype(kv_dtype):
    if kv_dtype not in ("f32", "f16"):
        raise ValueError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")


def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty=1.0) -> None:
    """Refuse, by name, generation arguments outside their range: an
    integer max_new_tokens >= 0, temperature >= 0 (0: greedy), an integer
    top_k >= 0 (0 or None: off), top_p in (0, 1] (None: off) and
    repetition_penalty > 0, every number finite. Comparisons are written so
    that NaN fails them."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise ValueError(f"repetition_penalty must be a finite number > 0, "
                         f"got {repetition_penalty}")


def check_vocab(tokenizer, vocab_size: int, model_name: str = "the model",
                tokenizer_name: str = "the tokenizer") -> None:
    """A tokenizer may have at most the model's vocab_size entries: with
    more, it produces ids the model cannot embed (and names tokens the model
    can never emit). Fewer is fine (a vocabulary padded for speed, or a
    model trained with a larger --vocab-size than its data used): generation
    then samples only among the tokenizer's ids (see _generate), so every
    generated id decodes."""
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{tokenizer_name} has {len(tokenizer)} tokens but {model_name} has "
                         f"vocab_size {vocab_size}: ids {vocab_size}..{len(tokenizer) - 1} "
                         f"would be out of the model's range (wrong tokenizer for this model?)")


def _generate(m: InferenceModel, ids, max_new_tokens, *, temperature, top_k, top_p,
              repetition_penalty, seed, stop, tokenizer, window: Optional[int] = None,
              draft=None, draft_k: int = 4, draft_lookup: int = 0):
    """The loop shared by InferenceModel.generate and smedjan.generate: a
    context longer than the cache (or `window`) slides: the cache is rebuilt
    from the last `window` tokens, as the full-recompute path would see them.
    With a tokenizer of fewer entries than the model's vocabulary, only the
    tokenizer's ids are sampled (the rest have no text to decode to).
    With a draft or draft_lookup, each step verifies proposals
    (_Speculator): the argument errors are raised here, at the call."""
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if not ids:
        raise ValueError("prompt is empty: generation needs at least one token")
    V = m.config.vocab_size
    check_vocab(tokenizer, V)
    stops = [] if stop is None else [stop] if isinstance(stop, (int, str)) else list(stop)
    stop_ids = {s for s in stops if isinstance(s, int)}
    stop_strs = [s for s in stops if isinstance(s, str)]
    if stop_strs and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    spec = None
    if draft is not None or draft_lookup:
        spec = _Speculator(m, draft, draft_k, draft_lookup)
    return _stream(m, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                   stop_ids, stop_strs, tokenizer, window, spec)


def _stream(m, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
            stop_ids, stop_strs, tokenizer, window, spec):
    V = m.config.vocab_size
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    n_emit = V if tokenizer is None else len(tokenizer)
    sampler = _C.Sampler(n_emit, int(seed) & ((1 << 64) - 1))
    W = min(window or m.max_ctx, m.max_ctx)
    h = m._h
    temp, k, p = float(temperature), int(top_k or 0), float(top_p if top_p is not None else 1.0)
    pen = float(repetition_penalty)
    hist = np.array(ids, np.int32)
    # greedy without a penalty: the step itself returns the argmax (on the GPU
    # chosen on the device, so no logits cross to the host)
    on_device = temp <= 0 and pen == 1.0 and n_emit == V
    if n_emit < V:
        logits = np.empty(V, np.float32)

        def pick():
            h.logits(logits)
            return sampler.sample(logits[:n_emit], temp, k, p, pen, hist if pen != 1.0 else None)
    else:
        def pick():
            return h.sample(sampler, temp, k, p, pen, hist if pen != 1.0 else None)
    stats = m._stats = {"prompt_tokens": len(ids), "generated_tokens": 0}
    if spec is not None:
        spec.start(stats, sampler, n_emit, (temp, k, p, pen))
    t0 = time.perf_counter()

    def run():
        h.reset()
        ctx = hist[-W:]
        tp = time.perf_counter()
        h.prefill(np.ascontiguousarray(ctx))
        return time.perf_counter() - tp

    def step(tok):
        """The next chosen tokens after tok (the last one chosen, not yet in
        the cache): one, or with speculation the accepted proposals and the
        target's own."""
        if h.pos() >= W:
            run()
            return [pick()]
        if spec is not None:
            return spec.step(hist, tok, W - h.pos() - 1)
        if on_device:
            return [h.decode(tok, True)]
        h.decode(tok)
        return [pick()]
    stats["prefill_s"] = run()
    stats["prefill_tok_s"] = min(len(ids), W) / max(stats["prefill_s"], 1e-9)
    chosen = [pick()]
    new = []
    t_gen, n_gen, ts = 0.0, 0, 0.0
    for i in range(max_new_tokens):
        if not chosen:
            chosen = step(new[-1])
        tok = chosen.pop(0)
        now = time.perf_counter()
        if i == 0:
            stats["ttft_s"] = now - t0
        else:                           # a step (or its share of one) and its sampling
            t_gen += now - ts
            n_gen += 1
            stats["gen_tok_s"] = n_gen / max(t_gen, 1e-9)
        if tok in stop_ids:
            break
        hist = np.append(hist, np.int32(tok))
        new.append(tok)
        stats["generated_tokens"] = len(new)
        yield tok
        ts = time.perf_counter()
        if stop_strs and any(tokenizer.decode(new, errors="replace").endswith(s) for s in stop_strs):
            break
    stats.setdefault("gen_tok_s", float("nan"))
    stats.setdefault("ttft_s", float("nan"))


def _check_rewind(im: InferenceModel, role: str) -> None:
    try:
        im.rewind(im.pos)
    except ValueError as e:
        raise ValueError(f"speculative decoding needs a {role} whose cache moves back: {e}") from None


def _draft_model(draft, target: InferenceModel) -> InferenceModel:
    """The draft in the inference engine, on the target's device and in its
    mode: an InferenceModel as it is, a smedjan Model copied, a path loaded
    (.gguf, else a smedjan checkpoint)."""
    if draft is target:
        raise ValueError("the draft is the target's own InferenceModel: a draft needs its own KV "
                         "cache (pass the smedjan Model, or a second InferenceModel of it)")
    if isinstance(draft, InferenceModel):
        d = draft
    elif isinstance(draft, (str, os.PathLike)):
        path = os.fspath(draft)
        if path.endswith(".gguf"):
            d = InferenceModel.load_gguf(path, target.mode, tokenizer=False, device=target.device)
        else:
            from .checkpoint import model_from_checkpoint
            d = InferenceModel.from_model(model_from_checkpoint(path), target.mode, device=target.device)
    elif hasattr(draft, "_h") and hasattr(draft, "config"):
        d = InferenceModel.from_model(draft, target.mode, device=target.device)
    else:
        raise TypeError(f"draft must be a smedjan Model, an InferenceModel or a checkpoint path, "
                        f"got {type(draft).__name__}")
    if d.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocab_size {d.config.vocab_size} differs from the target's "
                         f"{target.config.vocab_size}: a draft must share the target's tokenizer")
    if d.device != target.device:
        raise ValueError(f"the draft runs on {d.device} but the target on {target.device}")
    return d


def lookup_proposals(context, n: int, k: int) -> list:
    """Prompt lookup's proposals: the up to k tokens that followed the last
    earlier occurrence of the context's final n-gram, for the longest n of
    n..1 that occurred before ([] when none did).

    >>> lookup_proposals([1, 2, 3, 9, 1, 2, 3], 3, 2)
    [9, 1]
    """
    hist = np.asarray(context, np.int32)
    L = hist.size
    for m in range(min(n, L - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(hist[:L - 1], m)
        hits = np.flatnonzero((windows == hist[L - m:]).all(1))
        if hits.size:
            s = int(hits[-1]) + m
            return [int(t) for t in hist[s:s + k]]
    return []


class _Speculator:
    """Speculative decoding for _stream. A proposer (a draft model following
    the context in its own KV cache, or prompt lookup) offers up to k tokens
    with their draft distributions q; the target runs the last chosen token
    and the proposals in one prefill with every position's logits and keeps
    the longest prefix its own choice agrees with: greedy, where the target's
    choice equals the proposal; sampled, by the speculative sampling rule
    (accept d with probability min(1, p(d)/q(d)), else draw the target's
    token from norm(max(0, p - q))), which leaves the output distributed as
    plain sampling's. p and q pass through the same sampler transforms
    (repetition penalty over the same history, temperature, top-k, top-p).
    Its own token (the correction, or after k acceptances the bonus) ends
    the step; the target's position moves back past the rejected tokens."""

    def __init__(self, target: InferenceModel, draft, k: int, lookup: int):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"draft_k must be an integer >= 1, got {k!r}")
        if isinstance(lookup, bool) or not isinstance(lookup, (int, np.integer)) or lookup < 0:
            raise ValueError(f"draft_lookup must be an integer >= 0 (the longest n-gram), got {lookup!r}")
        if draft is not None and lookup:
            raise ValueError("give a draft model or draft_lookup, not both")
        _check_rewind(target, "target")
        self.target, self.k, self.lookup = target, int(k), int(lookup)
        self.draft = None if draft is None else _draft_model(draft, target)
        if self.draft is not None:
            _check_rewind(self.draft, "draft")
        self._p = np.empty(target.config.vocab_size, np.float32)

    def start(self, stats, sampler, n_emit, params):
        self.stats, self.sampler, self.n_emit, self.params = stats, sampler, n_emit, params
        stats.update(draft_tokens=0, accepted_tokens=0, verify_steps=0, acceptance_rate=float("nan"),
                     mean_accepted_length=float("nan"))
        if self.draft is not None:
            self.draft.reset()
            self.draft_start = 0        # the context index of the draft cache's position 0

    def _probs(self, logits, history, out):
        temp, k, p, pen = self.params
        self.sampler.probs(np.ascontiguousarray(logits[:self.n_emit]), out[:self.n_emit], temp, k, p, pen,
                           history if pen != 1.0 else None)
        out[self.n_emit:] = 0
        return out

    def _draw(self, weights) -> int:
        """A token drawn from nonnegative weights with the sampler's RNG."""
        c = np.cumsum(weights, dtype=np.float64)
        i = int(np.searchsorted(c, self.sampler.uniform() * c[-1], side="right"))
        return min(i, int(np.flatnonzero(weights)[-1]))     # u * total may round up to total

    def _choose(self, logits, history) -> int:
        """A token from logits as plain sampling chooses it (greedy: the same)."""
        temp, k, p, pen = self.params
        return self.sampler.sample(np.ascontiguousarray(logits[:self.n_emit]), temp, k, p, pen,
                                   history if pen != 1.0 else None)

    def _propose(self, hist, k):
        """Proposals and their draft distributions (None: prompt lookup's one-hot)."""
        if self.draft is None:
            return lookup_proposals(hist, self.lookup, k), None
        d = self.draft
        k = min(k, d.max_ctx - 1)
        if k <= 0:
            return [], None
        # the draft cache follows the context from draft_start; the tail it lacks goes in now
        if hist.size - self.draft_start + k > d.max_ctx:
            d.reset()
            self.draft_start = max(0, hist.size - (d.max_ctx - k))
        logits = d.prefill(hist[self.draft_start + d.pos:])
        greedy = self.params[0] <= 0
        props, qs = [], []
        for i in range(k):
            h_i = np.append(hist, np.asarray(props, np.int32))
            if greedy:
                t = self._choose(logits, h_i)
            else:
                q = self._probs(logits, h_i, np.empty_like(self._p))
                t = self._draw(q)
                qs.append(q)
            props.append(t)
            if i + 1 < k:
                logits = d.decode(t)
        return props, (qs if not greedy else None)

    def step(self, hist, tok, room):
        """The tokens chosen after tok (hist[-1], not yet in the target's
        cache), at most room + 1 positions from here."""
        props, qs = self._propose(hist, min(self.k, room))
        h = self.target
        base = h.pos
        rows = h.prefill(np.asarray([tok] + props, np.int32), all_logits=True)
        greedy = self.params[0] <= 0
        out = []
        for i, d in enumerate(props):
            h_i = np.append(hist, np.asarray(out, np.int32))
            if greedy:
                t = self._choose(rows[i], h_i)
                if t != d:
                    out.append(t)
                    break
            else:
                p = self._probs(rows[i], h_i, self._p)
                q_d = 1.0 if qs is None else float(qs[i][d])
                if not self.sampler.uniform() < p[d] / q_d:
                    if qs is None:
                        resid = p.astype(np.float64)
                        resid[d] = 0.0
                    else:
                        resid = np.maximum(p.astype(np.float64) - qs[i], 0.0)
                    # a rejection means p(d) < q(d), so the residual has mass but for rounding
                    out.append(self._draw(resid) if resid.sum() > 0 else self._draw(p))
                    break
            out.append(d)
        else:
            out.append(self._choose(rows[len(props)], np.append(hist, np.asarray(props, np.int32))))
        accepted = len(out) - 1
        h.rewind(base + 1 + accepted)
        if self.draft is not None:      # the draft cache holds tok and props[:-1]: keep the accepted
            self.draft.rewind(min(self.draft.pos, hist.size - self.draft_start + accepted))
        st = self.stats
        if props:
            st["draft_tokens"] += len(props)
            st["accepted_tokens"] += accepted
            st["verify_steps"] += 1
            st["acceptance_rate"] = st["accepted_tokens"] / st["draft_tokens"]
            st["mean_accepted_length"] = st["accepted_tokens"] / st["verify_steps"]
        return out


def load_gguf(path, mode: Optional[str] = None, max_ctx: int = 0, device: str = "cpu",
              kv_dtype: str = "f32") -> InferenceModel:
    """A GGUF model (Llama architecture) with its tokenizer, weights held as
    `mode` ("fp32", "bf16", "q8", "q4"; on device="cuda" "bf16" or "fp32")
    whatever the file stores; on the CPU the K/V cache in `kv_dtype` ("f32",
    or "f16": half the memory, llama.cpp's default)."""
    return InferenceModel.load_gguf(path, mode, max_ctx, device=device, kv_dtype=kv_dtype)


def from_model(model, mode: Optional[str] = None, max_ctx: int = 0, device: str = "cpu",
               kv_dtype: str = "f32") -> InferenceModel:
    """An inference copy of a smedjan Model's weights (quantised per mode)."""
    return InferenceModel.from_model(model, mode, max_ctx, device=device, kv_dtype=kv_dtype)


Generator = InferenceModel

__all__ = ["InferenceModel", "Generator", "load_gguf", "from_model", "MODES"]


def decode_benchmark(model, prompt, n_tokens: int) -> float:
    """Seconds per token of greedy KV-cache decoding of a smedjan.Model after
    a prefill of prompt: on the CPU its fp32 weights, one decode call per
    token; on a GPU its weights at the model's dtype (bf16 for an fp16
    model: the GPU engine has fp32 and bf16 weights only), the n_tokens steps
    chained on the device in one CUDA graph replay. smedjan.bench uses it
    for its decode column."""
    import time
    if getattr(model, "device", "cpu") == "cuda":
        mode = "fp32" if model.dtype == "fp32" else "bf16"
        m = from_model(model, mode, max_ctx=len(prompt) + n_tokens + 1, device="cuda")
        t = int(np.argmax(m.prefill(np.asarray(prompt, np.int32))))
        m.greedy(t, n_tokens)            # captures the graph; the timed run replays it
        m.reset()
        m.prefill(np.asarray(prompt, np.int32))
        t0 = time.perf_counter()
        m.greedy(t, n_tokens)
        return (time.perf_counter() - t0) / n_tokens
    m = from_model(model, "fp32", max_ctx=len(prompt) + n_tokens + 1)
    m.prefill(np.asarray(prompt, np.int32))
    t = int(np.argmax(m.last_logits()))
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        t = int(np.argmax(m.decode(t)))
    return (time.perf_counter() - t0) / n_tokens
