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

import itertools

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
# Helpers used here (_row_view_shape, _int32_size, _check_disjoint, _real) are defined further
# down; they are looked up at call time.

def _allocation_stream(stream):
    """Context that makes `stream` current while outputs and scratch are allocated: CuPy's pool
    keeps freed blocks per stream, so memory used on `stream` must come from `stream`'s arena
    (scratch is freed on return, while the kernels may still be queued)."""
    import contextlib
    return stream if stream is not None else contextlib.nullcontext()


def _scratch_buffer(op, scratch, need, dtype, stream):
    """Scratch of at least `need` elements of `dtype`, 256-byte aligned (the kernels make
    16-byte accesses into it): allocated on `stream` if None, else checked."""
    if scratch is None:
        with _allocation_stream(stream):
            return _cp().empty(max(int(need), 1), dtype=dtype)
    _check_array(op, "scratch", scratch, dtypes=(dtype,), ndim=1)
    if scratch.size < need:
        raise ValueError(f"{op}: argument 'scratch' has {scratch.size} elements, needs at least "
                         f"{need}")
    if scratch.data.ptr % 256:
        raise ValueError(f"{op}: argument 'scratch' must be 256-byte aligned")
    return scratch


def _encoder_sizes(op, idx, table, table_name):
    """(B, T, V, C) from idx (B, T) and a (V, C) table, all positive and int32-sized."""
    _check_array(op, "idx", idx, dtypes=(np.int32,), ndim=2)
    _check_array(op, table_name, table, ndim=2)
    B, T = idx.shape
    V, C = table.shape
    for name, value in (("B", B), ("T", T)):
        if value <= 0:
            raise ValueError(f"{op}: argument 'idx' has shape {idx.shape}; {name} must be positive")
    if V <= 0 or C <= 0:
        raise ValueError(f"{op}: argument '{table_name}' has shape {table.shape}; both "
                         "dimensions must be positive")
    _int32_size(op, f"the rows of '{table_name}'", V)
    _int32_size(op, f"the columns of '{table_name}'", C)
    return B, T, V, C


def _position_table(op, name, table, T, C, dtype_of):
    _check_array(op, name, table, ndim=2)
    if table.shape[1] != C:
        raise ValueError(f"{op}: argument '{name}' has shape {table.shape}, expected (*, {C}) "
                         f"(C = {C} channels)")
    if T > table.shape[0]:
        raise ValueError(f"{op}: sequence length T = {T} (from 'idx') exceeds the "
                         f"{table.shape[0]} rows of '{name}'")
    _check_same_dtype(op, **dtype_of, **{name: table})


def encoder_forward(idx, wte, wpe, out=None, stream=None):
    """out[b, t, :] = wte[idx[b, t], :] + wpe[t, :].

    idx (B, T) int32; wte (V, C) (V: all its rows, padded ones included); wpe (maxT, C) with
    T <= maxT; out (B, T, C). An id outside [0, V) writes NaN over its out row (never a read
    outside wte). `out` must not overlap the inputs. Returns out."""
    op = "encoder_forward"
    B, T, V, C = _encoder_sizes(op, idx, wte, "wte")
    _position_table(op, "wpe", wpe, T, C, {"wte": wte})
    _int32_size(op, "B*T", B * T)
    with _allocation_stream(stream):
        out = _out(op, "out", out, (B, T, C), wte.dtype)
    _check_disjoint(op, out=out, idx=idx, wte=wte, wpe=wpe)
    extension().encoder_forward(out.data.ptr, idx.data.ptr, wte.data.ptr, wpe.data.ptr, B, T, C,
                                V, _code(wte), _stream(stream))
    return out


def encoder_backward_scratch_size(B, T, C, V):
    """int32 elements of scratch that encoder_backward needs: a counter and a bucket of 16 per
    vocabulary id, and per-position lists for chunks of up to 16384 positions. Its contents
    between calls do not matter."""
    return int(extension().encoder_backward_scratch_size(int(B), int(T), int(C), int(V)))


def encoder_backward(dout, idx, dwte, dwpe, stream=None, scratch=None, plan=None):
    """Accumulates the embedding gradients: dwte[v] += sum of dout[b, t] over the (b, t) with
    idx[b, t] == v, dwpe[t] += sum over b of dout[b, t]. Bitwise reproducible (the ids are grouped
    with integer counts, then each row is summed in position order; no float atomics); dout is
    read about once. An id outside [0, V) contributes to dwpe only.

    dout (B, T, C); idx (B, T) int32; dwte (V, C); dwpe (maxT, C), T <= maxT; B*T <= 2**30.
    `scratch`: int32, at least encoder_backward_scratch_size(B, T, C, V) elements, 256-byte
    aligned (allocated if None; pass one to avoid an allocation per call, e.g. under CUDA-graph
    capture). `plan`: an EncoderPlan of these ids (encoder_backward_plan; idx must then be
    plan.idx): the grouping was done on the host, so only the backward kernel runs. The same bits
    either way. Returns (dwte, dwpe)."""
    op = "encoder_backward"
    B, T, V, C = _encoder_sizes(op, idx, dwte, "dwte")
    _check_array(op, "dout", dout, shape=(B, T, C))
    _check_same_dtype(op, dout=dout, dwte=dwte)
    _position_table(op, "dwpe", dwpe, T, C, {"dwte": dwte})
    if B * T > 2**30:
        raise ValueError(f"{op}: B*T = {B * T} positions exceeds the supported 2**30")
    ext = extension()
    scratch = _scratch_buffer(op, scratch, ext.encoder_backward_scratch_size(B, T, C, V),
                              np.int32, stream)
    plan_ptr = 0
    if plan is None:
        _check_disjoint(op, dwte=dwte, dwpe=dwpe, dout=dout, idx=idx, scratch=scratch)
    else:
        if not isinstance(plan, EncoderPlan):
            raise TypeError(f"{op}: argument 'plan' must be an EncoderPlan (made by "
                            f"encoder_backward_plan), got {type(plan).__name__}")
        if (plan.B, plan.T, plan.C, plan.V) != (B, T, C, V):
            raise ValueError(f"{op}: argument 'plan' was made for B={plan.B}, T={plan.T}, "
                             f"C={plan.C}, V={plan.V}; this call has B={B}, T={T}, C={C}, V={V}")
        if idx.data.ptr != plan.idx.data.ptr:
            raise ValueError(f"{op}: with a plan, 'idx' must be plan.idx (the ids it groups)")
        _check_disjoint(op, dwte=dwte, dwpe=dwpe, dout=dout, scratch=scratch, plan=plan.array)
        plan_ptr = plan.array.data.ptr
    ext.encoder_backward(dwte.data.ptr, dwpe.data.ptr, scratch.data.ptr, dout.data.ptr,
                         idx.data.ptr, plan_ptr, B, T, C, V, _code(dout), _stream(stream))
    return dwte, dwpe


class EncoderPlan:
    """encoder_backward's grouping of one (B, T) batch of token ids, made on the host and held on
    the GPU (make it with encoder_backward_plan). `idx` is the (B, T) int32 ids it groups, on the
    GPU: pass it as idx to encoder_backward (and to encoder_forward) with the plan. `array` is
    the whole plan, a CuPy int32 array."""

    def __init__(self, array, B, T, C, V):
        self.array, self.B, self.T, self.C, self.V = array, B, T, C, V
        self.idx = array[:B * T].reshape(B, T)

    def __repr__(self):
        return f"EncoderPlan(B={self.B}, T={self.T}, C={self.C}, V={self.V})"


def encoder_backward_plan_size(B, T, C):
    """int32 elements of an encoder_backward plan of (B, T) ids for C channels."""
    return int(extension().encoder_backward_plan_size(int(B), int(T), int(C)))


_PLAN_FIELDS = ("Bc", "Tc", "ids", "region", "head", "run", "order", "long_keys", "long_rows",
                "owners", "tile_done", "runs_past")


def encoder_backward_plan_layout(B, T, C):
    """Where a plan keeps what (for tests and debugging): the chunk shape Bc, Tc, the offset of
    the first chunk's region and the size of each region (int32 elements; the ids come first),
    and the offsets of the parts within a region (see csrc/encoder.cu)."""
    out = np.zeros(len(_PLAN_FIELDS), dtype=np.int64)
    extension().encoder_backward_plan_layout(out.ctypes.data, int(B), int(T), int(C))
    return dict(zip(_PLAN_FIELDS, (int(x) for x in out)))


def encoder_backward_plan_host(ids, C, V):
    """The plan encoder_backward_plan uploads, as a NumPy int32 array (host only; no GPU needed).

    Per chunk of positions (up to 16 sequences and 16384 positions) a stable radix sort by id
    gives the positions in (id, position) order; from it, each position's run (where its id's
    positions start in that order, and how many there are), the list of the runs longer than 16
    positions, and the tiles of 32 list entries where such a run goes on into the next tile. The
    first B*T elements are the ids themselves. 0.15-0.3 ms of CPU for 16 x 1024 ids."""
    op = "encoder_backward_plan"
    if not isinstance(ids, np.ndarray):
        raise TypeError(f"{op}: argument 'ids' must be a NumPy (host) integer array, got "
                        f"{type(ids).__name__} (the plan is made on the host)")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{op}: argument 'ids' must hold integers, got dtype {ids.dtype}")
    if ids.ndim != 2 or ids.size == 0:
        raise ValueError(f"{op}: argument 'ids' must have shape (B, T) with B, T > 0, got "
                         f"{ids.shape}")
    B, T = ids.shape
    _positive(op, "C", C)
    _positive(op, "V", V)
    _int32_size(op, "V", V)
    if B * T > 2**30:
        raise ValueError(f"{op}: B*T = {B * T} positions exceeds the supported 2**30")
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{op}: ids[{b}, {t}] = {int(ids[b, t])} is outside [0, V = {V})")
    ids32 = np.ascontiguousarray(ids, dtype=np.int32)
    ext = extension()
    plan = np.empty(ext.encoder_backward_plan_size(B, T, int(C)), dtype=np.int32)
    ext.encoder_backward_plan(plan.ctypes.data, ids32.ctypes.data, B, T, int(C), int(V))
    return plan


def encoder_backward_plan(ids, C, V, out=None, stream=None):
    """Group (B, T) token ids (a NumPy integer array, each in [0, V)) for encoder_backward on the
    host, as llm.c does, and copy the plan to the GPU (an asynchronous copy on `stream`; from
    pageable memory it returns once the host data is staged). C: channels; V: rows of dwte.
    `out`: an EncoderPlan of the same B, T, C, V to refill (its buffers keep their addresses, so a
    captured CUDA graph can use it). Returns the EncoderPlan; its .idx holds the ids."""
    op = "encoder_backward_plan"
    host = encoder_backward_plan_host(ids, C, V)
    B, T = ids.shape
    cp = _cp()
    if out is None:
        with _allocation_stream(stream):
            out = EncoderPlan(cp.empty(host.size, dtype=np.int32), B, T, int(C), int(V))
    elif not isinstance(out, EncoderPlan):
        raise TypeError(f"{op}: argument 'out' must be an EncoderPlan, got {type(out).__name__}")
    elif (out.B, out.T, out.C, out.V) != (B, T, C, V):
        raise ValueError(f"{op}: argument 'out' is a plan for B={out.B}, T={out.T}, C={out.C}, "
                         f"V={out.V}, not B={B}, T={T}, C={C}, V={V}")
    out.array.set(host, stream=stream if stream is not None else cp.cuda.get_current_stream())
    return out


# ---- layernorm ---------------------------------------------------------------------------

def _layernorm_eps(op, eps):
    eps = _real(op, "eps", eps, low=0.0, low_open=True)
    if float(np.float32(eps)) <= 0.0:
        raise ValueError(f"{op}: argument 'eps' must be a finite number > 0.0 once rounded to "
                         f"float32, got {eps!r}")
    return float(np.float32(eps))


def layernorm_forward(x, weight, bias, eps=1e-5, out=None, mean=None, rstd=None, stream=None):
    """Layernorm over the last axis of x (..., C): mean, rstd = 1/sqrt(biased var + eps),
    out = (x - mean) * rstd * weight + bias. weight, bias (C,); eps > 0. mean and rstd
    (float32, shape x.shape[:-1]) are saved for layernorm_backward. Outputs must not overlap
    the inputs or each other. Returns (out, mean, rstd)."""
    op = "layernorm_forward"
    eps = _layernorm_eps(op, eps)
    _check_array(op, "x", x)
    N, C = _row_view_shape(op, "x", x)
    _check_array(op, "weight", weight, shape=(C,))
    _check_array(op, "bias", bias, shape=(C,))
    _check_same_dtype(op, x=x, weight=weight, bias=bias)
    with _allocation_stream(stream):
        out = _out(op, "out", out, x.shape, x.dtype)
        mean = _out(op, "mean", mean, x.shape[:-1], np.float32)
        rstd = _out(op, "rstd", rstd, x.shape[:-1], np.float32)
    _check_disjoint(op, out=out, mean=mean, rstd=rstd, x=x, weight=weight, bias=bias)
    extension().layernorm_forward(out.data.ptr, mean.data.ptr, rstd.data.ptr, x.data.ptr,
                                  weight.data.ptr, bias.data.ptr, N, C, eps, _code(x),
                                  _stream(stream))
    return out, mean, rstd


def layernorm_backward_scratch_size(N, C):
    """float32 elements of scratch that layernorm_backward needs for N rows of C."""
    return int(extension().layernorm_backward_scratch_size(int(N), int(C)))


def layernorm_backward(dout, x, weight, mean, rstd, dweight, dbias, dx=None, stream=None,
                       scratch=None):
    """Gradient of layernorm_forward: dx (x's shape) is overwritten with
    rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight, xhat = (x - mean) * rstd;
    dweight += sum of dout * xhat and dbias += sum of dout over all rows, bitwise reproducible
    (fixed-order two-stage reduction, no float atomics). mean, rstd: float32 from the forward.
    `scratch`: float32, at least layernorm_backward_scratch_size(N, C) elements, 256-byte aligned
    (allocated if None). dx must not overlap the inputs. Returns dx."""
    op = "layernorm_backward"
    _check_array(op, "x", x)
    N, C = _row_view_shape(op, "x", x)
    _check_array(op, "dout", dout, shape=x.shape)
    _check_array(op, "weight", weight, shape=(C,))
    _check_array(op, "mean", mean, dtypes=(np.float32,), shape=x.shape[:-1])
    _check_array(op, "rstd", rstd, dtypes=(np.float32,), shape=x.shape[:-1])
    _check_array(op, "dweight", dweight, shape=(C,))
    _check_array(op, "dbias", dbias, shape=(C,))
    _check_same_dtype(op, x=x, dout=dout, weight=weight, dweight=dweight, dbias=dbias)
    with _allocation_stream(stream):
        dx = _out(op, "dx", dx, x.shape, x.dtype)
    ext = extension()
    scratch = _scratch_buffer(op, scratch, ext.layernorm_backward_scratch_size(N, C),
                              np.float32, stream)
    _check_disjoint(op, dx=dx, dweight=dweight, dbias=dbias, scratch=scratch, dout=dout, x=x,
                    weight=weight, mean=mean, rstd=rstd)
    ext.layernorm_backward(dx.data.ptr, dweight.data.ptr, dbias.data.ptr, scratch.data.ptr,
                           dout.data.ptr, x.data.ptr, weight.data.ptr, mean.data.ptr,
                           rstd.data.ptr, N, C, _code(x), _stream(stream))
    return dx

# ---- feedforward -------------------------------------------------------------------------

def _int32_size(op, what, value):
    if value > 2**31 - 1:
        raise ValueError(f"{op}: {what} = {value} does not fit in int32")
    return int(value)


def _check_no_partial_overlap(op, out_name, out, in_name, a, allow_same=True):
    """`out` may be `a` itself (same pointer, shape and strides) if allow_same, and must not
    otherwise share memory with it: a shifted alias would let one thread overwrite values that
    another thread has yet to read."""
    if not _cp().may_share_memory(out, a):
        return
    same = out.data.ptr == a.data.ptr and out.shape == a.shape and out.strides == a.strides
    if allow_same and same:
        return
    rule = f"it may only be '{in_name}' itself" if allow_same else "they must not share memory"
    raise ValueError(f"{op}: argument '{out_name}' overlaps '{in_name}'; {rule}")


def _row_view_shape(op, name, x):
    """(N, C) of the row-wise view x.reshape(-1, C), C = x.shape[-1] (at least 1 dimension)."""
    if x.ndim == 0:
        raise ValueError(f"{op}: argument '{name}' must have at least 1 dimension, got shape ()")
    C = x.shape[-1]
    if C == 0:
        raise ValueError(f"{op}: argument '{name}' has shape {x.shape}; its last dimension must "
                         "be positive")
    return (_int32_size(op, f"the number of rows of '{name}'", x.size // C),
            _int32_size(op, f"the last dimension of '{name}'", C))


def bias_forward(x, bias, out=None, stream=None):
    """out = x + bias, bias broadcast over the rows of x (..., OC); bias (OC,). `out` may be `x`."""
    op = "bias_forward"
    _check_array(op, "x", x)
    N, OC = _row_view_shape(op, "x", x)
    _check_array(op, "bias", bias, shape=(OC,))
    _check_same_dtype(op, x=x, bias=bias)
    with _allocation_stream(stream):
        out = _out(op, "out", out, x.shape, x.dtype)
    _check_no_partial_overlap(op, "out", out, "x", x)
    _check_no_partial_overlap(op, "out", out, "bias", bias, allow_same=False)
    extension().bias_forward(out.data.ptr, x.data.ptr, bias.data.ptr, N, OC, _code(x),
                             _stream(stream))
    return out


def bias_backward_scratch_size(N, OC):
    """float32 elements of scratch that bias_backward needs for dout with N rows of OC."""
    return int(extension().bias_backward_scratch_size(int(N), int(OC)))


def bias_backward(dout, dbias, stream=None, scratch=None):
    """dbias += sum of dout (..., OC) over all leading axes: a two-stage fixed-order reduction,
    so the result is the same bits on every run. `scratch`: float32 buffer of at least
    bias_backward_scratch_size(N, OC) elements (allocated if None; pass one to avoid an
    allocation per call, e.g. under CUDA-graph capture). Returns dbias."""
    op = "bias_backward"
    _check_array(op, "dout", dout)
    N, OC = _row_view_shape(op, "dout", dout)
    _check_array(op, "dbias", dbias, shape=(OC,))
    _check_same_dtype(op, dout=dout, dbias=dbias)
    _check_no_partial_overlap(op, "dbias", dbias, "dout", dout, allow_same=False)
    ext = extension()
    need = ext.bias_backward_scratch_size(N, OC)
    if scratch is None:  # freed on return, kernels maybe still queued: take it from stream's pool
        with _allocation_stream(stream):
            scratch = _cp().empty(max(1, need), dtype=np.float32)
    else:
        _check_array(op, "scratch", scratch, dtypes=(np.float32,), ndim=1)
        if scratch.size < need:
            raise ValueError(f"{op}: argument 'scratch' has {scratch.size} elements, needs "
                             f"{need} (bias_backward_scratch_size({N}, {OC}))")
        for name, a in (("dout", dout), ("dbias", dbias)):
            _check_no_partial_overlap(op, "scratch", scratch, name, a, allow_same=False)
    ext.bias_backward(dbias.data.ptr, scratch.data.ptr, dout.data.ptr, N, OC, _code(dout),
                      _stream(stream))
    return dbias


def gelu_forward(x, out=None, stream=None):
    """out = gelu(x), tanh form, elementwise (any shape). `out` may be `x`."""
    op = "gelu_forward"
    _check_array(op, "x", x)
    with _allocation_stream(stream):
        out = _out(op, "out", out, x.shape, x.dtype)
    _check_no_partial_overlap(op, "out", out, "x", x)
    extension().gelu_forward(out.data.ptr, x.data.ptr, x.size, _code(x), _stream(stream))
    return out


def gelu_backward(dout, x, dx=None, stream=None):
    """dx = dout * gelu'(x) (tanh form), elementwise. `dx` may be `dout` (or `x`)."""
    op = "gelu_backward"
    _check_array(op, "dout", dout)
    _check_array(op, "x", x, shape=dout.shape)
    _check_same_dtype(op, dout=dout, x=x)
    with _allocation_stream(stream):
        dx = _out(op, "dx", dx, dout.shape, dout.dtype)
    _check_no_partial_overlap(op, "dx", dx, "dout", dout)
    _check_no_partial_overlap(op, "dx", dx, "x", x)
    extension().gelu_backward(dx.data.ptr, x.data.ptr, dout.data.ptr, x.size, _code(x),
                              _stream(stream))
    return dx


# ---- cross_entropy -----------------------------------------------------------------------

def cross_entropy_forward_backward(logits, targets, V=None, losses=None, dlogits=None,
                                   dloss_scale=None, backward=True, stream=None):
    """Fused softmax cross-entropy over the first V of the Vp columns of logits (..., Vp).

    losses (targets.shape, float32) = logsumexp(logits[..., :V]) - logits[target].
    If backward: dlogits (logits' shape) = dloss_scale * (softmax - onehot) on the first V
    columns and exactly 0 on the padded ones; dloss_scale defaults to 1/N (gradient of the mean
    loss over the N = targets.size rows). `dlogits` may be `logits` (in place). A target outside
    [0, V) gives that row a NaN loss and NaN dlogits on its first V columns.
    Returns (losses, dlogits), dlogits None when backward is False.
    """
    op = "cross_entropy_forward_backward"
    _check_array(op, "logits", logits)
    N, Vp = _row_view_shape(op, "logits", logits)
    _check_array(op, "targets", targets, dtypes=(np.int32,), shape=logits.shape[:-1])
    if V is None:
        V = Vp
    if not isinstance(V, (int, np.integer)) or isinstance(V, bool) or not 0 < V <= Vp:
        raise ValueError(f"{op}: 'V' must be an integer with 0 < V <= Vp = {Vp} (the last "
                         f"dimension of logits), got {V!r}")
    if dloss_scale is None:
        dloss_scale = 1.0 / max(N, 1)
    if (not isinstance(dloss_scale, (int, float, np.integer, np.floating))
            or isinstance(dloss_scale, bool) or not np.isfinite(dloss_scale)):
        raise ValueError(f"{op}: 'dloss_scale' must be a finite number, got {dloss_scale!r}")
    with _allocation_stream(stream):
        losses = _out(op, "losses", losses, targets.shape, np.float32)
        if backward:
            dlogits = _out(op, "dlogits", dlogits, logits.shape, logits.dtype)
    if backward:
        _check_no_partial_overlap(op, "dlogits", dlogits, "logits", logits)
        _check_no_partial_overlap(op, "losses", losses, "dlogits", dlogits, allow_same=False)
        dptr = dlogits.data.ptr
    else:
        if dlogits is not None:
            raise ValueError(f"{op}: argument 'dlogits' was given with backward=False")
        dptr = 0
    _check_no_partial_overlap(op, "losses", losses, "logits", logits, allow_same=False)
    extension().cross_entropy_forward_backward(losses.data.ptr, dptr, logits.data.ptr,
                                               targets.data.ptr, N, int(V), Vp,
                                               float(dloss_scale), _code(logits), _stream(stream))
    return losses, (dlogits if backward else None)


# ---- adamw -------------------------------------------------------------------------------

_F32 = (np.dtype(np.float32),)
_F32_MAX = float(np.finfo(np.float32).max)


def _real(op, name, value, *, low=None, high=None, low_open=False, high_open=False,
          kind="argument"):
    """A finite real number within [low, high] (or open ends) that fits a C float; ValueError
    naming it ("op: <kind> 'name' must be ...") otherwise."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        try:
            x = float(value)
        except OverflowError:  # a huge Python int
            x = float("inf")
        ok = bool(np.isfinite(x)) and abs(x) <= _F32_MAX  # it crosses as a C float
        if ok and low is not None:
            ok = x > low if low_open else x >= low
        if ok and high is not None:
            ok = x < high if high_open else x <= high
    if not ok:
        rng = []
        if low is not None:
            rng.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            rng.append(f"{'<' if high_open else '<='} {high}")
        want = "a finite number" + (" " + " and ".join(rng) if rng else "")
        raise ValueError(f"{op}: {kind} '{name}' must be {want}, got {value!r}")
    return float(value)


def _raise_on_overlap(op, pairs):
    for (n1, a1), (n2, a2) in pairs:
        if a1.nbytes and a2.nbytes and a1.data.ptr < a2.data.ptr + a2.nbytes \
                and a2.data.ptr < a1.data.ptr + a1.nbytes:
            raise ValueError(f"{op}: arguments '{n1}' and '{n2}' overlap in memory")


def _check_disjoint(op, **arrays):
    """Outputs updated in place must not share memory with each other or with inputs."""
    _raise_on_overlap(op, itertools.combinations(arrays.items(), 2))


def _one_element(op, name, a):
    _check_array(op, name, a, dtypes=_F32)
    if a.size != 1:
        raise ValueError(f"{op}: argument '{name}' must have exactly 1 element, got shape "
                         f"{a.shape}")
    return a


def global_norm_scratch_size(n):
    """float32 elements of scratch that global_norm_squared needs for n gradients."""
    return int(extension().global_norm_scratch_size(int(n)))


def global_norm_squared(grads, out=None, stream=None, scratch=None):
    """out[0] = sum(grads**2) over a flat float32 buffer, bitwise reproducible (fixed-order
    two-stage reduction, partial sums in float64). `out`: a 1-element float32 array (allocated
    if None). `scratch`: float32 buffer of at least global_norm_scratch_size(grads.size)
    elements, 8-byte aligned (allocated if None; pass one to avoid an allocation per call, e.g.
    under CUDA-graph capture). Nothing is synchronized: read out on the host when needed."""
    op = "global_norm_squared"
    _check_array(op, "grads", grads, dtypes=_F32, ndim=1)
    cp = _cp()
    out = cp.empty(1, dtype=np.float32) if out is None else _one_element(op, "out", out)
    n = grads.size
    need = global_norm_scratch_size(n)
    if scratch is None:
        scratch = cp.empty(need, dtype=np.float32)
    else:
        _check_array(op, "scratch", scratch, dtypes=_F32, ndim=1)
        if scratch.size < need:
            raise ValueError(f"{op}: argument 'scratch' has {scratch.size} elements, needs at "
                             f"least {need} for {n} gradients")
        if scratch.data.ptr % 8:
            raise ValueError(f"{op}: argument 'scratch' must be 8-byte aligned (it holds float64 "
                             "partial sums)")
    _check_disjoint(op, out=out, grads=grads, scratch=scratch)
    extension().global_norm_squared(out.data.ptr, scratch.data.ptr, grads.data.ptr, n,
                                    _stream(stream))
    return out


def adamw_update(params, grads, m, v, lr, step, beta1=0.9, beta2=0.95, eps=1e-8,
                 weight_decay=0.0, n_decay=None, norm_sq=None, max_norm=1.0, stream=None):
    """One AdamW step, in place, over flat float32 buffers of n elements (reference.adamw_update):
    elements [0, n_decay) get decoupled weight decay (n_decay=None: all of them), the rest none.
    `step` counts from 1 (bias corrections). If `norm_sq` (1-element float32 device array, e.g.
    from global_norm_squared) is given, gradients are scaled by
    min(1, max_norm / (sqrt(norm_sq) + 1e-6)), computed on the GPU (no host sync); `grads`
    itself is not modified. Returns params."""
    op = "adamw_update"
    lr = _real(op, "lr", lr, low=0.0)
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 1 <= step < 2**31:
        raise ValueError(f"{op}: argument 'step' must be an integer >= 1 (it counts from 1) and "
                         f"< 2**31, got {step!r}")
    beta1 = _real(op, "beta1", beta1, low=0.0, high=1.0, high_open=True)
    beta2 = _real(op, "beta2", beta2, low=0.0, high=1.0, high_open=True)
    eps = _real(op, "eps", eps, low=0.0, low_open=True)
    weight_decay = _real(op, "weight_decay", weight_decay, low=0.0)
    max_norm = _real(op, "max_norm", max_norm, low=0.0, low_open=True)
    _check_array(op, "params", params, dtypes=_F32, ndim=1)
    n = params.size
    for name, a in (("grads", grads), ("m", m), ("v", v)):
        _check_array(op, name, a, dtypes=_F32, shape=(n,))
    if n_decay is None:
        n_decay = n
    if (not isinstance(n_decay, (int, np.integer)) or isinstance(n_decay, bool)
            or not 0 <= n_decay <= n):
        raise ValueError(f"{op}: argument 'n_decay' must be an integer with 0 <= n_decay <= {n} "
                         f"(the size of params), got {n_decay!r}")
    arrays = dict(params=params, grads=grads, m=m, v=v)
    if norm_sq is not None:
        arrays["norm_sq"] = _one_element(op, "norm_sq", norm_sq)
    _check_disjoint(op, **arrays)
    extension().adamw_update(params.data.ptr, grads.data.ptr, m.data.ptr, v.data.ptr,
                             0 if norm_sq is None else norm_sq.data.ptr, n, int(n_decay), lr,
                             beta1, beta2, eps, weight_decay, max_norm, int(step),
                             _stream(stream))
    return params


# ---- attention ---------------------------------------------------------------------------

ATTENTION_HEAD_DIMS = (32, 64, 128)
_ATTN_MAX_T = 65535 * 64  # query tiles of 64 rows on gridDim.y


def _attention_sizes(op, qkv, n_head):
    """Validate qkv (B, T, 3C) and n_head; return (B, T, C, H)."""
    _check_array(op, "qkv", qkv, ndim=3)
    B, T, C3 = qkv.shape
    if B < 1 or T < 1:
        raise ValueError(f"{op}: argument 'qkv' has shape {qkv.shape}: B and T must be at least 1")
    if C3 % 3:
        raise ValueError(f"{op}: argument 'qkv' has shape {qkv.shape}: the last dimension must "
                         "be 3*C ([q | k | v]), got one not divisible by 3")
    C = C3 // 3
    H = _positive(op, "n_head", n_head)
    if C % H:
        raise ValueError(f"{op}: 'n_head' = {H} does not divide C = {C} (qkv last dimension "
                         f"{C3} = 3*C)")
    d = C // H
    if d not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"{op}: head dimension C/n_head = {C}/{H} = {d} is not supported "
                         f"(supported: {', '.join(map(str, ATTENTION_HEAD_DIMS))})")
    if T > _ATTN_MAX_T:
        raise ValueError(f"{op}: sequence length T = {T} is too long (at most {_ATTN_MAX_T})")
    if qkv.size >= 2**31:
        raise ValueError(f"{op}: argument 'qkv' has {qkv.size} elements, more than fit int32")
    return B, T, C, H


def _attention_aligned(op, **arrays):
    """The kernels move float4s: every buffer must start on a 16-byte boundary (CuPy
    allocations do; a view with an offset might not)."""
    for name, a in arrays.items():
        if a.data.ptr % 16:
            raise ValueError(f"{op}: argument '{name}' must be 16-byte aligned (it is a view "
                             "starting at an odd offset); pass a fresh array or a copy")


def _attention_disjoint(op, outputs, inputs):
    """Outputs must not share memory with inputs or with each other (they are written while
    other blocks still read the inputs); inputs may share memory among themselves."""
    _raise_on_overlap(op, itertools.chain(itertools.combinations(outputs.items(), 2),
                                          itertools.product(outputs.items(), inputs.items())))


def _attention_dropout(op, dropout_p, seed, offset):
    """(p as the kernel's float32, seed, offset), checked before any array (as for dropout_*)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.integer,
                                                                 np.floating)):
        raise TypeError(f"{op}: argument 'dropout_p' must be a number (the drop probability), "
                        f"got {type(dropout_p).__name__}")
    try:
        x = float(dropout_p)
    except OverflowError:
        x = float("inf")
    if not (0.0 <= x < 1.0 and float(np.float32(x)) < 1.0):
        raise ValueError(f"{op}: argument 'dropout_p' must satisfy 0 <= dropout_p < 1 (also once "
                         f"rounded to float32), got {dropout_p!r}")
    return float(np.float32(x)), _dropout_u64(op, "seed", seed), _dropout_u64(op, "offset", offset)


def attention_forward(qkv, n_head, out=None, lse=None, dropout_p=0.0, seed=0, offset=0,
                      stream=None):
    """Causal multi-head self-attention (flash style, TF32 tensor cores, fp32 softmax).

    qkv: (B, T, 3C) = [q | k | v] along the last axis, head h at columns h*d .. h*d+d-1 of each
    part, d = C / n_head in {32, 64, 128}. Returns (out (B, T, C), lse (B, n_head, T) float32),
    lse being the natural-log logsumexp of each row of the scaled causal scores, which
    attention_backward needs. Accuracy: ~1e-3 relative to float64 (inputs rounded to TF32).

    dropout_p > 0 drops attention probabilities (GPT-2's attn_dropout): out = (M o P / (1 - p)) V
    with P the softmax, lse still that of the undropped scores, and M the Philox keep mask of
    stream (seed, offset) at element index ((b*H + h)*T + i)*T + j (i query, j key), i.e.
    reference.attention_dropout_mask; it is not stored, so attention_backward must get the same
    (dropout_p, seed, offset). Every attention call of every step needs its own (seed, offset).
    dropout_p == 0 (the default) runs the kernels without any dropout code."""
    op = "attention_forward"
    dropout_p, seed, offset = _attention_dropout(op, dropout_p, seed, offset)
    B, T, C, H = _attention_sizes(op, qkv, n_head)
    out = _out(op, "out", out, (B, T, C), qkv.dtype)
    lse = _out(op, "lse", lse, (B, H, T), np.float32)
    _attention_aligned(op, qkv=qkv, out=out, lse=lse)
    _attention_disjoint(op, dict(out=out, lse=lse), dict(qkv=qkv))
    extension().attention_forward(out.data.ptr, lse.data.ptr, qkv.data.ptr, B, T, C, H,
                                  _code(qkv), dropout_p, seed, offset, _stream(stream))
    return out, lse


def attention_backward(dout, qkv, out, lse, n_head, dqkv=None, dropout_p=0.0, seed=0, offset=0,
                       stream=None):
    """Gradient of attention_forward: dqkv (B, T, 3C), laid out like qkv and fully overwritten.
    `out` and `lse` are attention_forward's results for this qkv, and dropout_p, seed, offset
    must be the ones that forward got (the dropout mask is regenerated from them). Deterministic:
    the same bits on every run (no atomics)."""
    op = "attention_backward"
    dropout_p, seed, offset = _attention_dropout(op, dropout_p, seed, offset)
    _check_array(op, "dout", dout, ndim=3)
    B, T, C, H = _attention_sizes(op, qkv, n_head)
    _check_array(op, "dout", dout, shape=(B, T, C))
    _check_array(op, "out", out, shape=(B, T, C))
    _check_array(op, "lse", lse, dtypes=(np.float32,), shape=(B, H, T))
    _check_same_dtype(op, dout=dout, qkv=qkv, out=out)
    dqkv = _out(op, "dqkv", dqkv, (B, T, 3 * C), qkv.dtype)
    _attention_aligned(op, dout=dout, qkv=qkv, out=out, lse=lse, dqkv=dqkv)
    _attention_disjoint(op, dict(dqkv=dqkv), dict(dout=dout, qkv=qkv, out=out, lse=lse))
    ext = extension()
    cp = _cp()
    n_scratch = ext.attention_backward_scratch_size(B, T, H)
    # allocated on the stream that uses it, so CuPy's pool reuses it only in stream order
    with (stream if stream is not None else cp.cuda.get_current_stream()):
        scratch = cp.empty(n_scratch, dtype=np.float32)
    ext.attention_backward(dqkv.data.ptr, scratch.data.ptr, dout.data.ptr, qkv.data.ptr,
                           out.data.ptr, lse.data.ptr, B, T, C, H, _code(qkv), dropout_p, seed,
                           offset, _stream(stream))
    return dqkv


# ---- dropout -----------------------------------------------------------------------------
# Masks come from Philox-4x32-10 keyed by (seed, offset, element index): csrc/philox.cuh has the
# counter layout, reference.dropout_mask reproduces it bit for bit. Scalars are checked before
# arrays, so a bad p/seed/offset is reported first.

def _dropout_p(op, p):
    """p as the float32 the kernel will use; 0 <= p < 1 must hold after that rounding."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: argument 'p' must be a number (the drop probability), got "
                        f"{type(p).__name__}")
    try:
        x = float(p)
    except OverflowError:  # a huge Python int
        x = float("inf")
    if not (0.0 <= x < 1.0 and float(np.float32(x)) < 1.0):
        raise ValueError(f"{op}: argument 'p' must satisfy 0 <= p < 1 (the drop probability; "
                         f"p also below 1 once rounded to float32), got {p!r}")
    return float(np.float32(x))


def _dropout_u64(op, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{op}: argument '{name}' must be an integer, got {type(value).__name__}")
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"{op}: argument '{name}' must satisfy 0 <= {name} < 2**64, got {value!r}")
    return int(value)


def _dropout(op, src, src_name, p, seed, offset, dst, dst_name, stream):
    """Shared by forward and backward, the same map on different arrays; launcher _C.<op>."""
    p = _dropout_p(op, p)
    seed = _dropout_u64(op, "seed", seed)
    offset = _dropout_u64(op, "offset", offset)
    _check_array(op, src_name, src)
    dst = _out(op, dst_name, dst, src.shape, src.dtype)
    same = dst.data.ptr == src.data.ptr
    lo, hi = src.data.ptr, src.data.ptr + src.nbytes
    if not same and src.nbytes and dst.data.ptr < hi and lo < dst.data.ptr + dst.nbytes:
        raise ValueError(f"{op}: arguments '{dst_name}' and '{src_name}' overlap in memory without "
                         "being the same array (in place needs exactly the same buffer)")
    if p == 0.0 and same:
        return dst  # identity, nothing to do
    getattr(extension(), op)(dst.data.ptr, src.data.ptr, seed, offset, src.size, p, _code(src),
                             _stream(stream))
    return dst


def dropout_forward(x, p, seed, offset, out=None, stream=None):
    """Inverted dropout: out = x * float32(1 / (1 - p)) where kept, 0 where dropped, each
    element kept with probability 1 - p (reference.dropout_forward with mask
    reference.dropout_mask(seed, offset, x.size, p), in C order). The mask is a pure function
    of (seed, offset, element index) and is not stored: dropout_backward with the same
    (p, seed, offset) regenerates it. `offset` (0 <= offset < 2**64) names the dropout site and
    step; every site of every step needs its own (seed, offset), or two sites get the same
    mask. p: 0 <= p < 1 (p == 0: a copy). `out` may be `x`."""
    return _dropout("dropout_forward", x, "x", p, seed, offset, out, "out", stream)


def dropout_backward(dout, p, seed, offset, dx=None, stream=None):
    """Gradient of dropout_forward with the same (p, seed, offset) and size: dx = dout / (1 - p)
    where the forward kept, 0 where it dropped (the mask is regenerated, not read). Overwrites
    `dx`, which may be `dout`."""
    return _dropout("dropout_backward", dout, "dout", p, seed, offset, dx, "dx", stream)
