"""layernorm_forward / layernorm_backward against reference.py, determinism of the parameter
gradients, and the argument checks of both wrappers."""
import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import ops, reference

# (leading shape, C). Kernel paths: C = 3, 31, 77, 1 are not multiples of 4 (scalar register
# path; C = 1 has zero variance); 768, 1024, 1600 are GPT-2 sizes on the 16-byte register path
# (1600 = the largest, 13 of 16 slots per lane); C = 2049 (scalar) and 4100 (vector) exceed the
# register path and take the looped kernels. Rows: N = 1 (also x 1-D), 74 and 33 (not multiples
# of the 8 rows per block), 5000 (more rows than the 512 partial-sum blocks of the backward).
SHAPES = [
    ((1,), 3), ((5,), 77), ((3,), 1), ((3, 11), 31), ((), 768), ((2, 37), 768), ((4,), 1024),
    ((7,), 1600), ((3,), 2049), ((2,), 4100), ((5000,), 64), ((2, 3, 5), 128),
]


def _f32(rng, shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


def _check_forward(x, out, mean, rstd, w, b, eps=1e-5, tol=1e-5):
    ro, rm, rr = reference.layernorm_forward(x, w, b, eps)
    assert out.shape == x.shape and mean.shape == x.shape[:-1] and rstd.shape == x.shape[:-1]
    # fp32 two-pass statistics (per-lane sums of <= 128 values, then a 32-lane tree): relative
    # errors of rstd and out of order 1e-7, 1e-5 is the bound with margin. The mean is checked
    # against the scale of x, since a row's mean can be ~0 (relative error meaningless there).
    assert rel_err(out, ro) < tol
    assert rel_err(rstd, rr) < 1e-5
    assert np.abs(mean - rm).max() <= 1e-6 * max(1.0, np.abs(x).max())


# ---- layernorm_forward -------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("lead,C", SHAPES)
def test_layernorm_forward_matches_reference(cp, rng, lead, C):
    shape = lead + (C,)
    x, w, b = _f32(rng, shape), _f32(rng, (C,)), _f32(rng, (C,))
    # poisoned outputs: every element must be written
    out = cp.full(shape, np.nan, dtype=np.float32)
    mean, rstd = cp.full(lead, np.nan, np.float32), cp.full(lead, np.nan, np.float32)
    res = ops.layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b), out=out, mean=mean,
                                rstd=rstd)
    assert res[0] is out and res[1] is mean and res[2] is rstd
    _check_forward(x, out.get(), mean.get(), rstd.get(), w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [64, 77, 768])
def test_layernorm_forward_large_mean_and_eps(cp, rng, C):
    # rows with mean 50 and std 1: the two-pass variance has no cancellation, but x - mean is
    # only as exact as the fp32 mean (|mean| * 2^-24 ~ 3e-6 relative to the row's spread)
    x, w, b = _f32(rng, (9, C), 1.0, 50.0), _f32(rng, (C,)), _f32(rng, (C,))
    for eps in (1e-5, 0.5):
        out, mean, rstd = ops.layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b),
                                                eps=eps)
        _check_forward(x, out.get(), mean.get(), rstd.get(), w, b, eps=eps, tol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [5, 768])
def test_layernorm_forward_constant_rows(cp, rng, C):
    # integer rows: the mean is exact, the variance exactly 0, so rstd = 1/sqrt(eps) and
    # out = bias exactly; eps decides rstd
    x = np.repeat(np.arange(-3, 4, dtype=np.float32)[:, None], C, axis=1)
    w, b = _f32(rng, (C,)), _f32(rng, (C,))
    for eps in (1e-5, 0.25):
        out, mean, rstd = ops.layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b),
                                                eps=eps)
        assert np.array_equal(out.get(), np.broadcast_to(b, x.shape))
        assert np.array_equal(mean.get(), np.arange(-3, 4, dtype=np.float32))
        assert rel_err(rstd.get(), np.full(7, 1 / np.sqrt(np.float32(eps)))) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("C", [64, 768])
def test_layernorm_unaligned_views(cp, rng, C):
    # arrays starting 4 bytes past a 256-byte boundary must take the scalar path
    N = 6
    x, w, b, dout = _f32(rng, (N, C)), _f32(rng, (C,)), _f32(rng, (C,)), _f32(rng, (N, C))

    def view(a):
        buf = cp.full(a.size + 1, np.nan, dtype=np.float32)
        buf[1:] = cp.asarray(a.ravel())
        return buf[1:].reshape(a.shape)

    out = view(np.full((N, C), np.nan, np.float32))
    _, mean, rstd = ops.layernorm_forward(view(x), view(w), view(b), out=out)
    _check_forward(x, out.get(), mean.get(), rstd.get(), w, b)
    dw0, db0 = _f32(rng, (C,)), _f32(rng, (C,))
    dweight, dbias, dx = view(dw0), view(db0), view(np.full((N, C), np.nan, np.float32))
    ops.layernorm_backward(view(dout), view(x), view(w), mean, rstd, dweight, dbias, dx=dx)
    rdx, rdw, rdb = reference.layernorm_backward(dout, x, w, mean.get(), rstd.get())
    assert rel_err(dx.get(), rdx) < 1e-5
    assert rel_err(dweight.get(), dw0 + rdw) < 1e-5
    assert rel_err(dbias.get(), db0 + rdb) < 1e-5


@pytest.mark.gpu
@pytest.mark.big
def test_layernorm_forward_gpt2_size(cp, rng):
    x, w, b = _f32(rng, (16, 1024, 768)), _f32(rng, (768,), 0.1, 1.0), _f32(rng, (768,), 0.1)
    out, mean, rstd = ops.layernorm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    _check_forward(x, out.get(), mean.get(), rstd.get(), w, b)


# ---- layernorm_backward ------------------------------------------------------------------

def _check_backward(cp, rng, x, scale=1.0):
    C = x.shape[-1]
    w, dout = _f32(rng, (C,)), _f32(rng, x.shape, scale)
    # the saved statistics as the forward stores them (float32), from the reference
    _, rm, rr = reference.layernorm_forward(x, w, np.zeros(C, np.float32))
    mean, rstd = rm.astype(np.float32), rr.astype(np.float32)
    dw0, db0 = _f32(rng, (C,)), _f32(rng, (C,))  # accumulate: += into these
    dweight, dbias = cp.asarray(dw0), cp.asarray(db0)
    dx = cp.full(x.shape, np.nan, dtype=np.float32)  # poisoned
    res = ops.layernorm_backward(cp.asarray(dout), cp.asarray(x), cp.asarray(w),
                                 cp.asarray(mean), cp.asarray(rstd), dweight, dbias, dx=dx)
    assert res is dx
    rdx, rdw, rdb = reference.layernorm_backward(dout, x, w, mean, rstd)
    # dx: fp32 row sums of g and g*xhat, then one fused expression per element; dw, db: fp32
    # sums over up to 16384 rows in fixed blocks (each warp's rows, the block's warps, then the
    # <= 512 blocks). Observed errors ~1e-7 relative; 1e-5 bounds them with margin.
    assert rel_err(dx.get(), rdx) < 1e-5
    assert rel_err(dweight.get(), dw0 + rdw) < 1e-5
    assert rel_err(dbias.get(), db0 + rdb) < 1e-5
    return dout, w, mean, rstd


@pytest.mark.gpu
@pytest.mark.parametrize("lead,C", SHAPES)
def test_layernorm_backward_matches_reference(cp, rng, lead, C):
    _check_backward(cp, rng, _f32(rng, lead + (C,), 2.0, 0.5))


@pytest.mark.gpu
def test_layernorm_backward_is_deterministic(cp, rng):
    # 4099 rows: 512 blocks of 8-9 rows, each a different warp/row mix; float atomics on
    # dweight/dbias would add the blocks in a different order every run
    N, C = 4099, 768
    x, dout, w = (cp.asarray(_f32(rng, s)) for s in ((N, C), (N, C), (C,)))
    _, mean, rstd = ops.layernorm_forward(x, w, cp.zeros(C, np.float32))
    dw0, db0 = _f32(rng, (C,)), _f32(rng, (C,))
    runs = []
    for _ in range(3):
        dweight, dbias = cp.asarray(dw0), cp.asarray(db0)
        dx = ops.layernorm_backward(dout, x, w, mean, rstd, dweight, dbias)
        runs.append([dx.get(), dweight.get(), dbias.get()])
    for run in runs[1:]:
        for got, first in zip(run, runs[0]):
            assert np.array_equal(_bits(got), _bits(first))


@pytest.mark.gpu
def test_layernorm_fwd_bwd_chain_and_accumulation(cp, rng):
    # forward statistics fed to the backward, and two backward calls accumulate
    x, w, b = _f32(rng, (3, 50, 96)), _f32(rng, (96,)), _f32(rng, (96,))
    d1, d2 = _f32(rng, x.shape), _f32(rng, x.shape)
    xd, wd = cp.asarray(x), cp.asarray(w)
    _, mean, rstd = ops.layernorm_forward(xd, wd, cp.asarray(b))
    dweight, dbias = cp.zeros(96, np.float32), cp.zeros(96, np.float32)
    dx1 = ops.layernorm_backward(cp.asarray(d1), xd, wd, mean, rstd, dweight, dbias).get()
    ops.layernorm_backward(cp.asarray(d2), xd, wd, mean, rstd, dweight, dbias)
    rm, rr = reference.layernorm_forward(x, w, b)[1:]
    rdx1, rdw1, rdb1 = reference.layernorm_backward(d1, x, w, rm, rr)
    _, rdw2, rdb2 = reference.layernorm_backward(d2, x, w, rm, rr)
    assert rel_err(dx1, rdx1) < 1e-5
    assert rel_err(dweight.get(), rdw1 + rdw2) < 1e-5
    assert rel_err(dbias.get(), rdb1 + rdb2) < 1e-5


@pytest.mark.gpu
def test_layernorm_backward_with_given_scratch_and_stream(cp, rng):
    N, C = 37, 80
    x, w, dout = _f32(rng, (N, C)), _f32(rng, (C,)), _f32(rng, (N, C))
    need = ops.layernorm_backward_scratch_size(N, C)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        scratch = cp.full(need, np.nan, dtype=np.float32)  # garbage in the scratch must not matter
        xd, wd, dd = cp.asarray(x), cp.asarray(w), cp.asarray(dout)
        bd = cp.zeros(C, np.float32)
        dweight, dbias = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    _, mean, rstd = ops.layernorm_forward(xd, wd, bd, stream=stream)
    dx = ops.layernorm_backward(dd, xd, wd, mean, rstd, dweight, dbias, stream=stream,
                                scratch=scratch)
    stream.synchronize()
    rdx, rdw, rdb = reference.layernorm_backward(dout, x, w, mean.get(), rstd.get())
    assert rel_err(dx.get(), rdx) < 1e-5
    assert rel_err(dweight.get(), rdw) < 1e-5
    assert rel_err(dbias.get(), rdb) < 1e-5
    with pytest.raises(ValueError, match="layernorm_backward: argument 'scratch' has 3 elements"):
        ops.layernorm_backward(dd, xd, wd, mean, rstd, dweight, dbias,
                               scratch=cp.zeros(3, np.float32))


@pytest.mark.gpu
@pytest.mark.big
def test_layernorm_backward_gpt2_size(cp, rng):
    _check_backward(cp, rng, _f32(rng, (16, 1024, 768)))


# ---- argument checks ---------------------------------------------------------------------

def test_layernorm_rejects_host_arrays():
    x, w = np.zeros((2, 4), np.float32), np.ones(4, np.float32)
    m = np.zeros(2, np.float32)
    with pytest.raises(TypeError, match="layernorm_forward: argument 'x'.*NumPy"):
        ops.layernorm_forward(x, w, w)
    with pytest.raises(TypeError, match="layernorm_backward: argument 'x'.*NumPy"):
        ops.layernorm_backward(x, x, w, m, m, w, w)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), 1e-50, 1e39, "1e-5",
                                 True, None])
def test_layernorm_rejects_bad_eps(eps):
    # checked before the arrays, so this runs without a GPU
    with pytest.raises(ValueError, match="layernorm_forward: argument 'eps' must be a finite "
                                         "number > 0.0"):
        ops.layernorm_forward(np.zeros((2, 4), np.float32), None, None, eps=eps)


@pytest.mark.gpu
def test_layernorm_forward_rejects_bad_arguments(cp):
    x, w, b = cp.zeros((2, 4), cp.float32), cp.ones(4, cp.float32), cp.zeros(4, cp.float32)
    with pytest.raises(TypeError, match="layernorm_forward: argument 'weight'.*NumPy"):
        ops.layernorm_forward(x, np.ones(4, np.float32), b)
    with pytest.raises(TypeError, match="layernorm_forward: argument 'x' has dtype float64"):
        ops.layernorm_forward(x.astype(cp.float64), w, b)
    with pytest.raises(TypeError, match="layernorm_forward: argument 'bias' has dtype float16"):
        ops.layernorm_forward(x, w, b.astype(cp.float16))
    with pytest.raises(ValueError, match="layernorm_forward: argument 'x' must be C-contiguous"):
        ops.layernorm_forward(cp.zeros((4, 2), cp.float32).T, w, b)
    with pytest.raises(ValueError, match="layernorm_forward: argument 'weight' has shape \\(5,\\), "
                                         "expected \\(4\\)"):
        ops.layernorm_forward(x, cp.ones(5, cp.float32), b)
    with pytest.raises(ValueError, match="layernorm_forward: argument 'bias' has shape \\(1, 4\\)"):
        ops.layernorm_forward(x, w, b.reshape(1, 4))
    with pytest.raises(ValueError, match="layernorm_forward: argument 'x' must have at least 1 "
                                         "dimension"):
        ops.layernorm_forward(cp.zeros((), cp.float32), w, b)
    with pytest.raises(ValueError, match="layernorm_forward: argument 'x' has shape \\(2, 0\\); "
                                         "its last dimension must be positive"):
        ops.layernorm_forward(cp.zeros((2, 0), cp.float32), w[:0], b[:0])
    with pytest.raises(ValueError, match="layernorm_forward: argument 'out' has shape"):
        ops.layernorm_forward(x, w, b, out=cp.zeros((4, 2), cp.float32))
    with pytest.raises(ValueError, match="layernorm_forward: argument 'mean' has shape \\(3,\\)"):
        ops.layernorm_forward(x, w, b, mean=cp.zeros(3, cp.float32))
    with pytest.raises(TypeError, match="layernorm_forward: argument 'rstd' has dtype float64, "
                                        "expected float32"):
        ops.layernorm_forward(x, w, b, rstd=cp.zeros(2, cp.float64))
    with pytest.raises(ValueError, match="layernorm_forward: arguments 'out' and 'x' overlap"):
        ops.layernorm_forward(x, w, b, out=x)
    with pytest.raises(ValueError, match="layernorm_forward: arguments 'mean' and 'rstd' overlap"):
        m = cp.zeros(2, cp.float32)
        ops.layernorm_forward(x, w, b, mean=m, rstd=m)


@pytest.mark.gpu
def test_layernorm_backward_rejects_bad_arguments(cp):
    N, C = 3, 4
    x, dout = cp.zeros((N, C), cp.float32), cp.zeros((N, C), cp.float32)
    w, m, r = cp.ones(C, cp.float32), cp.zeros(N, cp.float32), cp.ones(N, cp.float32)
    dw, db = cp.zeros(C, cp.float32), cp.zeros(C, cp.float32)
    with pytest.raises(TypeError, match="layernorm_backward: argument 'dout'.*NumPy"):
        ops.layernorm_backward(np.zeros((N, C), np.float32), x, w, m, r, dw, db)
    with pytest.raises(ValueError, match="layernorm_backward: argument 'dout' has shape "
                                         "\\(4, 3\\), expected \\(3, 4\\)"):
        ops.layernorm_backward(cp.zeros((C, N), cp.float32), x, w, m, r, dw, db)
    with pytest.raises(TypeError, match="layernorm_backward: argument 'dout' has dtype float64"):
        ops.layernorm_backward(dout.astype(cp.float64), x, w, m, r, dw, db)
    with pytest.raises(ValueError, match="layernorm_backward: argument 'x' must be C-contiguous"):
        ops.layernorm_backward(dout, cp.zeros((C, N), cp.float32).T, w, m, r, dw, db)
    with pytest.raises(ValueError,
                       match="layernorm_backward: argument 'weight' has shape \\(5,\\)"):
        ops.layernorm_backward(dout, x, cp.ones(5, cp.float32), m, r, dw, db)
    with pytest.raises(TypeError, match="layernorm_backward: argument 'mean' has dtype float64, "
                                        "expected float32"):
        ops.layernorm_backward(dout, x, w, m.astype(cp.float64), r, dw, db)
    with pytest.raises(ValueError, match="layernorm_backward: argument 'rstd' has shape \\(4,\\), "
                                         "expected \\(3\\)"):
        ops.layernorm_backward(dout, x, w, m, cp.ones(4, cp.float32), dw, db)
    with pytest.raises(ValueError, match="layernorm_backward: argument 'dweight' has shape"):
        ops.layernorm_backward(dout, x, w, m, r, cp.zeros(C + 1, cp.float32), db)
    with pytest.raises(TypeError, match="layernorm_backward: argument 'dbias' has dtype float64"):
        ops.layernorm_backward(dout, x, w, m, r, dw, db.astype(cp.float64))
    with pytest.raises(ValueError, match="layernorm_backward: argument 'dx' has shape"):
        ops.layernorm_backward(dout, x, w, m, r, dw, db, dx=cp.zeros((N, C + 1), cp.float32))
    with pytest.raises(ValueError, match="layernorm_backward: arguments 'dx' and 'dout' overlap"):
        ops.layernorm_backward(dout, x, w, m, r, dw, db, dx=dout)
    with pytest.raises(ValueError, match="layernorm_backward: arguments 'dweight' and 'dbias' "
                                         "overlap"):
        ops.layernorm_backward(dout, x, w, m, r, dw, dw)
    with pytest.raises(TypeError, match="layernorm_backward: argument 'scratch' has dtype int32"):
        ops.layernorm_backward(dout, x, w, m, r, dw, db, scratch=cp.zeros(100, cp.int32))
