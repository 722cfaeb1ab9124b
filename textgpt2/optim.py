"""AdamW over the model's flat parameter buffer, gradient-norm clipping, and the learning-rate
schedule (linear warmup, then cosine decay).

The model keeps all parameters in one flat float32 CuPy buffer `model.params` (decayed tensors
first: `model.n_decay` elements) and its gradients in `model.grads` with the same layout, so a
step is two kernel launches over the whole model: ops.global_norm_squared, then
ops.adamw_update with the clip factor computed on the GPU from that norm. Nothing here waits
for the GPU; reading the gradient norm on the host (grad_norm) is the caller's choice, e.g.
only on logging steps.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from textgpt2 import ops
from textgpt2.device import require_gpu


# ---- learning-rate schedule ----------------------------------------------------------------

def _int(where, name, value, low, kind="argument"):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{where}: {kind} '{name}' must be an integer >= {low}, got {value!r}")
    return int(value)


def lr_schedule(step, max_steps, lr, min_lr, warmup):
    """Learning rate for the 0-based `step` of a run of `max_steps` steps.

    - warmup (step < warmup): lr * (step + 1) / warmup, so step 0 gets lr / warmup and step
      warmup - 1 gets lr;
    - then cosine decay from lr (at step == warmup) to min_lr (at step == max_steps):
      min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup) / (max_steps - warmup))) / 2;
    - min_lr from step max_steps on (a run extended past its schedule stays at min_lr).

    Requires integers step >= 0, max_steps >= 1, 0 <= warmup <= max_steps, and finite
    0 <= min_lr <= lr. Pure Python.
    """
    where = "lr_schedule"
    step = _int(where, "step", step, 0)
    max_steps = _int(where, "max_steps", max_steps, 1)
    warmup = _int(where, "warmup", warmup, 0)
    if warmup > max_steps:
        raise ValueError(f"{where}: argument 'warmup' ({warmup}) must not exceed 'max_steps' "
                         f"({max_steps})")
    lr = ops._real(where, "lr", lr, low=0.0)
    min_lr = ops._real(where, "min_lr", min_lr, low=0.0)
    if min_lr > lr:
        raise ValueError(f"{where}: argument 'min_lr' ({min_lr!r}) must not exceed 'lr' ({lr!r})")
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    ratio = (step - warmup) / (max_steps - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


# ---- AdamW -----------------------------------------------------------------------------------

def _hyperparameters(where, lr, betas, eps, weight_decay, max_norm, kind="argument"):
    """Validated (lr, (beta1, beta2), eps, weight_decay, max_norm); max_norm None or 0 -> None
    (no clipping)."""
    lr = ops._real(where, "lr", lr, low=0.0, kind=kind)
    if (isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2):
        raise ValueError(f"{where}: {kind} 'betas' must be a pair (beta1, beta2), got {betas!r}")
    b1 = ops._real(where, "betas[0]", betas[0], low=0.0, high=1.0, high_open=True, kind=kind)
    b2 = ops._real(where, "betas[1]", betas[1], low=0.0, high=1.0, high_open=True, kind=kind)
    eps = ops._real(where, "eps", eps, low=0.0, low_open=True, kind=kind)
    weight_decay = ops._real(where, "weight_decay", weight_decay, low=0.0, kind=kind)
    if max_norm is not None:
        max_norm = ops._real(where, "max_norm", max_norm, low=0.0, kind=kind) or None
    return lr, (b1, b2), eps, weight_decay, max_norm


_STATE_KEYS = ("m", "v", "step")
_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "max_norm")


def check_state_dict(state, n_params):
    """Validate an AdamW.state_dict() (as loaded from a checkpoint) against a model with
    `n_params` parameters; returns a normalized copy (m, v float32 arrays of shape (n_params,),
    step int, and whichever hyperparameters are present). Raises TypeError / ValueError saying
    what is wrong. Needs no GPU."""
    where = "AdamW.load_state_dict"
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: expected a dict from AdamW.state_dict(), got "
                        f"{type(state).__name__}")
    unknown = sorted(str(k) for k in state if k not in _STATE_KEYS + _HYPER_KEYS)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(f"{where}: unexpected key(s) {shown}; expected {', '.join(_STATE_KEYS)} "
                         f"and optionally {', '.join(_HYPER_KEYS)}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(repr(k) for k in missing)}")
    out = {}
    for name in ("m", "v"):
        a = state[name]
        if hasattr(a, "get") and not isinstance(a, np.ndarray):  # a CuPy array
            a = a.get()
        a = np.asarray(a)
        if a.dtype.kind != "f":
            raise TypeError(f"{where}: key '{name}' must be a floating-point array, got dtype "
                            f"{a.dtype}")
        if a.shape != (n_params,):
            raise ValueError(f"{where}: key '{name}' has shape {a.shape}, expected ({n_params},) "
                             "(the model's parameter count): the checkpoint is of another model")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{where}: key '{name}' contains NaN or infinite values")
        out[name] = a
    if np.any(out["v"] < 0):
        raise ValueError(f"{where}: key 'v' (second moment) contains negative values")
    out["step"] = _int(where, "step", state["step"], 0, kind="key")
    if out["step"] >= 2**31 - 1:
        raise ValueError(f"{where}: key 'step' must be < 2**31 - 1, got {out['step']}")
    hyper = {k: state[k] for k in _HYPER_KEYS if k in state}
    if hyper:
        defaults = dict(lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, max_norm=None)
        defaults.update(hyper)
        lr, betas, eps, wd, max_norm = _hyperparameters(where, kind="key", **defaults)
        checked = dict(lr=lr, betas=betas, eps=eps, weight_decay=wd, max_norm=max_norm)
        out.update({k: checked[k] for k in hyper})
    return out


class AdamW:
    """AdamW (decoupled weight decay) with global-norm gradient clipping over a model's flat
    buffers.

    model: any object with `params` and `grads` (1-D float32 CuPy arrays of one size) and
    `n_decay` (the first n_decay parameters get weight decay; biases, layernorm weights etc.
    after them get none). The buffers are read from the model at every step.
    max_norm: clip the global gradient norm to this (None or 0: no clipping; the norm is still
    computed and returned).

    State: `m`, `v` (CuPy float32, zeros at start) and `step_count` (steps taken; the next
    step's bias correction uses step_count + 1).
    """

    def __init__(self, model, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_norm=1.0):
        (self.lr, self.betas, self.eps, self.weight_decay,
         self.max_norm) = _hyperparameters("AdamW", lr, betas, eps, weight_decay, max_norm)
        self.model = model
        params, _, _ = self._buffers(expect_size=None)
        cp = require_gpu("textgpt2.optim.AdamW")
        self.m = cp.zeros_like(params)
        self.v = cp.zeros_like(params)
        self.step_count = 0
        # Persistent so a step allocates nothing (and can be captured in a CUDA graph).
        self._norm_sq = cp.zeros(1, dtype=np.float32)
        self._scratch = cp.empty(ops.global_norm_scratch_size(params.size), dtype=np.float32)

    def _buffers(self, expect_size):
        where = "AdamW"
        for attr in ("params", "grads", "n_decay"):
            if not hasattr(self.model, attr):
                raise TypeError(f"{where}: the model has no attribute '{attr}' (expected a model "
                                "with flat 'params'/'grads' buffers and 'n_decay')")
        params, grads, n_decay = self.model.params, self.model.grads, self.model.n_decay
        ops._check_array(where, "model.params", params, dtypes=(np.float32,), ndim=1)
        ops._check_array(where, "model.grads", grads, dtypes=(np.float32,), shape=params.shape)
        n = params.size
        if (not isinstance(n_decay, (int, np.integer)) or isinstance(n_decay, bool)
                or not 0 <= n_decay <= n):
            raise ValueError(f"{where}: argument 'model.n_decay' must be an integer in [0, {n}] "
                             f"(the size of model.params), got {n_decay!r}")
        if expect_size is not None and n != expect_size:
            raise ValueError(f"{where}: model.params has {n} elements but the optimizer state "
                             f"has {expect_size}: the model's buffers were replaced by ones of "
                             "another size")
        return params, grads, int(n_decay)

    def step(self, lr=None):
        """One optimizer step with learning rate `lr` (default: self.lr), queued on the current
        stream. Returns the squared global gradient norm (before clipping) as a 1-element
        float32 CuPy array, without synchronizing; it is a buffer the next step() overwrites,
        so read it (grad_norm(x)) or copy it before then."""
        lr = self.lr if lr is None else lr
        params, grads, n_decay = self._buffers(expect_size=self.m.size)
        t = self.step_count + 1
        ops.global_norm_squared(grads, out=self._norm_sq, scratch=self._scratch)
        clip = self.max_norm is not None
        ops.adamw_update(params, grads, self.m, self.v, lr, t, beta1=self.betas[0],
                         beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                         n_decay=n_decay, norm_sq=self._norm_sq if clip else None,
                         max_norm=self.max_norm if clip else 1.0)
        self.step_count = t
        return self._norm_sq

    def state_dict(self):
        """{"m", "v": float32 NumPy arrays, "step": int, "lr", "betas", "eps", "weight_decay",
        "max_norm"} (copies; this synchronizes with the GPU)."""
        return {"m": self.m.get(), "v": self.v.get(), "step": int(self.step_count),
                "lr": self.lr, "betas": tuple(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "max_norm": self.max_norm}

    def load_state_dict(self, state):
        """Restore m, v, step and the hyperparameters present in `state` (as PyTorch does; set
        e.g. `opt.lr` afterwards to override). Everything is checked (check_state_dict) before
        anything changes."""
        s = check_state_dict(state, self.m.size)
        self.m.set(s["m"])
        self.v.set(s["v"])
        self.step_count = s["step"]
        for k in _HYPER_KEYS:
            if k in s:
                setattr(self, k, s[k])


def grad_norm(norm_sq):
    """The gradient norm as a Python float from a squared norm returned by AdamW.step or
    ops.global_norm_squared (a 1-element CuPy array; NumPy arrays and numbers work too).
    Reading a device array synchronizes with its stream: call it on logging steps only."""
    if isinstance(norm_sq, (int, float, np.ndarray, np.generic)):
        a = np.asarray(norm_sq, dtype=np.float64)
    else:
        a = np.asarray(norm_sq.get(), dtype=np.float64)
    if a.size != 1:
        raise ValueError(f"grad_norm: expected a 1-element squared norm, got shape {a.shape}")
    return float(np.sqrt(a.reshape(-1)[0]))
