"""smedjan.Trainer: AdamW with a warm-up + cosine schedule and global
gradient-norm clipping, all in the engine over the flat buffers."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from . import _C
from .model import Model, as_tokens


class StepResult(NamedTuple):
    loss: float
    grad_norm: float   # before clipping
    lr: float


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The schedule: linear from min_lr to lr over `warmup` steps, then cosine
    back to min_lr at step `steps - 1`."""
    return _C.lr_at(lr, min_lr, warmup, steps, step)


class Trainer:
    """Trains a Model one batch at a time.

    >>> m = Model("tiny"); tr = Trainer(m, lr=1e-3, steps=10)
    >>> x = np.random.randint(0, 8192, (2, 16)).astype(np.int32)
    >>> r = tr.step(x[:, :-1], x[:, 1:])

    Memory levers (each measured in docs/performance.md): grad_accum=N
    splits every batch given to step() into N micro-batches (fit() draws N
    loader batches per step), whose gradients add up to the whole batch's;
    gradient_checkpointing recomputes block activations in backward;
    cheap_recompute recomputes only the RMSNorm and SwiGLU outputs;
    fused_ce never materialises the (batch*seq, vocab) logits;
    fp16_activations stores the activations kept for backward as fp16;
    memory_limit (bytes) refuses a run whose planned peak exceeds it.

    clip is the global gradient-norm bound; 0 (or None) turns clipping off.
    Arguments outside their range are refused by name (ValueError): lr,
    min_lr, clip, weight_decay or eps negative or not finite, warmup < 0 or
    > steps, steps < 1, grad_accum < 1, betas outside [0, 1).
    """

    def __init__(self, model: Model, *, lr: float = 3e-4, min_lr: Optional[float] = None,
                 warmup: int = 0, steps: int = 1000, weight_decay: float = 0.1,
                 clip: float = 1.0, betas: Tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, grad_accum: int = 1,
                 gradient_checkpointing: Optional[bool] = None, fused_ce: Optional[bool] = None,
                 fp16_activations: Optional[bool] = None, memory_limit: Optional[int] = None,
                 cheap_recompute: Optional[bool] = None):
        if int(grad_accum) < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.grad_accum = int(grad_accum)
        clip = 0.0 if clip is None else clip
        model.set_levers(gradient_checkpointing=gradient_checkpointing, fused_ce=fused_ce,
                         memory_limit=memory_limit, fp16_activations=fp16_activations,
                         cheap_recompute=cheap_recompute)
        self.model = model
        self.lr, self.min_lr = lr, lr / 10 if min_lr is None else min_lr
        self.warmup, self.steps = warmup, steps
        self.weight_decay, self.clip, self.betas, self.eps = weight_decay, clip, betas, eps
        self._h = _C.Optimizer(model._h, lr, self.min_lr, warmup, steps, betas[0], betas[1],
                               eps, weight_decay, clip)

    def _state(self, which: int):
        s = self._h.state(which)
        return s if self.model.device == "cuda" else np.frombuffer(s, dtype=np.float32)

    @property
    def exp_avg(self):
        """AdamW first moment over the flat parameters (a view: NumPy on the
        CPU, DeviceTensor on CUDA). Fetch it again after model.to()."""
        return self._state(0)

    @property
    def exp_avg_sq(self):
        """AdamW second moment (see exp_avg)."""
        return self._state(1)

    @property
    def step_count(self) -> int:
        return self._h.step_count

    @step_count.setter
    def step_count(self, n: int) -> None:
        self._h.step_count = n

    def step(self, tokens, targets) -> StepResult:
        """Forward, backward, clip and AdamW on one batch. With grad_accum=N
        the batch (N*B, T) runs as N micro-batches of B rows; the update and
        the loss are those of the whole batch (up to fp32 summation order)."""
        x, y = as_tokens(tokens), as_tokens(targets, "targets")
        n = self.grad_accum
        if n == 1:
            return StepResult(*self._h.train_step(x, y))
        if x.shape[0] % n:
            raise ValueError(f"grad_accum={n}: the batch's {x.shape[0]} rows do not split into "
                             f"{n} equal micro-batches")
        if x.shape != y.shape:
            raise ValueError(f"targets must have the shape of tokens {x.shape}, got {y.shape}")
        count = int(y.size if y.dtype == np.uint16 else np.count_nonzero(y != -1))
        b = x.shape[0] // n
        loss = 0.0
        for i in range(n):
            loss += self.model.loss(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b], backward=True,
                                    denom=count)
        grad_norm, lr = self._h.step()
        return StepResult(loss, grad_norm, lr)

    def fit(self, train, val=None, **kw) -> list:
        """Train with evaluation, checkpoints and a metrics log (see smedjan.loop.fit)."""
        from .loop import fit
        return fit(self, train, val, **kw)

    def optimizer_step(self) -> Tuple[float, float]:
        """Clip and update from the gradients already accumulated in the
        model (after model.loss(..., backward=True) calls); zeroes them.
        Returns (grad_norm, lr)."""
        return self._h.step()
