"""textgpt2.gemm (row-major matmuls through cuBLAS) against NumPy float64, and argument checks."""
import os

import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import gemm, reference

# Tolerances (norm-wise relative error against float64):
#  fp32: fp32 products and fp32 accumulation over K <= 3072 terms: ~1e-7 * sqrt(K) <~ 1e-6;
#        2e-6 leaves margin (and fails if TF32 were used by mistake: ~5e-4 there).
#  tf32: inputs rounded to a 10-bit mantissa (2^-11 relative each), fp32 accumulation: ~5e-4,
#        up to ~1e-3 if the conversion truncates; 3e-3 leaves margin.
TOL = {"fp32": 2e-6, "tf32": 3e-3}

# (leading shape of x, C, OC): N = 1, 33 (odd), 2*3 with odd C and OC, and GPT-2 projections.
SHAPES = [((1,), 3, 5), ((33,), 77, 3), ((2, 3), 17, 29), ((64,), 768, 2304), ((5,), 3072, 768)]


@pytest.fixture(params=["tf32", "fp32"])
def math_mode(request):
    before = gemm.get_math()
    gemm.set_math(request.param)
    yield request.param
    gemm.set_math(before)


def _f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- the row-major -> column-major mapping, checked on the CPU -------------------------------

def _colmajor_gemm(plan, bufs, out, alpha, beta):
    """What cublasGemmEx computes, on flat NumPy buffers read column-major."""
    def mat(flat, rows, cols, ld):  # column-major rows x cols with leading dimension ld
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (8, 8 * ld))
    a_rows, a_cols = (plan.m, plan.k) if plan.transa == 0 else (plan.k, plan.m)
    b_rows, b_cols = (plan.k, plan.n) if plan.transb == 0 else (plan.n, plan.k)
    A = mat(bufs[plan.a].ravel(), a_rows, a_cols, plan.lda)
    B = mat(bufs[plan.b].ravel(), b_rows, b_cols, plan.ldb)
    A = A if plan.transa == 0 else A.T
    B = B if plan.transb == 0 else B.T
    C = mat(out.ravel(), plan.m, plan.n, plan.ldc)
    C[...] = alpha * (A @ B) + beta * C


@pytest.mark.parametrize("N,C,OC", [(1, 3, 5), (7, 4, 9), (33, 77, 3)])
def test_plans_compute_the_row_major_products(rng, N, C, OC):
    x, w = rng.standard_normal((N, C)), rng.standard_normal((OC, C))
    dout = rng.standard_normal((N, OC))
    out = np.zeros((N, OC))
    _colmajor_gemm(gemm._plan("forward", N, C, OC), {"x": x, "w": w}, out, 1.0, 0.0)
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-12)
    dx = np.zeros((N, C))
    _colmajor_gemm(gemm._plan("backward_input", N, C, OC), {"w": w, "dout": dout}, dx, 1.0, 0.0)
    np.testing.assert_allclose(dx, dout @ w, rtol=1e-12)
    dw0 = rng.standard_normal((OC, C))
    dw = dw0.copy()
    _colmajor_gemm(gemm._plan("backward_weight", N, C, OC), {"x": x, "dout": dout}, dw, 1.0, 1.0)
    np.testing.assert_allclose(dw, dw0 + dout.T @ x, rtol=1e-12)


def test_set_math_rejects_unknown_mode():
    with pytest.raises(ValueError, match="gemm.set_math: mode must be one of"):
        gemm.set_math("bf16")
    assert gemm.get_math() in ("tf32", "fp32")


def test_gemm_rejects_host_arrays():
    x, w = np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32)
    with pytest.raises(TypeError, match="matmul_forward: argument 'x'.*NumPy"):
        gemm.matmul_forward(x, w)
    with pytest.raises(TypeError, match="matmul_backward_input: argument 'dout'.*NumPy"):
        gemm.matmul_backward_input(np.zeros((4, 5), np.float32), w)
    with pytest.raises(TypeError, match="matmul_backward_weight: argument 'dout'.*NumPy"):
        gemm.matmul_backward_weight(np.zeros((4, 5), np.float32), x, w)


# ---- on the GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("lead,C,OC", SHAPES)
def test_matmul_forward(cp, rng, math_mode, lead, C, OC):
    x, w, b = _f32(rng, lead + (C,)), _f32(rng, (OC, C)), _f32(rng, (OC,))
    out = cp.full(lead + (OC,), np.nan, dtype=np.float32)  # poisoned (beta = 0 never reads it)
    res = gemm.matmul_forward(cp.asarray(x), cp.asarray(w), out=out)
    assert res is out
    assert rel_err(out.get(), reference.matmul_forward(x, w)) < TOL[math_mode]
    out2 = gemm.matmul_forward(cp.asarray(x), cp.asarray(w), bias=cp.asarray(b))
    assert out2.shape == lead + (OC,)
    assert rel_err(out2.get(), reference.matmul_forward(x, w, b)) < TOL[math_mode]


@pytest.mark.gpu
@pytest.mark.parametrize("lead,C,OC", SHAPES)
def test_matmul_backward(cp, rng, math_mode, lead, C, OC):
    x, w, dout = _f32(rng, lead + (C,)), _f32(rng, (OC, C)), _f32(rng, lead + (OC,))
    dx_ref, dw_ref, _ = reference.matmul_backward(dout, x, w)
    dx = cp.full(lead + (C,), np.nan, dtype=np.float32)
    gemm.matmul_backward_input(cp.asarray(dout), cp.asarray(w), dx=dx)
    assert rel_err(dx.get(), dx_ref) < TOL[math_mode]
    dw0 = _f32(rng, (OC, C))
    dw = cp.asarray(dw0)
    assert gemm.matmul_backward_weight(cp.asarray(dout), cp.asarray(x), dw) is dw
    assert rel_err(dw.get(), dw0 + dw_ref) < TOL[math_mode]  # accumulated (beta = 1)


@pytest.mark.gpu
def test_tf32_is_used_and_fp32_is_exact(cp, rng):
    if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        pytest.skip("NVIDIA_TF32_OVERRIDE=0 disables TF32 globally")
    x, w = _f32(rng, (128, 1024)), _f32(rng, (256, 1024))
    ref = reference.matmul_forward(x, w)
    before = gemm.get_math()
    try:
        gemm.set_math("tf32")
        e_tf32 = rel_err(gemm.matmul_forward(cp.asarray(x), cp.asarray(w)).get(), ref)
        gemm.set_math("fp32")
        e_fp32 = rel_err(gemm.matmul_forward(cp.asarray(x), cp.asarray(w)).get(), ref)
    finally:
        gemm.set_math(before)
    assert e_fp32 < 2e-6
    assert 1e-5 < e_tf32 < 3e-3  # TF32 rounding is visible: the mode reached cuBLAS


@pytest.mark.gpu
def test_math_mode_restored_and_stream_used(cp, rng):
    from cupy_backends.cuda.libs import cublas
    handle = cp.cuda.device.get_cublas_handle()
    before = cublas.getMathMode(handle)
    x, w = _f32(rng, (40, 64)), _f32(rng, (24, 64))
    s = cp.cuda.Stream(non_blocking=True)
    out = gemm.matmul_forward(cp.asarray(x), cp.asarray(w), stream=s)
    s.synchronize()
    assert cublas.getMathMode(handle) == before
    assert rel_err(out.get(), reference.matmul_forward(x, w)) < TOL["tf32"]


@pytest.mark.gpu
@pytest.mark.big
def test_gpt2_sized_products(cp, rng, math_mode):
    # the MLP's first projection at B*T = 16384: x (16384, 768), w (3072, 768)
    x, w, dout = _f32(rng, (16384, 768)), _f32(rng, (3072, 768)), _f32(rng, (16384, 3072))
    xd, wd, dd = cp.asarray(x), cp.asarray(w), cp.asarray(dout)
    out_ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert rel_err(gemm.matmul_forward(xd, wd).get(), out_ref) < TOL[math_mode]
    dx_ref = dout.astype(np.float64) @ w.astype(np.float64)
    assert rel_err(gemm.matmul_backward_input(dd, wd).get(), dx_ref) < TOL[math_mode]
    dw = cp.zeros((3072, 768), cp.float32)
    gemm.matmul_backward_weight(dd, xd, dw)
    # K = 16384 rows: fp32 accumulation error grows like sqrt(K); allow 2x
    dw_ref = dout.T.astype(np.float64) @ x.astype(np.float64)
    assert rel_err(dw.get(), dw_ref) < 2 * TOL[math_mode]


@pytest.mark.gpu
def test_gemm_rejects_bad_arguments(cp):
    x, w = cp.zeros((4, 3), cp.float32), cp.zeros((5, 3), cp.float32)
    dout = cp.zeros((4, 5), cp.float32)
    with pytest.raises(ValueError, match="matmul_forward: argument 'w' must have 2 dimensions"):
        gemm.matmul_forward(x, cp.zeros(3, cp.float32))
    with pytest.raises(ValueError,
                       match=r"matmul_forward: x has 4 columns but w has shape \(5, 3\)"):
        gemm.matmul_forward(cp.zeros((3, 4), cp.float32), w)
    with pytest.raises(TypeError, match="matmul_forward: argument 'w' has dtype float64"):
        gemm.matmul_forward(x, cp.zeros((5, 3), cp.float64))
    with pytest.raises(ValueError, match="matmul_forward: argument 'w' must be C-contiguous"):
        gemm.matmul_forward(x, cp.zeros((3, 5), cp.float32).T)
    with pytest.raises(ValueError, match="matmul_forward: argument 'out' has shape"):
        gemm.matmul_forward(x, w, out=cp.zeros((4, 4), cp.float32))
    with pytest.raises(ValueError, match="matmul_forward: argument 'out' overlaps 'x'"):
        buf = cp.zeros(40, cp.float32)
        gemm.matmul_forward(buf[:12].reshape(4, 3), w, out=buf[:20].reshape(4, 5))
    with pytest.raises(ValueError, match=r"matmul_forward: argument 'bias' has shape \(4,\)"):
        gemm.matmul_forward(x, w, bias=cp.zeros(4, cp.float32))
    with pytest.raises(ValueError, match="matmul_backward_input: dout has 4 columns"):
        gemm.matmul_backward_input(cp.zeros((4, 4), cp.float32), w)
    with pytest.raises(ValueError, match="matmul_backward_input: argument 'dx' has shape"):
        gemm.matmul_backward_input(dout, w, dx=cp.zeros((4, 5), cp.float32))
    with pytest.raises(ValueError, match="matmul_backward_weight: dout .* and x .* must share"):
        gemm.matmul_backward_weight(dout, cp.zeros((3, 3), cp.float32), w)
    with pytest.raises(ValueError, match="matmul_backward_weight: dout .* and x .* must share"):
        gemm.matmul_backward_weight(dout, x, cp.zeros((5, 4), cp.float32))
    with pytest.raises(TypeError, match="matmul_backward_weight: argument 'dw' must be a CuPy"):
        gemm.matmul_backward_weight(dout, x, None)
    with pytest.raises(ValueError, match="matmul_backward_weight: argument 'dw' overlaps 'x'"):
        buf = cp.zeros(27, cp.float32)
        gemm.matmul_backward_weight(dout, buf[:12].reshape(4, 3), buf[9:24].reshape(5, 3))
