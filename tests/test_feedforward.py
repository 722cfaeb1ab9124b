"""bias_forward / bias_backward / gelu_forward / gelu_backward against reference.py, and their
argument checks."""
import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import ops, reference

# (leading shape, OC): OC = 3 and 77 are not multiples of the 4-float vector width (scalar path),
# 768 / 3072 are GPT-2's; leading shapes give N = 1, 33 (not a multiple of 32) and 3*5 = 15.
BIAS_SHAPES = [((1,), 3), ((33,), 77), ((3, 5), 768), ((7,), 3072), ((2, 65), 4)]


def _f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- bias_forward ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("lead,OC", BIAS_SHAPES)
def test_bias_forward_matches_reference(cp, rng, lead, OC):
    x, b = _f32(rng, lead + (OC,)), _f32(rng, (OC,))
    out = cp.full(lead + (OC,), np.nan, dtype=np.float32)  # poisoned: every element must be written
    ops.bias_forward(cp.asarray(x), cp.asarray(b), out=out)
    # one fp32 rounding per element: relative error at most 2^-24 per value
    assert rel_err(out.get(), reference.bias_forward(x, b)) < 1e-7


@pytest.mark.gpu
def test_bias_forward_in_place_and_unaligned(cp, rng):
    x, b = _f32(rng, (9, 77)), _f32(rng, (77,))
    xd = cp.asarray(x)
    ops.bias_forward(xd, cp.asarray(b), out=xd)
    assert rel_err(xd.get(), reference.bias_forward(x, b)) < 1e-7
    # views starting 4 bytes into their allocation take the scalar path (no 16-byte accesses)
    big = cp.full(9 * 768 + 1, np.nan, dtype=np.float32)
    xv = big[1:].reshape(9, 768)
    xv[...] = cp.asarray(_f32(rng, (9, 768)))
    bbig = cp.asarray(_f32(rng, (769,)))
    expect = reference.bias_forward(xv.get(), bbig[1:].get())
    out = ops.bias_forward(xv, bbig[1:])
    assert rel_err(out.get(), expect) < 1e-7


@pytest.mark.gpu
@pytest.mark.big
def test_bias_forward_gpt2_size(cp, rng):
    x, b = _f32(rng, (16, 1024, 3072)), _f32(rng, (3072,))
    out = ops.bias_forward(cp.asarray(x), cp.asarray(b))
    assert rel_err(out.get(), reference.bias_forward(x, b)) < 1e-7


# ---- bias_backward -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("lead,OC", BIAS_SHAPES + [((1000,), 5), ((300,), 1)])
def test_bias_backward_accumulates_and_matches_reference(cp, rng, lead, OC):
    dout = _f32(rng, lead + (OC,))
    db0 = _f32(rng, (OC,))
    dbias = cp.asarray(db0)
    ops.bias_backward(cp.asarray(dout), dbias)
    # fp32 sums of up to ~1000 terms (chunked: 16 per thread, then 8, then the chunks) plus the
    # accumulation: relative error well under 1e-6 of the norm
    assert rel_err(dbias.get(), db0 + reference.bias_backward(dout)) < 1e-6


@pytest.mark.gpu
def test_bias_backward_is_deterministic(cp, rng):
    dout = cp.asarray(_f32(rng, (4099, 768)))  # several row chunks, a partial last chunk
    db0 = _f32(rng, (768,))
    a, b = cp.asarray(db0), cp.asarray(db0)
    ops.bias_backward(dout, a)
    ops.bias_backward(dout, b)
    assert np.array_equal(a.get().view(np.uint32), b.get().view(np.uint32))  # same bits
    assert rel_err(a.get(), db0 + reference.bias_backward(dout.get())) < 1e-6


@pytest.mark.gpu
def test_bias_backward_with_scratch(cp, rng):
    dout = _f32(rng, (300, 77))
    need = ops.bias_backward_scratch_size(300, 77)
    scratch = cp.full(need + 5, np.nan, dtype=np.float32)  # larger is fine; NaN is overwritten
    dbias = cp.zeros(77, dtype=np.float32)
    ops.bias_backward(cp.asarray(dout), dbias, scratch=scratch)
    assert rel_err(dbias.get(), reference.bias_backward(dout)) < 1e-6
    with pytest.raises(ValueError, match="bias_backward: argument 'scratch' has 1 elements, needs"):
        ops.bias_backward(cp.asarray(dout), dbias, scratch=cp.zeros(1, cp.float32))
    with pytest.raises(TypeError, match="bias_backward: argument 'scratch' has dtype float64"):
        ops.bias_backward(cp.asarray(dout), dbias, scratch=cp.zeros(need, cp.float64))


@pytest.mark.gpu
def test_bias_backward_unaligned_dout(cp, rng):
    big = cp.asarray(_f32(rng, (50 * 256 + 1,)))
    dout = big[1:].reshape(50, 256)  # 4 bytes past a 256-byte boundary: scalar path
    dbias = cp.zeros(256, dtype=np.float32)
    ops.bias_backward(dout, dbias)
    assert rel_err(dbias.get(), reference.bias_backward(dout.get())) < 1e-6


@pytest.mark.gpu
@pytest.mark.big
def test_bias_backward_gpt2_size(cp, rng):
    dout = _f32(rng, (16384, 3072))
    dbias = cp.zeros(3072, dtype=np.float32)
    ops.bias_backward(cp.asarray(dout), dbias)
    # 16384-term fp32 sums in a fixed tree: still ~1e-7 relative to the norm
    assert rel_err(dbias.get(), reference.bias_backward(dout)) < 1e-6


# ---- GELU --------------------------------------------------------------------------------

# A spread of values: the far tails (where 0.5 x (1 + tanh) cancels and the kernel uses the
# sigmoid form instead), values near the zero of gelu' (x ~ -0.75), zeros, big magnitudes.
SPECIAL = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-3, -1e-3, 0.5, -0.5, -0.7518, 1.0, -1.0, 3.0,
                    -3.0, 5.0, -5.0, 8.0, -8.0, 10.0, -10.0, 30.0, -30.0, 100.0, -100.0, 1e13,
                    -1e13, 1e20, -1e20], dtype=np.float32)


def _gelu_inputs(rng, n):
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    k = min(n, SPECIAL.size)
    x[:k] = SPECIAL[:k]
    return x


# Tolerances: expf (2 ulp), the IEEE division and the few roundings in u = s(x + a x^3) give a
# relative error of a few 1e-7 on typical values. In the far negative tail gelu(x) ~ x e^(-2|u|)
# is tiny and ill-conditioned (relative error ~|2u| * 1e-7, e.g. 7e-6 at x = -9, where the value
# is 1e-27), and gelu'(x) crosses zero at x ~ -0.75, where only an absolute bound makes sense; the
# atol (1e-6, times |dout| for the backward) covers both.
GELU_RTOL, GELU_ATOL = 1e-5, 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 77), (4099,), (2, 33, 3072)])
def test_gelu_forward_matches_reference(cp, rng, shape):
    x = _gelu_inputs(rng, int(np.prod(shape))).reshape(shape)
    out = cp.full(shape, np.nan, dtype=np.float32)
    ops.gelu_forward(cp.asarray(x), out=out)
    np.testing.assert_allclose(out.get(), reference.gelu_forward(x), rtol=GELU_RTOL,
                               atol=GELU_ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 77), (4099,), (2, 33, 3072)])
def test_gelu_backward_matches_reference(cp, rng, shape):
    x = _gelu_inputs(rng, int(np.prod(shape))).reshape(shape)
    dout = _f32(rng, shape)
    dx = cp.full(shape, np.nan, dtype=np.float32)
    ops.gelu_backward(cp.asarray(dout), cp.asarray(x), dx=dx)
    ref = reference.gelu_backward(dout, x)
    err = np.abs(dx.get() - ref)
    assert np.all(err <= GELU_RTOL * np.abs(ref) + GELU_ATOL * np.abs(dout)), err.max()


@pytest.mark.gpu
def test_gelu_in_place_and_unaligned(cp, rng):
    x = _gelu_inputs(rng, 1003)
    dout = _f32(rng, (1003,))
    xd, dd = cp.asarray(x), cp.asarray(dout)
    ops.gelu_backward(dd, xd, dx=dd)  # dx aliases dout
    np.testing.assert_allclose(dd.get(), reference.gelu_backward(dout, x), rtol=GELU_RTOL,
                               atol=GELU_ATOL)
    ops.gelu_forward(xd, out=xd)  # in place
    np.testing.assert_allclose(xd.get(), reference.gelu_forward(x), rtol=GELU_RTOL,
                               atol=GELU_ATOL)
    big = cp.asarray(np.concatenate([[0.0], x]).astype(np.float32))
    out = ops.gelu_forward(big[1:])  # input 4 bytes past alignment: scalar path
    np.testing.assert_allclose(out.get(), reference.gelu_forward(x), rtol=GELU_RTOL,
                               atol=GELU_ATOL)


@pytest.mark.gpu
def test_gelu_nonfinite(cp):
    x = cp.asarray(np.array([np.inf, np.nan, -1e30, 1e30], dtype=np.float32))
    out = ops.gelu_forward(x).get()
    assert out[0] == np.inf and np.isnan(out[1]) and out[2] == 0.0 and out[3] == np.float32(1e30)
    dx = ops.gelu_backward(cp.ones(4, dtype=np.float32), x).get()
    assert dx[0] == 1.0 and np.isnan(dx[1]) and dx[2] == 0.0 and dx[3] == 1.0


@pytest.mark.gpu
@pytest.mark.big
def test_gelu_gpt2_size(cp, rng):
    x = _f32(rng, (16, 1024, 3072), 2.0)
    dout = _f32(rng, x.shape)
    xd = cp.asarray(x)
    out = ops.gelu_forward(xd)
    np.testing.assert_allclose(out.get(), reference.gelu_forward(x), rtol=GELU_RTOL,
                               atol=GELU_ATOL)
    dx = ops.gelu_backward(cp.asarray(dout), xd)
    assert rel_err(dx.get(), reference.gelu_backward(dout, x)) < 1e-6


# ---- argument checks ---------------------------------------------------------------------

def test_feedforward_rejects_host_arrays():
    x, b = np.zeros((4, 3), np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="bias_forward: argument 'x'.*NumPy"):
        ops.bias_forward(x, b)
    with pytest.raises(TypeError, match="bias_backward: argument 'dout'.*NumPy"):
        ops.bias_backward(x, b)
    with pytest.raises(TypeError, match="gelu_forward: argument 'x'.*NumPy"):
        ops.gelu_forward(x)
    with pytest.raises(TypeError, match="gelu_backward: argument 'dout'.*NumPy"):
        ops.gelu_backward(x, x)


@pytest.mark.gpu
def test_bias_forward_rejects_bad_arguments(cp):
    x = cp.zeros((4, 6), cp.float32)
    b = cp.zeros(6, cp.float32)
    with pytest.raises(ValueError, match=r"bias_forward: argument 'bias' has shape \(5,\)"):
        ops.bias_forward(x, cp.zeros(5, cp.float32))
    with pytest.raises(TypeError, match="bias_forward: argument 'bias' has dtype float64"):
        ops.bias_forward(x, cp.zeros(6, cp.float64))
    with pytest.raises(TypeError, match="bias_forward: argument 'x' has dtype int32"):
        ops.bias_forward(cp.zeros((4, 6), cp.int32), b)
    with pytest.raises(ValueError, match="bias_forward: argument 'x' must be C-contiguous"):
        ops.bias_forward(cp.zeros((6, 4), cp.float32).T, b)
    with pytest.raises(ValueError, match="bias_forward: argument 'out' has shape"):
        ops.bias_forward(x, b, out=cp.zeros((4, 5), cp.float32))
    with pytest.raises(ValueError, match="bias_forward: argument 'x' must have at least 1 dim"):
        ops.bias_forward(cp.zeros((), cp.float32), b)
    with pytest.raises(ValueError, match="bias_forward: argument 'out' overlaps 'x'"):
        buf = cp.zeros(30, cp.float32)
        ops.bias_forward(buf[:24].reshape(4, 6), b, out=buf[6:].reshape(4, 6))
    with pytest.raises(TypeError, match="bias_forward: argument 'bias' must be a CuPy array"):
        ops.bias_forward(x, [0.0] * 6)


@pytest.mark.gpu
def test_bias_backward_rejects_bad_arguments(cp):
    dout = cp.zeros((4, 6), cp.float32)
    with pytest.raises(ValueError, match=r"bias_backward: argument 'dbias' has shape \(5,\)"):
        ops.bias_backward(dout, cp.zeros(5, cp.float32))
    with pytest.raises(TypeError, match="bias_backward: argument 'dbias' has dtype float64"):
        ops.bias_backward(dout, cp.zeros(6, cp.float64))
    with pytest.raises(ValueError, match="bias_backward: argument 'dout' must be C-contiguous"):
        ops.bias_backward(cp.zeros((6, 4), cp.float32).T, cp.zeros(4, cp.float32))
    with pytest.raises(ValueError, match="bias_backward: argument 'dbias' overlaps 'dout'"):
        ops.bias_backward(dout, dout[0])
    with pytest.raises(TypeError, match="bias_backward: argument 'dbias' must be a CuPy array"):
        ops.bias_backward(dout, None)


@pytest.mark.gpu
def test_gelu_rejects_bad_arguments(cp):
    x = cp.zeros((4, 6), cp.float32)
    with pytest.raises(TypeError, match="gelu_forward: argument 'x' has dtype float64"):
        ops.gelu_forward(cp.zeros(3, cp.float64))
    with pytest.raises(ValueError, match="gelu_forward: argument 'x' must be C-contiguous"):
        ops.gelu_forward(x.T)
    with pytest.raises(ValueError, match="gelu_forward: argument 'out' has shape"):
        ops.gelu_forward(x, out=cp.zeros(24, cp.float32))
    with pytest.raises(ValueError, match="gelu_backward: argument 'x' has shape"):
        ops.gelu_backward(x, cp.zeros((4, 5), cp.float32))
    with pytest.raises(TypeError, match="gelu_backward: argument 'dx' has dtype float64"):
        ops.gelu_backward(x, x, dx=cp.zeros((4, 6), cp.float64))
    with pytest.raises(TypeError, match="gelu_backward: argument 'x' has dtype float64"):
        ops.gelu_backward(x, cp.zeros((4, 6), cp.float64))
    with pytest.raises(ValueError, match="gelu_backward: argument 'dx' overlaps 'dout'"):
        buf = cp.zeros(30, cp.float32)
        ops.gelu_backward(buf[:24].reshape(4, 6), x, dx=buf[1:25].reshape(4, 6))
