"""smedjan.Trainer: an optimizer (AdamW, Lion, SGD, Adafactor or Muon, as
torch.optim and lion-pytorch define them) with per-tensor parameter groups,
a warm-up + cosine schedule and global gradient-norm clipping, all in the
engine over the flat buffers; the non-finite policy (skip, count, raise
after too many in a row) and a loss spike detector around it."""
from __future__ import annotations

import collections
import fnmatch
import logging
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

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


#: Each optimizer's settings and their defaults: torch.optim's names and
#: values (Lion: lion-pytorch's). lr, weight_decay, betas and eps are the
#: Trainer's own keyword arguments; None there means the optimizer's default.
#: Muon updates the hidden matrices; its AdamW part (embedding, head, norms)
#: takes adamw_lr, adamw_betas and adamw_eps.
OPTIMIZERS: Dict[str, dict] = {
    "adamw": dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8),
    "lion": dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.99)),
    "sgd": dict(lr=1e-3, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False),
    "adafactor": dict(lr=1e-2, weight_decay=0.0, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0),
    "muon": dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
                 adjust_lr_fn=None, adamw_lr=3e-4, adamw_betas=(0.9, 0.95), adamw_eps=1e-8),
}
F32_EPS = float(np.finfo(np.float32).eps)   # Adafactor's eps1 when None, as torch's
#: How the optimizer state is stored (Trainer's optim_state_dtype)
STATE_DTYPES = ("fp32", "bf16", "8bit")


def optimizer_settings(optimizer: str, **given) -> dict:
    """The optimizer's settings: its defaults with the given ones (None:
    the default) laid over, checked by name.

    >>> optimizer_settings("sgd", lr=0.1, momentum=0.9)["nesterov"]
    False
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    known = OPTIMIZERS[optimizer]
    unknown = sorted(k for k, v in given.items() if k not in known and v is not None)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a setting of {optimizer} (its settings: "
                         f"{', '.join(known)})")
    out = {k: (given[k] if given.get(k) is not None else v) for k, v in known.items()}
    if optimizer == "adafactor" and given.get("eps") is not None:
        eps = given["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"eps for adafactor is (eps1 or None, eps2), got {eps!r}")
        out["eps"] = (eps[0], eps[1])
    for key in ("betas", "adamw_betas"):
        if key in out:
            b = out[key]
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise ValueError(f"{key} must be a pair (beta1, beta2), got {b!r}")
            out[key] = (float(b[0]), float(b[1]))
    if "ns_coefficients" in out:
        c = out["ns_coefficients"]
        if not (isinstance(c, (tuple, list)) and len(c) == 3):
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {c!r}")
        out["ns_coefficients"] = tuple(float(v) for v in c)
    if out.get("adjust_lr_fn") not in (None, "original", "match_rms_adamw"):
        raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got "
                         f"{out['adjust_lr_fn']!r}")
    if "nesterov" in out:
        out["nesterov"] = bool(out["nesterov"])
    return out


def _engine_settings(optimizer: str, s: dict) -> dict:
    """The engine Optimizer's keyword arguments for resolved settings."""
    kw = dict(kind=optimizer, weight_decay=s["weight_decay"])
    if optimizer in ("adamw", "lion"):
        kw.update(beta1=s["betas"][0], beta2=s["betas"][1])
    if optimizer == "adamw":
        kw["eps"] = s["eps"]
    if optimizer in ("sgd", "muon"):
        kw.update(momentum=s["momentum"], nesterov=s["nesterov"])
    if optimizer == "sgd":
        kw["dampening"] = s["dampening"]
    if optimizer == "adafactor":
        eps1, eps2 = s["eps"]
        kw.update(beta2_decay=s["beta2_decay"], eps=F32_EPS if eps1 is None else eps1,
                  eps2=eps2, d=s["d"])
    if optimizer == "muon":
        a, b, c = s["ns_coefficients"]
        kw.update(ns_a=a, ns_b=b, ns_c=c, ns_eps=s["eps"], ns_steps=s["ns_steps"],
                  match_rms_adamw=s["adjust_lr_fn"] == "match_rms_adamw",
                  adamw_lr=s["adamw_lr"], beta1=s["adamw_betas"][0],
                  beta2=s["adamw_betas"][1], eps=s["adamw_eps"])
    return kw


def resolve_param_groups(names: Sequence[str], default_decay: Sequence[bool],
                         weight_decay: float, param_groups: Optional[Sequence[dict]] = None,
                         decay_embedding: bool = True) -> List[Tuple[float, float]]:
    """Each tensor's (lr_mult, weight_decay): by default lr_mult 1 and
    weight_decay on the matrices only (not on the norm gains; the embedding
    too unless decay_embedding is False); then each group, in order, sets
    lr_mult and/or weight_decay on the tensors whose names match its
    "params" glob (or any of a list of globs). A group that matches nothing
    is an error (a typo would otherwise be silent).

    >>> resolve_param_groups(["tok_emb", "final_norm"], [True, False], 0.1)
    [(1.0, 0.1), (1.0, 0.0)]
    """
    out = []
    for name, decays in zip(names, default_decay):
        decays = decays and (decay_embedding or name != "tok_emb")
        out.append([1.0, weight_decay if decays else 0.0])
    for i, g in enumerate(param_groups or []):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(f"param_groups[{i}] must be a dict with 'params' (a glob over "
                             f"parameter names), got {g!r}")
        extra = sorted(set(g) - {"params", "lr_mult", "weight_decay"})
        if extra:
            raise ValueError(f"param_groups[{i}]: unknown key(s) {', '.join(extra)} (known: "
                             "params, lr_mult, weight_decay)")
        globs = [g["params"]] if isinstance(g["params"], str) else list(g["params"])
        hits = [j for j, n in enumerate(names) if any(fnmatch.fnmatchcase(n, p) for p in globs)]
        if not hits:
            raise ValueError(f"param_groups[{i}]: {g['params']!r} matches no parameter (names "
                             f"look like {', '.join(names[:3])}, ...)")
        for key, col in (("lr_mult", 0), ("weight_decay", 1)):
            if key in g:
                v = g[key]
                if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                    raise ValueError(f"param_groups[{i}]: {key} must be a finite number >= 0, "
                                     f"got {v!r}")
                for j in hits:
                    out[j][col] = float(v)
    return [tuple(r) for r in out]


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """The schedule: linear from min_lr to lr over `warmup` steps, then cosine
    back to min_lr at step `steps - 1`."""
    return _C.lr_at(lr, min_lr, warmup, steps, step)


class Trainer:
    """Trains a Model one batch at a time.

    >>> m = Model("tiny"); tr = Trainer(m, lr=1e-3, steps=10)
    >>> x = np.random.randint(0, 8192, (2, 16)).astype(np.int32)
    >>> r = tr.step(x[:, :-1], x[:, 1:])

    optimizer: "adamw" (default), "lion", "sgd", "adafactor" or "muon", each
    as torch.optim defines it (Lion as lion-pytorch 0.2.5), with its own
    settings as keyword arguments under torch's names and defaults (see
    OPTIMIZERS): betas, eps (AdamW, Lion); momentum, dampening, nesterov
    (SGD); beta2_decay, eps=(eps1 or None, eps2), d (Adafactor); momentum,
    nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn (Muon, on the
    hidden 2-D matrices) with adamw_lr, adamw_betas, adamw_eps for the AdamW
    that updates its embedding, head and norm gains. lr, weight_decay, betas
    and eps left None take the optimizer's default. A setting the optimizer
    does not have is refused by name.

    >>> tr = Trainer(Model("tiny"), optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True)

    The schedule (warm-up from min_lr to lr, cosine back to min_lr at
    `steps`) scales every lr alike. Parameter groups: by default every
    matrix decays and the norm gains do not (decay_embedding=False spares
    the embedding too); param_groups, a list of {"params": glob over
    parameter names (or a list of globs), "lr_mult": x, "weight_decay": y},
    applied in order, overrides either setting for the tensors it matches,
    as torch's param groups do:

    >>> tr = Trainer(Model("tiny"), param_groups=[{"params": "layers.*.w_*", "lr_mult": 0.5}])

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
    > steps, steps < 1, grad_accum < 1, betas outside [0, 1), and each
    optimizer's own (momentum outside [0, 1), nesterov without momentum...).

    optim_state_dtype: how the elementwise state (moments, momenta) is
    stored, its math f32 either way: "fp32" (default); "bf16", rounded
    stochastically with a hash of (optim_state_seed, step, element), so
    that a run and its resume store the same bits on any thread count and
    on CPU and CUDA alike; "8bit", blockwise (256 elements, each block with
    an f32 absmax) coded by the dynamic map of Dettmers et al. 2021 (8-bit
    Adam's): signed for first moments and momenta, unsigned for second
    moments. Adafactor's statistics (a row and a column a matrix) stay fp32.

    >>> tr = Trainer(Model("tiny"), optim_state_dtype="8bit")

    Memory: before the optimizer state is allocated (AdamW 8 bytes a
    parameter, Lion and SGD with momentum 4, Adafactor a row and a column
    a matrix, Muon 4 a hidden-matrix parameter and 8 for the rest, plus its
    Newton-Schulz scratch; halved with bf16 state, 8-bit about a quarter:
    1 byte an element and 4 a block of 256), the Trainer's whole fixed memory (with the
    gradients, 4, and a 16-bit model's compute copy, 2) is checked against
    memory_limit and against what the device has available (host:
    MemAvailable or the cgroup's room; CUDA: free GPU memory); each step's
    activation arena likewise, when its shape first comes. What does not
    fit raises smedjan.OutOfMemoryError (a MemoryError) naming the bytes
    asked, the device and what is held, before anything is allocated: the
    process goes on, and a smaller Trainer or batch can follow.

    Non-finite steps: a step whose global gradient norm is NaN or infinite
    makes no update (weights, optimizer state and step_count stay as they
    were; the gradients are dropped) and is counted (StepResult.skipped,
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

    def __init__(self, model: Model, *, optimizer: str = "adamw", lr: Optional[float] = None,
                 min_lr: Optional[float] = None, warmup: int = 0, steps: int = 1000,
                 weight_decay: Optional[float] = None, clip: float = 1.0,
                 betas: Optional[Tuple[float, float]] = None, eps=None,
                 param_groups: Optional[List[dict]] = None, decay_embedding: bool = True,
                 grad_accum: int = 1,
                 gradient_checkpointing: Optional[bool] = None, fused_ce: Optional[bool] = None,
                 fp16_activations: Optional[bool] = None, memory_limit: Optional[int] = None,
                 cheap_recompute: Optional[bool] = None, sparse_loss: Optional[bool] = None,
                 label_bucket_sizes: Optional[Sequence[int]] = None,
                 max_skipped_steps: Optional[int] = 3,
                 spike_window: int = 100, spike_threshold: Optional[float] = 6.0,
                 optim_state_dtype: str = "fp32", optim_state_seed: int = 0,
                 **settings):
        if int(grad_accum) < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if max_skipped_steps is not None and int(max_skipped_steps) < 1:
            raise ValueError(f"max_skipped_steps must be >= 1 or None, got {max_skipped_steps}")
        if optim_state_dtype not in STATE_DTYPES:
            raise ValueError(f"optim_state_dtype must be one of {', '.join(STATE_DTYPES)}; got "
                             f"{optim_state_dtype!r}")
        opt = optimizer_settings(optimizer, lr=lr, weight_decay=weight_decay, betas=betas,
                                 eps=eps, **settings)
        self.grad_accum = int(grad_accum)
        clip = 0.0 if clip is None else clip
        self.max_skipped_steps = None if max_skipped_steps is None else int(max_skipped_steps)
        self.spikes = LossSpikes(spike_window, spike_threshold)
        model.set_levers(gradient_checkpointing=gradient_checkpointing, fused_ce=fused_ce,
                         memory_limit=memory_limit, fp16_activations=fp16_activations,
                         cheap_recompute=cheap_recompute, sparse_loss=sparse_loss,
                         label_bucket_sizes=label_bucket_sizes)
        self.model = model
        self.optimizer = optimizer
        self.settings = opt
        self.lr = opt["lr"]
        self.min_lr = self.lr / 10 if min_lr is None else min_lr
        self.warmup, self.steps, self.clip = warmup, steps, clip
        self.weight_decay, self.betas, self.eps = opt["weight_decay"], opt.get("betas"), opt.get("eps")
        self.param_groups = [dict(g) for g in param_groups or []]
        self.decay_embedding = bool(decay_embedding)
        self.optim_state_dtype, self.optim_state_seed = optim_state_dtype, int(optim_state_seed)
        tensors = model._h.tensors()
        groups = resolve_param_groups([t[0] for t in tensors], [bool(t[3]) for t in tensors],
                                      self.weight_decay, self.param_groups, self.decay_embedding)
        self._h = _C.Optimizer(model._h, lr=self.lr, min_lr=self.min_lr, warmup=warmup,
                               steps=steps, clip=clip, groups=groups,
                               state_dtype=optim_state_dtype, state_seed=self.optim_state_seed,
                               **_engine_settings(optimizer, opt))

    def hparams(self) -> dict:
        """The keyword arguments that rebuild this Trainer's optimization
        (`Trainer(model, **trainer.hparams())`; checkpoints save them)."""
        out = {"optimizer": self.optimizer, "min_lr": self.min_lr, "warmup": self.warmup,
               "steps": self.steps, "clip": self.clip, "param_groups": self.param_groups,
               "decay_embedding": self.decay_embedding,
               "optim_state_dtype": self.optim_state_dtype, "optim_state_seed": self.optim_state_seed}
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.settings.items()})
        return out

    def __repr__(self) -> str:
        own = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}"
                        for k, v in self.settings.items() if k not in ("lr", "weight_decay"))
        state = "" if self.optim_state_dtype == "fp32" else f" ({self.optim_state_dtype} state)"
        return (f"Trainer({self.optimizer}{state}, lr={self.lr:g} -> {self.min_lr:g} over {self.steps} steps "
                f"(warmup {self.warmup}), weight_decay={self.weight_decay:g}, clip={self.clip:g}"
                f"{', ' + own if own else ''}, step={self.step_count})")

    def optimizer_state(self) -> Dict[str, object]:
        """The optimizer's state buffers by name, each a flat view (NumPy
        on the CPU, DeviceTensor on CUDA) holding its tensors' state packed
        in parameter order: AdamW exp_avg, exp_avg_sq; Lion exp_avg; SGD
        (momentum > 0) momentum_buffer; Adafactor row_var, col_var (matrices'
        factors), variance (vectors'); Muon momentum_buffer (its matrices),
        exp_avg, exp_avg_sq (its AdamW part). The views hold the stored
        bits: float32; with bf16 state uint16 (bf16 bit patterns); with 8-bit
        state each buffer is two, NAME.q8 (uint8 codes, each tensor's run
        padded to whole blocks of 256) and NAME.scale (float32, a block's
        absmax). Fetch again after model.to()."""
        return {name: self._state(i) for i, name in enumerate(self._h.state_names())}

    def _state(self, which: int):
        s = self._h.state(which)
        return s if self.model.device == "cuda" else np.asarray(s)

    def _named_state(self, name: str):
        names = self._h.state_names()
        if name not in names:
            raise AttributeError(f"the {self.optimizer} optimizer keeps no {name} (its state: "
                                 f"{', '.join(names) or 'none'})")
        return self._state(names.index(name))

    @property
    def exp_avg(self):
        """AdamW's (or Lion's, or Muon's AdamW part's) first moment (a view:
        NumPy on the CPU, DeviceTensor on CUDA). Fetch it again after model.to()."""
        return self._named_state("exp_avg")

    @property
    def exp_avg_sq(self):
        """AdamW's second moment (see exp_avg)."""
        return self._named_state("exp_avg_sq")

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
        """Forward, backward, clip and update on one batch. With grad_accum=N
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
            f"loss {r.loss}, grad_norm {r.grad_norm}); {where}. The weights, optimizer state and "
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
