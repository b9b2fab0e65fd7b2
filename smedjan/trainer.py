"""smedjan.Trainer: AdamW with a warm-up + cosine schedule and global
gradient-norm clipping, all in the engine over the flat buffers; the
non-finite policy (skip, count, raise after too many in a row) and a loss
spike detector around it."""
from __future__ import annotations

import collections
import logging
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _C
from .model import Model, as_tokens

log = logging.getLogger("smedjan")


class _Step(NamedTuple):
    loss: float
    grad_norm: float   # before clipping
    lr: float


class StepResult(_Step):
    """What one step did. Unpacks and compares as (loss, grad_norm, lr);
    besides, as attributes: tokens (targets counted in the loss; -1 when
    not known), skipped (no update was made: a non-finite gradient norm, or
    a batch with no targets), skipped_steps (steps skipped so far, this one
    included), spike (the loss is a spike, see Trainer) and loss_z (its
    z-score against the recent losses; None until there are enough)."""

    def __new__(cls, loss: float, grad_norm: float, lr: float, *, tokens: int = -1,
                skipped: bool = False, skipped_steps: int = 0, spike: bool = False,
                loss_z: Optional[float] = None) -> "StepResult":
        r = super().__new__(cls, loss, grad_norm, lr)
        r.tokens, r.skipped, r.skipped_steps = int(tokens), bool(skipped), int(skipped_steps)
        r.spike, r.loss_z = bool(spike), loss_z
        return r

    def __repr__(self) -> str:
        return (f"StepResult(loss={self.loss!r}, grad_norm={self.grad_norm!r}, lr={self.lr!r}, "
                f"tokens={self.tokens}, skipped={self.skipped}, "
                f"skipped_steps={self.skipped_steps}, spike={self.spike})")


class LossSpikes:
    """Loss spike detector: the z-score of each loss against the mean and
    standard deviation of the last `window` losses of steps that updated
    (spikes included, so that a lasting change of level stops being one);
    a spike is a z-score above `threshold`. Silent until the window holds
    min(window, 20) losses.

    >>> d = LossSpikes(window=50, threshold=6.0)
    >>> [d.observe(2.0 + 0.01 * (i % 3)) for i in range(30)][-1] is not None
    True
    >>> d.observe(9.0) > 6.0
    True
    """

    def __init__(self, window: int = 100, threshold: Optional[float] = 6.0):
        if int(window) < 2:
            raise ValueError(f"spike_window must be >= 2, got {window}")
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"spike_threshold must be >= 0 or None, got {threshold}")
        self.window, self.threshold = int(window), threshold
        self.losses = collections.deque(maxlen=self.window)
        self.last_n, self.last_mean, self.last_std = 0, math.nan, math.nan

    def observe(self, loss: float) -> Optional[float]:
        """The loss's z-score against the window (None: too few yet, or no
        spread), then the loss joins the window."""
        z = None
        n = self.last_n = len(self.losses)
        if n >= min(self.window, 20):
            mean = math.fsum(self.losses) / n
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in self.losses) / n)
            self.last_mean, self.last_std = mean, std
            if std > 0:
                z = (loss - mean) / std
        self.losses.append(float(loss))
        return z

    def is_spike(self, z: Optional[float]) -> bool:
        return bool(self.threshold) and z is not None and z > self.threshold


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
    sparse_loss runs the final norm, LM head and loss only at label
    positions (targets not ignored: SFT's answers), padded to the smallest
    of label_bucket_sizes that holds a batch's labels (Model.set_levers):
    the same loss and gradients, without the unlabelled rows' logits.

    clip is the global gradient-norm bound; 0 (or None) turns clipping off.
    Arguments outside their range are refused by name (ValueError): lr,
    min_lr, clip, weight_decay or eps negative or not finite, warmup < 0 or
    > steps, steps < 1, grad_accum < 1, betas outside [0, 1).

    Memory: before the AdamW state is allocated, the Trainer's whole fixed
    memory (moments 8 bytes a parameter, gradients 4, a 16-bit model's
    compute copy 2) is checked against memory_limit and against what the
    device has available (host: MemAvailable or the cgroup's room; CUDA:
    free GPU memory); each step's activation arena likewise, when its shape
    first comes. What does not fit raises smedjan.OutOfMemoryError (a
    MemoryError) naming the bytes asked, the device and what is held, before
    anything is allocated: the process goes on, and a smaller Trainer or
    batch can follow.

    Non-finite steps: a step whose global gradient norm is NaN or infinite
    makes no update (weights, AdamW state and step_count stay as they were;
    the gradients are dropped) and is counted (StepResult.skipped,
    .skipped_steps, and Trainer.skipped_steps); after max_skipped_steps such
    skips in a row (default 3; None: never) the step raises
    FloatingPointError naming it and saying whether the weights themselves
    hold NaN/Inf. A batch whose targets are all ignored (-1) carries no
    signal: it makes no update either (torch's zero gradients would still
    let AdamW decay the weights and replay momentum) and returns loss 0.0
    with tokens=0, the sum over no tokens as torch's reduction="sum" gives
    it (its default "mean" gives NaN); it counts in skipped_steps but not
    toward max_skipped_steps.
    Loss spikes: each loss's z-score against the last spike_window losses
    (default 100); above spike_threshold (default 6; None: off) it is logged
    as a warning on logging.getLogger("smedjan") and flagged
    (StepResult.spike; fit records it in metrics.jsonl).
    """

    def __init__(self, model: Model, *, lr: float = 3e-4, min_lr: Optional[float] = None,
                 warmup: int = 0, steps: int = 1000, weight_decay: float = 0.1,
                 clip: float = 1.0, betas: Tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, grad_accum: int = 1,
                 gradient_checkpointing: Optional[bool] = None, fused_ce: Optional[bool] = None,
                 fp16_activations: Optional[bool] = None, memory_limit: Optional[int] = None,
                 cheap_recompute: Optional[bool] = None, sparse_loss: Optional[bool] = None,
                 label_bucket_sizes: Optional[Sequence[int]] = None,
                 max_skipped_steps: Optional[int] = 3,
                 spike_window: int = 100, spike_threshold: Optional[float] = 6.0):
        if int(grad_accum) < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if max_skipped_steps is not None and int(max_skipped_steps) < 1:
            raise ValueError(f"max_skipped_steps must be >= 1 or None, got {max_skipped_steps}")
        self.grad_accum = int(grad_accum)
        clip = 0.0 if clip is None else clip
        self.max_skipped_steps = None if max_skipped_steps is None else int(max_skipped_steps)
        self.spikes = LossSpikes(spike_window, spike_threshold)
        model.set_levers(gradient_checkpointing=gradient_checkpointing, fused_ce=fused_ce,
                         memory_limit=memory_limit, fp16_activations=fp16_activations,
                         cheap_recompute=cheap_recompute, sparse_loss=sparse_loss,
                         label_bucket_sizes=label_bucket_sizes)
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

    @property
    def skipped_steps(self) -> int:
        """Steps that made no update so far (non-finite gradient norm, or no targets)."""
        return self._h.skips()[0]

    def state_dict(self) -> dict:
        """The training state besides weights, moments and step_count: the
        skip counts and the spike detector's window (checkpoints save it,
        so that a resumed run counts and flags as one that never stopped)."""
        total, run = self._h.skips()
        return {"skipped_steps": total, "skip_run": run, "loss_window": list(self.spikes.losses)}

    def load_state_dict(self, state: dict) -> None:
        self._h.set_skips(int(state.get("skipped_steps", 0)), int(state.get("skip_run", 0)))
        self.spikes.losses.clear()
        self.spikes.losses.extend(float(v) for v in state.get("loss_window", []))

    def step(self, tokens, targets) -> StepResult:
        """Forward, backward, clip and AdamW on one batch. With grad_accum=N
        the batch (N*B, T) runs as N micro-batches of B rows; the update and
        the loss are those of the whole batch (up to fp32 summation order).
        A non-finite gradient norm or a batch with no targets skips the
        update (StepResult.skipped); see the class docstring for the policy."""
        x, y = as_tokens(tokens), as_tokens(targets, "targets")
        n = self.grad_accum
        if n == 1:
            loss, grad_norm, lr, count, skipped = self._h.train_step(x, y)
            return self._finish(loss, grad_norm, lr, count, skipped)
        if x.shape[0] % n:
            raise ValueError(f"grad_accum={n}: the batch's {x.shape[0]} rows do not split into "
                             f"{n} equal micro-batches")
        if x.shape != y.shape:
            raise ValueError(f"targets must have the shape of tokens {x.shape}, got {y.shape}")
        count = int(y.size if y.dtype == np.uint16 else np.count_nonzero(y != -1))
        if count == 0:                       # as the engine does for one batch
            total, run = self._h.skips()
            self._h.set_skips(total + 1, run)
            lr = lr_at(self.step_count, lr=self.lr, min_lr=self.min_lr, warmup=self.warmup,
                       steps=self.steps)
            return self._finish(0.0, 0.0, lr, 0, True)
        b = x.shape[0] // n
        loss = 0.0
        for i in range(n):
            loss += self.model.loss(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b], backward=True,
                                    denom=count)
        grad_norm, lr, skipped = self._h.step()
        return self._finish(loss, grad_norm, lr, count, skipped)

    def _finish(self, loss, grad_norm, lr, tokens, skipped) -> StepResult:
        """Count, watch for spikes, and apply the non-finite policy."""
        total, run = self._h.skips()
        z = None if skipped or not math.isfinite(loss) else self.spikes.observe(loss)
        r = StepResult(loss, grad_norm, lr, tokens=tokens, skipped=skipped, skipped_steps=total,
                       spike=self.spikes.is_spike(z), loss_z=z)
        step = self.step_count               # steps done: a skip did not add one
        if r.spike:
            d = self.spikes
            log.warning("step %d: loss spike %.4g (z = %.1f against the last %d losses: mean "
                        "%.4g, std %.3g)", step, loss, z, d.last_n, d.last_mean, d.last_std)
        if skipped and tokens == 0:
            log.warning("step %d skipped: every target of the batch is ignored (no tokens); "
                        "%d steps skipped in all", step + 1, total)
        elif skipped:
            log.warning("step %d skipped: non-finite gradient norm %s (loss %s); %d in a row, "
                        "%d in all", step + 1, grad_norm, loss, run, total)
            if self.max_skipped_steps is not None and run >= self.max_skipped_steps:
                raise self._nonfinite_error(r, run)
        return r

    def _nonfinite_error(self, r: StepResult, run: int) -> FloatingPointError:
        step = self.step_count + 1
        bad = self.model.nonfinite_params()
        where = (f"{len(bad)} parameter tensor(s) hold NaN or Inf (first: {bad[0]}), so every "
                 f"later step would be skipped too: restore a checkpoint" if bad else
                 "the weights are finite: the batches or the learning rate made the gradients "
                 "overflow")
        e = FloatingPointError(
            f"step {step}: {run} updates in a row skipped for a non-finite gradient norm (last: "
            f"loss {r.loss}, grad_norm {r.grad_norm}); {where}. The weights, AdamW state and "
            f"step count are as they were after step {step - 1}; {r.skipped_steps} steps "
            f"skipped in all. Lower lr, check the data, or raise max_skipped_steps (None: never "
            f"raise).")
        e.step, e.result = step, r
        return e

    def fit(self, train, val=None, **kw) -> list:
        """Train with evaluation, checkpoints and a metrics log (see smedjan.loop.fit)."""
        from .loop import fit
        return fit(self, train, val, **kw)

    def optimizer_step(self) -> Tuple[float, float]:
        """Clip and update from the gradients already accumulated in the
        model (after model.loss(..., backward=True) calls); zeroes them.
        Returns (grad_norm, lr). A non-finite norm skips the update, as in
        step(), under the same policy."""
        grad_norm, lr, skipped = self._h.step()
        if skipped:
            total, run = self._h.skips()
            log.warning("step %d skipped: non-finite gradient norm %s; %d in a row, %d in all",
                        self.step_count + 1, grad_norm, run, total)
            if self.max_skipped_steps is not None and run >= self.max_skipped_steps:
                raise self._nonfinite_error(
                    StepResult(math.nan, grad_norm, lr, skipped=True, skipped_steps=total), run)
        return grad_norm, lr
