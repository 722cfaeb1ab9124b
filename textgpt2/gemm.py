"""Row-major matrix products for the linear layers, through cuBLAS (CuPy's low-level binding).

    matmul_forward(x (..., C), w (OC, C))          -> out (..., OC) = x @ w.T   [+ bias]
    matmul_backward_input(dout (..., OC), w)       -> dx (..., C)   = dout @ w
    matmul_backward_weight(dout, x, dw (OC, C))    :  dw += dout^T @ x  (summed over all rows)

Weights use the PyTorch layout (out_features, in_features). cuBLAS is column-major: a row-major
(R, K) array read column-major is its (K, R) transpose, so the row-major C = A @ B.T is computed
as the column-major C^T = B @ A^T, with no copy of any operand; `_plan` below spells out the three
cases. Math: TF32 tensor cores by default (fp32 storage and accumulation, inputs rounded to a
10-bit mantissa, about 1e-3 relative error), or strict fp32 after set_math("fp32").

Every call runs on the current CuPy stream (or `stream`) through textgpt2's own cuBLAS handle
(see _Cublas), so CuPy's handle and its matmuls are unaffected, and calls can be captured into a
CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from textgpt2 import ops

_MODES = ("tf32", "fp32")
_math = "tf32"

# cublasOperation_t values (cublas_api.h): fixed by the cuBLAS ABI. Kept here so the argument
# mapping can be checked without loading libcublas.
_OP_N, _OP_T = 0, 1
# cublasComputeType_t, cudaDataType and cublasGemmAlgo_t values (cublas_api.h, library_types.h).
# The compute type alone selects TF32 or strict fp32, whatever the handle's math mode.
_COMPUTE_32F, _COMPUTE_32F_FAST_TF32 = 68, 77
_CUDA_R_32F = 0
_GEMM_DEFAULT = -1
_ONE = np.array(1.0, dtype=np.float32)   # alpha/beta live on the host (CUBLAS_POINTER_MODE_HOST,
_ZERO = np.array(0.0, dtype=np.float32)  # CuPy's default), read when gemmEx is called


def set_math(mode: str) -> None:
    """"tf32" (default: tensor cores, fp32 accumulation) or "fp32" (exact fp32 products)."""
    global _math
    if mode not in _MODES:
        raise ValueError(f"gemm.set_math: mode must be one of {_MODES}, got {mode!r}")
    _math = mode


def get_math() -> str:
    return _math


class _Plan(NamedTuple):
    """Column-major gemm arguments: C(m x n, ldc) = alpha op(A)(m x k) op(B)(k x n) + beta C."""
    transa: int
    transb: int
    m: int
    n: int
    k: int
    a: str    # which argument is cuBLAS's A
    lda: int
    b: str    # ... and B
    ldb: int
    ldc: int


def _plan(kind: str, N: int, C: int, OC: int) -> _Plan:
    """The row-major product `kind` over N rows, C inputs, OC outputs as one column-major gemm.
    Read column-major: x (N, C) is x^T (C x N, ld C); w (OC, C) is w^T (C x OC, ld C);
    dout (N, OC) is dout^T (OC x N, ld OC); out/dx/dw likewise."""
    if kind == "forward":          # out^T (OC x N) = (w^T)^T (OC x C) @ x^T (C x N)
        return _Plan(_OP_T, _OP_N, OC, N, C, "w", C, "x", C, OC)
    if kind == "backward_input":   # dx^T (C x N) = w^T (C x OC) @ dout^T (OC x N)
        return _Plan(_OP_N, _OP_N, C, N, OC, "w", C, "dout", OC, C)
    if kind == "backward_weight":  # dw^T (C x OC) = x^T (C x N) @ (dout^T)^T (N x OC)
        return _Plan(_OP_N, _OP_T, C, OC, N, "x", C, "dout", OC, C)
    raise ValueError(f"unknown product {kind!r}")


class _Cublas:
    """Our own cuBLAS handle, called through ctypes.

    Why not CuPy's binding: it refuses every cuBLAS call while a stream is being captured into a
    CUDA graph ("calling cuBLAS API during stream capture is currently unsupported", CuPy 14),
    and the training step is captured. cuBLAS itself supports capture when the handle has a
    fixed workspace (cublasSetWorkspace), which this handle gets. The library is the one CuPy
    already loaded, found by its soname."""

    WORKSPACE_BYTES = 32 * 1024 * 1024

    def __init__(self):
        import ctypes

        cp = ops._cp()
        from cupy_backends.cuda.libs import cublas as _cupy_cublas  # noqa: F401 (loads libcublas)

        lib = None
        for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise RuntimeError("gemm: libcublas could not be loaded (tried libcublas.so.13, "
                               ".so.12, .so); install the CUDA toolkit or the nvidia-cublas wheel")
        vp, i32, u64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, u64]
        lib.cublasGemmEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32,
                                     vp, vp, i32, i32, i32, i32]
        for f in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2,
                  lib.cublasGemmEx):
            f.restype = i32
        self.lib = lib
        self.handle = vp()
        self._check("cublasCreate", lib.cublasCreate_v2(ctypes.byref(self.handle)))
        self.device = cp.cuda.Device().id
        self.workspace = cp.empty(self.WORKSPACE_BYTES, dtype=cp.uint8)
        self.stream = None

    def _check(self, what, status):
        if status != 0:
            raise RuntimeError(f"gemm: {what} failed with cuBLAS status {status}")

    def bind(self, stream_ptr):
        # cublasSetStream resets the workspace to cuBLAS's own pool, so set ours again after it.
        if stream_ptr != self.stream:
            self._check("cublasSetStream", self.lib.cublasSetStream_v2(self.handle, stream_ptr))
            self._check("cublasSetWorkspace", self.lib.cublasSetWorkspace_v2(
                self.handle, self.workspace.data.ptr, self.WORKSPACE_BYTES))
            self.stream = stream_ptr


_handles: dict = {}


def _cublas() -> _Cublas:
    cp = ops._cp()
    dev = cp.cuda.Device().id
    if dev not in _handles:
        _handles[dev] = _Cublas()
    return _handles[dev]


def _gemm(plan: _Plan, arrays: dict, out, beta, stream) -> None:
    cp = ops._cp()
    blas = _cublas()
    dtype = _CUDA_R_32F  # fp32 storage (bf16 later: CUDA_R_16BF, same compute type)
    compute = _COMPUTE_32F_FAST_TF32 if _math == "tf32" else _COMPUTE_32F
    A, B = arrays[plan.a], arrays[plan.b]
    blas.bind((stream if stream is not None else cp.cuda.get_current_stream()).ptr)
    blas._check("cublasGemmEx", blas.lib.cublasGemmEx(
        blas.handle, plan.transa, plan.transb, plan.m, plan.n, plan.k,
        _ONE.ctypes.data, A.data.ptr, dtype, plan.lda, B.data.ptr, dtype, plan.ldb,
        beta.ctypes.data, out.data.ptr, dtype, plan.ldc, compute, _GEMM_DEFAULT))


def _weight(op, w):
    ops._check_array(op, "w", w, ndim=2)
    OC, C = w.shape
    if OC == 0 or C == 0:
        raise ValueError(f"{op}: argument 'w' has shape {w.shape}; both dimensions must be "
                         "positive")
    ops._int32_size(op, "w.shape[0]", OC)
    ops._int32_size(op, "w.shape[1]", C)
    return OC, C


def matmul_forward(x, w, out=None, bias=None, stream=None):
    """out = x @ w.T (+ bias). x (..., C), w (OC, C) -> out (..., OC); bias (OC,) optional (added
    by ops.bias_forward). `out` must not overlap x or w."""
    op = "matmul_forward"
    ops._check_array(op, "x", x)
    OC, C = _weight(op, w)
    N, xc = ops._row_view_shape(op, "x", x)
    if xc != C:
        raise ValueError(f"{op}: x has {xc} columns but w has shape {w.shape}: x.shape[-1] must "
                         "equal w.shape[1]")
    ops._check_same_dtype(op, x=x, w=w)
    with ops._allocation_stream(stream):
        out = ops._out(op, "out", out, x.shape[:-1] + (OC,), x.dtype)
    ops._check_no_partial_overlap(op, "out", out, "x", x, allow_same=False)
    ops._check_no_partial_overlap(op, "out", out, "w", w, allow_same=False)
    if bias is not None:
        ops._check_array(op, "bias", bias, shape=(OC,))
        ops._check_same_dtype(op, x=x, bias=bias)
    if N > 0:
        _gemm(_plan("forward", N, C, OC), {"x": x, "w": w}, out, _ZERO, stream)
        if bias is not None:
            ops.bias_forward(out, bias, out=out, stream=stream)
    return out


def matmul_backward_input(dout, w, dx=None, stream=None):
    """dx = dout @ w. dout (..., OC), w (OC, C) -> dx (..., C), overwritten."""
    op = "matmul_backward_input"
    ops._check_array(op, "dout", dout)
    OC, C = _weight(op, w)
    N, doc = ops._row_view_shape(op, "dout", dout)
    if doc != OC:
        raise ValueError(f"{op}: dout has {doc} columns but w has shape {w.shape}: "
                         "dout.shape[-1] must equal w.shape[0]")
    ops._check_same_dtype(op, dout=dout, w=w)
    with ops._allocation_stream(stream):
        dx = ops._out(op, "dx", dx, dout.shape[:-1] + (C,), dout.dtype)
    ops._check_no_partial_overlap(op, "dx", dx, "dout", dout, allow_same=False)
    ops._check_no_partial_overlap(op, "dx", dx, "w", w, allow_same=False)
    if N > 0:
        _gemm(_plan("backward_input", N, C, OC), {"w": w, "dout": dout}, dx, _ZERO, stream)
    return dx


def matmul_backward_weight(dout, x, dw, stream=None):
    """dw += dout^T @ x summed over all rows: dout (..., OC), x (..., C), dw (OC, C). Returns dw."""
    op = "matmul_backward_weight"
    ops._check_array(op, "dout", dout)
    ops._check_array(op, "x", x)
    ops._check_array(op, "dw", dw, ndim=2)
    OC, C = dw.shape
    if OC == 0 or C == 0:
        raise ValueError(f"{op}: argument 'dw' has shape {dw.shape}; both dimensions must be "
                         "positive")
    N, doc = ops._row_view_shape(op, "dout", dout)
    _, xc = ops._row_view_shape(op, "x", x)
    if doc != OC or xc != C or dout.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: dout {dout.shape} and x {x.shape} must share their leading "
                         f"dimensions and match dw {dw.shape} = (dout.shape[-1], x.shape[-1])")
    ops._check_same_dtype(op, dout=dout, x=x, dw=dw)
    ops._check_no_partial_overlap(op, "dw", dw, "dout", dout, allow_same=False)
    ops._check_no_partial_overlap(op, "dw", dw, "x", x, allow_same=False)
    if N > 0:
        _gemm(_plan("backward_weight", N, C, OC), {"x": x, "dout": dout}, dw, _ONE, stream)
    return dw
