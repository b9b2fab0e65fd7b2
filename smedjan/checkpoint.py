"""Checkpoints: everything needed to continue a run, in one safetensors file.

Tensors: the weights under our names ("tok_emb", "layers.3.wq", ...) and, for
training checkpoints, the optimizer's state buffers as flat tensors
"optim.<name>" in the bits they are kept in (AdamW: optim.exp_avg,
optim.exp_avg_sq, F32, or BF16 with bf16 state; with 8-bit state
optim.exp_avg.q8 (U8) and optim.exp_avg.scale (F32), ...; see
Trainer.optimizer_state). Metadata (all strings, see docs/formats.md):
format, format_version, config (JSON), step, trainer (JSON: the optimizer,
its settings and the schedule; no "optimizer" key means AdamW),
train_state (JSON: the Trainer's skip counts and loss-spike window), rng /
loader / extra (JSON, when given), and one crc32:<name> per tensor. Files are written atomically: a crash or error
never leaves a half checkpoint under the real name.

>>> import tempfile, os, smedjan
>>> m = smedjan.Model("tiny", seed=0, vocab_size=256)
>>> p = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
>>> save_checkpoint(p, m, step=0)
>>> model_from_checkpoint(p).config == m.config
True
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import numpy as np

from .config import Config
from .io import load_safetensors, save_safetensors, to_float32

FORMAT = "smedjan-checkpoint"
WEIGHTS_FORMAT = "smedjan-weights"
FORMAT_VERSION = "1"
OPTIM = "optim."
EXP_AVG = OPTIM + "exp_avg"
EXP_AVG_SQ = OPTIM + "exp_avg_sq"


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint. `tensors` are zero-copy views of the file;
    `trainer` holds the Trainer keyword arguments it was saved with
    (`Trainer(model, **ckpt.trainer)` rebuilds it), or None for weights."""
    path: str
    config: Config
    tensors: Dict[str, np.ndarray]
    metadata: Dict[str, str]
    step: Optional[int] = None
    trainer: Optional[Dict[str, Any]] = None
    train_state: Optional[dict] = None
    rng: Optional[dict] = None
    loader: Optional[dict] = None
    extra: Optional[dict] = None

    @property
    def has_optimizer(self) -> bool:
        return self.trainer is not None

    @property
    def optimizer(self) -> Optional[str]:
        """The optimizer the state is for (None: a weights-only checkpoint)."""
        return None if self.trainer is None else self.trainer.get("optimizer", "adamw")

    @property
    def optimizer_state(self) -> Dict[str, np.ndarray]:
        """The optimizer's state buffers by name (without "optim.")."""
        return {k[len(OPTIM):]: v for k, v in self.tensors.items() if k.startswith(OPTIM)}


def _weights_and_meta(model, fmt: str) -> tuple:
    from . import __version__
    # np.asarray: a zero-copy view on CPU, a host copy of a GPU model's tensor.
    tensors = {name: np.asarray(view) for name, view in model.params.items()}
    meta = {"format": fmt, "format_version": FORMAT_VERSION,
            "config": json.dumps(model.config.to_dict(), sort_keys=True),
            "smedjan_version": __version__}
    return tensors, meta


def save_checkpoint(path, model, trainer=None, *, step: int, rng_state: Optional[dict] = None,
                    loader_state: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    """Write weights, optimizer state (when a Trainer is given), step,
    trainer hyper-parameters and the JSON-able rng / loader / extra states.

    >>> # save_checkpoint("run/ckpt.safetensors", model, trainer, step=1000,
    >>> #                 loader_state=batches.state_dict())
    """
    if trainer is not None and trainer.model is not model:
        raise ValueError("save_checkpoint: the trainer belongs to a different model")
    if int(step) < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    tensors, meta = _weights_and_meta(model, FORMAT)
    meta["step"] = str(int(step))
    dtypes = {}
    if trainer is not None:
        for name, view in trainer.optimizer_state().items():
            tensors[OPTIM + name] = np.asarray(view)
            if tensors[OPTIM + name].dtype == np.uint16:   # bf16 state's bits
                dtypes[OPTIM + name] = "BF16"
        meta["trainer"] = json.dumps(trainer.hparams(), sort_keys=True)
        meta["train_state"] = json.dumps(trainer.state_dict(), sort_keys=True)
    for key, value in (("rng", rng_state), ("loader", loader_state), ("extra", extra)):
        if value is not None:
            try:
                meta[key] = json.dumps(value, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise TypeError(f"save_checkpoint: {key} state is not JSON-serialisable: {e}") from None
    save_safetensors(path, tensors, meta, dtypes=dtypes)


def save_weights(path, model) -> None:
    """Weights and config only (for inference and export), atomically."""
    tensors, meta = _weights_and_meta(model, WEIGHTS_FORMAT)
    save_safetensors(path, tensors, meta)


def _json_field(path: str, meta: Dict[str, str], key: str, required: bool = False):
    if key not in meta:
        if required:
            raise ValueError(f"{path}: checkpoint metadata has no '{key}'")
        return None
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: checkpoint metadata '{key}' is not valid JSON ({e})") from None


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint (training or weights-only).

    FileNotFoundError/OSError names a missing file; ValueError names the
    file (and the tensor) when it is truncated, corrupt (CRC), not a smedjan
    checkpoint, of an unknown version, or inconsistent with its config."""
    p = os.fspath(path)
    tensors, meta = load_safetensors(p)
    fmt = meta.get("format")
    if fmt not in (FORMAT, WEIGHTS_FORMAT):
        raise ValueError(f"{p}: not a smedjan checkpoint (metadata format is {fmt!r}, expected "
                         f"'{FORMAT}' or '{WEIGHTS_FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: checkpoint format_version {meta.get('format_version')!r}; this "
                         f"smedjan reads version {FORMAT_VERSION}")
    cfg = _json_field(p, meta, "config", required=True)
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(Config)}) \
        if isinstance(cfg, dict) else []
    if unknown:
        raise ValueError(f"{p}: the checkpoint's model uses {', '.join(map(repr, unknown))}, which "
                         "this build of smedjan does not know (a newer smedjan wrote it?)")
    try:
        config = Config(**cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: checkpoint config is invalid: {e}") from None
    step = None
    if "step" in meta:
        try:
            step = int(meta["step"])
        except ValueError:
            raise ValueError(f"{p}: checkpoint step {meta['step']!r} is not an integer") from None
    trainer = _json_field(p, meta, "trainer")
    if trainer is not None and "betas" in trainer:
        trainer["betas"] = tuple(trainer["betas"])
    ck = Checkpoint(path=p, config=config, tensors=tensors, metadata=meta, step=step,
                    trainer=trainer, train_state=_json_field(p, meta, "train_state"),
                    rng=_json_field(p, meta, "rng"),
                    loader=_json_field(p, meta, "loader"), extra=_json_field(p, meta, "extra"))
    if ck.optimizer == "adamw" and (EXP_AVG in tensors) != (EXP_AVG_SQ in tensors):
        raise ValueError(f"{p}: checkpoint holds only one of {EXP_AVG}, {EXP_AVG_SQ}")
    return ck


def _describe(optimizer: str, settings: dict) -> str:
    keys = ("momentum",) if optimizer == "sgd" else ()
    state = settings.get("optim_state_dtype", "fp32")
    return optimizer + "".join(f" {k}={settings.get(k)}" for k in keys) + \
        ("" if state == "fp32" else f" ({state} state)")


#: the file dtype of an optimizer state view's dtype (NumPy's, or a DeviceTensor's name)
_STATE_FILE_DTYPES = {"float32": "F32", "uint16": "BF16", "bfloat16": "BF16", "uint8": "U8"}


def restore(checkpoint: Checkpoint, model, trainer=None, *, reset_optimizer: bool = False) -> None:
    """Copy a checkpoint into a model's parameter views (and a trainer's
    optimizer state, step count and state_dict: skip counts, loss-spike
    window). Every tensor is checked before anything is copied, so a
    mismatch leaves the model as it was. A checkpoint of another optimizer,
    or of settings that shape the state otherwise (SGD with and without
    momentum, another optim_state_dtype), is refused naming both, unless
    reset_optimizer: then the
    trainer keeps its fresh state and takes the step count and the rest."""
    ck = checkpoint
    p = ck.path
    if model.config != ck.config:
        raise ValueError(f"{p}: checkpoint config {ck.config} does not match the model's {model.config}")
    plan = []
    for name, view in model.params.items():
        if name not in ck.tensors:
            raise ValueError(f"{p}: tensor '{name}' is missing from the checkpoint")
        src = ck.tensors[name]
        if tuple(src.shape) != tuple(view.shape):
            raise ValueError(f"{p}: tensor '{name}' has shape {tuple(src.shape)}, the model "
                             f"expects {tuple(view.shape)}")
        st = ck.tensors.dtypes.get(name, "F32") if hasattr(ck.tensors, "dtypes") else "F32"
        try:
            plan.append((view, to_float32(src, st)))
        except ValueError:
            raise ValueError(f"{p}: tensor '{name}' has dtype {st}, expected a float type") from None
    unknown = sorted(n for n in set(ck.tensors) - set(model.params) if not n.startswith(OPTIM))
    if unknown:
        raise ValueError(f"{p}: unexpected tensors in the checkpoint: {', '.join(unknown[:5])}")
    if trainer is not None:
        if trainer.model is not model:
            raise ValueError("restore: the trainer belongs to a different model")
        if not ck.has_optimizer:
            raise ValueError(f"{p}: weights-only checkpoint: no optimizer state to restore")
        if ck.step is None:
            raise ValueError(f"{p}: checkpoint has no step")
        state = trainer.optimizer_state()
        theirs = ck.optimizer_state
        if not reset_optimizer:
            their_dtype = ck.trainer.get("optim_state_dtype", "fp32")
            if ck.optimizer != trainer.optimizer or set(state) != set(theirs) or \
                    their_dtype != trainer.optim_state_dtype:
                raise ValueError(
                    f"{p}: the checkpoint's optimizer state is {_describe(ck.optimizer, ck.trainer)} "
                    f"({', '.join(sorted(theirs)) or 'no buffers'}), this Trainer's is "
                    f"{_describe(trainer.optimizer, trainer.settings)} "
                    f"({', '.join(sorted(state)) or 'no buffers'}); pass reset_optimizer=True "
                    f"(--reset-optimizer) to start the {trainer.optimizer} state afresh")
            for name, dst in state.items():
                src, dtype = theirs[name], ck.tensors.dtypes.get(OPTIM + name)
                want = _STATE_FILE_DTYPES[str(dst.dtype)]
                if src.shape != dst.shape or dtype != want:
                    raise ValueError(f"{p}: tensor '{OPTIM + name}' is {dtype} "
                                     f"{tuple(src.shape)}, expected {want} {tuple(dst.shape)}")
                plan.append((dst, src))
    for dst, src in plan:
        dst[...] = src
    if trainer is not None:
        trainer.step_count = ck.step
        trainer.load_state_dict(ck.train_state or {})   # none in older checkpoints: zero


def model_from_checkpoint(path, *, seed: int = 0):
    """A Model built from a checkpoint's config, with its weights.

    >>> # model = model_from_checkpoint("run/ckpt.safetensors")
    """
    from .model import Model
    ck = load_checkpoint(path)
    m = Model(ck.config, seed=seed)
    restore(ck, m)
    return m


__all__ = ["Checkpoint", "save_checkpoint", "save_weights", "load_checkpoint", "restore",
           "model_from_checkpoint", "FORMAT", "WEIGHTS_FORMAT", "FORMAT_VERSION"]
