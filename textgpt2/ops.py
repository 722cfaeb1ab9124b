"""One validated wrapper per CUDA launcher: the only caller of textgpt2._C.

Each wrapper checks its arguments (CuPy arrays on the current device, dtype, C-contiguity,
shapes that agree) and raises TypeError or ValueError naming the op and the argument, so no
input reaches a kernel that could read or write out of bounds. Outputs can be passed in
(preallocated buffers, as the training step does) or are allocated and returned.

Conventions (csrc/launchers.h): parameter gradients (dwte, dwpe, dweight, dbias) are
accumulated (+=); activation gradients are overwritten. Work is queued on `stream` (default: the
current CuPy stream) and not synchronized.
"""
from __future__ import annotations

import numpy as np

from textgpt2.device import extension, require_gpu

# storage dtype codes, as in csrc/common.cuh
_DTYPE_CODES = {np.dtype(np.float32): 0}
_FLOAT_DTYPES = tuple(_DTYPE_CODES)


# ---- argument checking -------------------------------------------------------------------

def _cp():
    return require_gpu("textgpt2.ops")


def _check_array(op, name, a, dtypes=_FLOAT_DTYPES, ndim=None, shape=None):
    """Check that `a` is a C-contiguous CuPy array on the current device with an allowed dtype
    and, if given, ndim and shape (None entries in shape match any size). Returns `a`."""
    if isinstance(a, np.ndarray):
        raise TypeError(f"{op}: argument '{name}' must be a CuPy array on the GPU, got a NumPy "
                        "(host) array; move it with cupy.asarray")
    cp = _cp()
    if not isinstance(a, cp.ndarray):
        raise TypeError(f"{op}: argument '{name}' must be a CuPy array on the GPU, got "
                        f"{type(a).__name__}")
    if a.dtype not in [np.dtype(d) for d in dtypes]:
        allowed = ", ".join(str(np.dtype(d)) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' has dtype {a.dtype}, expected {allowed}")
    if a.device.id != cp.cuda.Device().id:
        raise ValueError(f"{op}: argument '{name}' is on GPU {a.device.id}, but the current "
                         f"device is GPU {cp.cuda.Device().id}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: argument '{name}' must have {ndim} dimensions, got shape {a.shape}")
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != d for s, d in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: argument '{name}' has shape {a.shape}, expected {want}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: argument '{name}' must be C-contiguous (got strides {a.strides})")
    return a


def _check_same_dtype(op, **arrays):
    dtypes = {name: a.dtype for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: arguments must share one dtype, got {desc}")


def _out(op, name, a, shape, dtype):
    """An output buffer: allocate it if None, else check it (shape, dtype, contiguity)."""
    cp = _cp()
    if a is None:
        return cp.empty(shape, dtype=dtype)
    return _check_array(op, name, a, dtypes=(dtype,), shape=tuple(shape))


def _positive(op, name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{op}: '{name}' must be a positive integer, got {value!r}")
    return int(value)


def _stream(stream):
    return (stream if stream is not None else _cp().cuda.get_current_stream()).ptr


def _code(a):
    return _DTYPE_CODES[a.dtype]


# ---- residual ----------------------------------------------------------------------------

def residual_forward(a, b, out=None, stream=None):
    """out = a + b (same shape and dtype). `out` may be `a` or `b`."""
    op = "residual_forward"
    _check_array(op, "a", a)
    _check_array(op, "b", b, shape=a.shape)
    _check_same_dtype(op, a=a, b=b)
    out = _out(op, "out", out, a.shape, a.dtype)
    extension().residual_forward(out.data.ptr, a.data.ptr, b.data.ptr, a.size, _code(a),
                                 _stream(stream))
    return out


# ---- encoder -----------------------------------------------------------------------------
# (encoder_forward, encoder_backward)

# ---- layernorm ---------------------------------------------------------------------------
# (layernorm_forward, layernorm_backward)

# ---- feedforward -------------------------------------------------------------------------
# (bias_forward, bias_backward, gelu_forward, gelu_backward)

# ---- cross_entropy -----------------------------------------------------------------------
# (cross_entropy_forward_backward)

# ---- adamw -------------------------------------------------------------------------------
# (global_norm_squared, adamw_update)

# ---- attention ---------------------------------------------------------------------------
# (attention_forward, attention_backward)
