"""smedjan.Model: a thin handle over the engine's model. Parameters and
gradients are views into the engine's flat buffers, without a copy: NumPy
arrays on the CPU, DeviceTensors on CUDA (torch.from_dlpack views them;
.numpy() copies to the host). Gradients exist only once needed (a backward,
an optimizer step, or reading `grads`/`flat_grads`): a model used only for
forward passes never holds them."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np

from . import _C
from .config import Config


def check_label_buckets(sizes) -> list:
    """label_bucket_sizes as a list of ints (the engine checks that they are
    positive and ascending, naming the argument)."""
    if isinstance(sizes, (str, bytes)) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sizes):
        raise TypeError(f"label_bucket_sizes must be a list of ints such as [64, 128, 256], "
                        f"got {sizes!r}")
    return [int(v) for v in sizes]


def as_tokens(x, name: str = "tokens") -> np.ndarray:
    """A (B, T) int32/uint16 array, without a copy when it already is one.

    Other integer dtypes are converted (checked for range); anything else
    is refused with a TypeError naming the argument."""
    a = np.asarray(x)
    if a.dtype == np.int32 or a.dtype == np.uint16:
        pass
    elif a.dtype.kind in "iu":
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name}: values do not fit in int32")
        a = a.astype(np.int32)
    else:
        raise TypeError(f"{name}: expected an integer array (int32 or uint16), got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected shape (batch, seq), got {a.shape}")
    return np.ascontiguousarray(a)


class Model:
    """A decoder-only transformer in the engine.

    >>> m = Model("tiny", seed=0)
    >>> m.forward(np.zeros((1, 8), np.int32)).shape
    (1, 8, 8192)

    device="cuda" runs on the GPU with dtype "bf16" (bf16 compute, f32 master
    weights and optimizer state), "fp16" (the same in fp16, every cast to
    fp16 clamped to +-65504 so an overflow never becomes inf; no loss
    scaling) or "fp32" (parity mode, TF32 off). dtype on the CPU is "fp32"
    only. The same seed gives the same initial weights on every device.
    Parameters that would not fit what the device has available (host RAM,
    free GPU memory) raise smedjan.OutOfMemoryError before anything is
    allocated, and the process goes on.
    """

    def __init__(self, config: Union[str, Config, dict] = "small", *, seed: int = 0,
                 vocab_size: int = 8192, device: str = "cpu", dtype: Optional[str] = None,
                 **overrides):
        if isinstance(config, str):
            config = Config.preset(config, vocab_size, **overrides)
        elif isinstance(config, dict):
            config = Config(**{**config, **overrides})
        elif overrides:
            config = Config(**{**config.to_dict(), **overrides})
        self.config: Config = config
        self.seed = seed
        if dtype is None:
            dtype = "bf16" if device.startswith("cuda") else "fp32"
        self._h = _C.Model(config.to_dict(), seed, device, dtype)
        self.tensors = [(n, tuple(s), off) for n, s, off, _ in self._h.tensors()]
        self.tokenizer = None       # set when loaded with one (see smedjan.commands)
        self._bind_views()

    def _bind_views(self) -> None:
        self.flat_params = self._flat(self._h.params())
        self.params = self._views(self.flat_params)
        self._flat_grads = self._grads = None   # bound on first access (see flat_grads)

    def _flat(self, buf):
        return np.frombuffer(buf, dtype=np.float32) if self._h.device() != "cuda" else buf

    @property
    def flat_grads(self):
        """All gradients, one flat float32 view (zeros until a backward).
        The first access brings them into being: a model used only for
        forward passes holds no gradient memory."""
        if self._flat_grads is None:
            self._flat_grads = self._flat(self._h.grads())
        return self._flat_grads

    @property
    def grads(self) -> Dict[str, np.ndarray]:
        """Named views of flat_grads, like params (made on first access)."""
        if self._grads is None:
            self._grads = self._views(self.flat_grads)
        return self._grads

    def _views(self, flat) -> Dict[str, np.ndarray]:
        out = {}
        for name, shape, off in self.tensors:
            n = int(np.prod(shape))
            if isinstance(flat, np.ndarray):
                out[name] = flat[off:off + n].reshape(shape)
            else:
                out[name] = flat.view(off, shape)
        return out

    @property
    def device(self) -> str:
        """'cpu' or 'cuda' ('cpu-staged': testing only)."""
        return self._h.device()

    @property
    def dtype(self) -> str:
        """Compute dtype: 'fp32', 'bf16' or 'fp16'."""
        return self._h.dtype()

    def to(self, device: str, dtype: Optional[str] = None) -> "Model":
        """Move parameters and gradients, if any exist yet (an optimizer's
        state follows at its next step). dtype: 'fp32', 'bf16' or 'fp16' on
        "cuda" (default bf16), 'fp32' on "cpu". Views taken earlier
        (model.params[...] held elsewhere) must be dropped first.

        >>> m = Model("tiny").to("cpu")
        """
        if dtype is None:
            dtype = "bf16" if device.startswith("cuda") else "fp32"
        self.flat_params = self._flat_grads = self.params = self._grads = None
        import gc
        gc.collect()
        try:
            self._h.to(device, dtype)
        finally:
            self._bind_views()
        return self

    def params_updated(self) -> None:
        """After writing parameters through DLPack views on the GPU, refresh
        the bf16/fp16 compute copy (whole assignments `t[:] = x` do it already)."""
        self._h.params_updated()

    @property
    def n_params(self) -> int:
        return self.flat_params.size

    def forward(self, tokens) -> np.ndarray:
        """Logits (B, T, vocab) as float32 for tokens (B, T)."""
        t = as_tokens(tokens)
        out = np.empty((*t.shape, self.config.vocab_size), dtype=np.float32)
        self._h.forward(t, out)
        return out if np.ndim(tokens) != 1 else out[0]

    __call__ = forward

    def forward_device(self, tokens):
        """Logits left on the GPU, in the compute dtype (bf16, fp16 or fp32), as a
        DeviceTensor for torch.from_dlpack; valid until the model's next call
        (copy it if you keep it)."""
        return self._h.forward_device(as_tokens(tokens))

    def loss(self, tokens, targets, *, ignore_index: int = -1, backward: bool = False,
             denom: int = 0) -> float:
        """Mean cross-entropy of next-token targets; targets equal to
        ignore_index do not count. With backward=True, gradients are added
        into `grads`. denom > 0 divides the summed loss (and scales the
        gradient) by denom instead of this batch's count: gradient
        accumulation passes the whole batch's count, so that micro-batch
        gradients add up to the big batch's."""
        return self._h.loss(as_tokens(tokens), as_tokens(targets, "targets"),
                            ignore_index=ignore_index, backward=backward, denom=denom)

    def set_levers(self, *, gradient_checkpointing: Optional[bool] = None,
                   fused_ce: Optional[bool] = None, ce_rows: Optional[int] = None,
                   memory_limit: Optional[int] = None,
                   fp16_activations: Optional[bool] = None,
                   cheap_recompute: Optional[bool] = None,
                   cast_on_use: Optional[bool] = None,
                   sparse_loss: Optional[bool] = None,
                   label_bucket_sizes: Optional[Sequence[int]] = None) -> dict:
        """Memory levers (None keeps the current setting); returns them all.

        gradient_checkpointing: keep only each block's input from forward to
        backward and recompute the rest in backward (gradients bit-identical).
        cheap_recompute: keep neither the RMSNorm outputs nor SwiGLU's (a
        third of what a layer keeps) and redo those elementwise ops in
        backward, 3 extra kernels a layer (gradients bit-identical;
        gradient_checkpointing includes it). fused_ce: LM head + loss over
        ce_rows rows at a time (default 256), so the (batch*seq, vocab)
        logits never exist. A vocabulary that is not a multiple of 64 takes
        this head over all rows at once even with the lever off: its GEMMs
        then run at the padded vocabulary (on an H100, GPT-2's 50257 trains
        1.5x faster so). memory_limit: bytes; a
        run whose planned peak (engine memory held + its activation arena)
        exceeds it is refused with MemoryError before the arena is allocated.
        fp16_activations: activations kept from forward to backward are
        stored as fp16 (clamped to +-65504) between their last forward and
        first backward use (fp32 compute; on bf16 and fp16 models they
        already are half size, and the lever does nothing). cast_on_use
        (bf16 and fp16 models): forward and loss runs cast each weight from
        the f32 master into the activation arena right before its use, as
        autocast does and as they do anyway until the first training run
        makes the 16-bit copy of the weights (2 bytes a parameter): the
        lever drops that copy until a training run makes it again; logits
        are bit-identical, each forward pays one pass over the master.
        sparse_loss: loss and training runs gather the label positions
        (targets not ignored) from the residual stream and run the final
        norm, LM head and cross-entropy over those rows only; the others'
        logits never exist. Loss and gradients equal the dense ones (up to
        f32 summation order). The rows are padded to the smallest of
        label_bucket_sizes (positive, ascending) that holds the batch's
        labels (above the largest: a multiple of it; none given: a multiple
        of 64), so that a few shapes (plans, CUDA graphs) serve every batch.

        >>> m = Model("tiny"); m.set_levers(fused_ce=True)["fused_ce"]
        True
        """
        given = dict(gradient_checkpointing=gradient_checkpointing, fused_ce=fused_ce,
                     ce_rows=ce_rows, memory_limit=memory_limit,
                     fp16_activations=fp16_activations, cheap_recompute=cheap_recompute,
                     cast_on_use=cast_on_use, sparse_loss=sparse_loss)
        new = self._h.levers()
        new.update({k: type(new[k])(v) for k, v in given.items() if v is not None})
        if label_bucket_sizes is not None:
            new["label_bucket_sizes"] = check_label_buckets(label_bucket_sizes)
        self._h.set_levers(**new)
        return self.levers

    @property
    def levers(self) -> dict:
        """The memory levers now set (see set_levers)."""
        return self._h.levers()

    def plan_memory(self, batch_size: int, seq_len: int, mode: str = "train",
                    grad_accum: int = 1, labels: Optional[int] = None,
                    optimizer: str = "adamw", momentum: Optional[float] = None,
                    optim_state_dtype: str = "fp32") -> dict:
        """Plan a run without allocating anything: the activation arena's
        bytes, the activation bytes kept from forward to backward, the fixed
        bytes (parameters, their compute copy, gradients, the optimizer's
        state: what
        the mode keeps besides the arena), the planned peak (fixed + arena),
        and what the device has available now (available_bytes; -1 when
        unknown). The engine plans the same figures before it allocates and
        raises OutOfMemoryError when they pass memory_limit or what is
        available. mode:
          'forward', 'loss': no gradients (a model that never ran backward
              holds none);
          'backward': loss(backward=True), into the model's gradients;
          'train': a Trainer step (the state of `optimizer` too: "adamw",
              "lion", "sgd" (momentum: its buffer when > 0; default none),
              "adafactor" or "muon"), stored as optim_state_dtype ("fp32",
              "bf16" or "8bit"). With grad_accum=1 on a
              model holding no gradients, the step's gradients live in its
              arena, in room that backward frees, and die with the update.
        With the sparse loss, the loss runs over the label rows of batches
        of `labels` label positions (padded to their bucket); None plans the
        worst case, every position labelled.

        >>> Model("tiny").plan_memory(2, 64)["arena_bytes"] > 0
        True
        """
        has_grads, _ = self._h.holds()
        own_grads = mode == "train" and int(grad_accum) == 1 and not has_grads
        code = {"forward": 0, "loss": 1, "backward": 2, "train": 3 if own_grads else 2}[mode]
        arena, kept = self._h.plan_bytes(int(batch_size), int(seq_len), code,
                                         -1 if labels is None else int(labels))
        state = _C.optimizer_state_bytes(self._h, optimizer, float(momentum or 0.0),
                                         optim_state_dtype) if mode == "train" else 0
        fixed = self._h.fixed_bytes(code, state)
        available = _C.mem_available("cuda" if self.device == "cuda" else "cpu")[0]
        return dict(arena_bytes=arena, kept_bytes=kept, fixed_bytes=fixed,
                    peak_bytes=fixed + arena, available_bytes=available)

    def nonfinite_params(self) -> list:
        """Names of the parameter tensors holding a NaN or an infinity (one
        pass over the weights where they live; [] when all are finite).

        >>> Model("tiny").nonfinite_params()
        []
        """
        if self._h.params_finite(-1):
            return []
        return [name for i, (name, _, _) in enumerate(self.tensors) if not self._h.params_finite(i)]

    def reset_peak(self) -> None:
        """Restart peak-memory tracking from what is held now."""
        self._h.reset_peak()

    def generate(self, prompt, max_new_tokens: int = 64, **kw):
        """Stream sampled token ids (see smedjan.generate.generate).

        >>> # for t in model.generate("def main", 32, temperature=0.8, seed=0): print(t)
        """
        from .generate import generate
        return generate(self, prompt, max_new_tokens, **kw)

    @property
    def moe_stats(self) -> Optional[dict]:
        """The MoE layers' routing in the last forward (a loss, a train step,
        logits): None without MoE layers, else {"aux_loss": [per MoE layer],
        "z_loss": [...], "load": [[tokens routed to each expert] per layer],
        "dropped": 0 (routing is dropless)}. The reported loss adds
        moe["aux_loss"] * aux + moe["z_loss"] * z of every MoE layer.

        >>> # Model(Config(..., ffn="moe", moe={...})).moe_stats["load"]
        """
        rows = self._h.moe_stats()
        if rows is None:
            return None
        return {"aux_loss": [r[0] for r in rows], "z_loss": [r[1] for r in rows],
                "load": [list(r[2]) for r in rows], "dropped": 0}

    def zero_grad(self) -> None:
        """Set the gradients to zero (nothing to do when none exist yet)."""
        self._h.zero_grad()

    def memory(self) -> dict:
        """Engine memory held now and at peak, in bytes (parameters, grads once they exist,
        optimizer state, activation arenas); on CUDA also everything the
        backend allocated, scratch and GEMM workspace included."""
        now, peak = self._h.memory()
        out = {"bytes": now, "peak_bytes": peak}
        if self.device == "cuda":
            out["cuda_bytes"], out["cuda_peak_bytes"] = _C.cuda_memory()
        return out

    def __repr__(self) -> str:
        c = self.config
        return (f"Model(dim={c.dim}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
                f"n_kv_heads={c.n_kv_heads}, ffn_dim={c.ffn_dim}, vocab_size={c.vocab_size}, "
                f"params={self.n_params:,}, device='{self.device}', dtype='{self.dtype}')")
