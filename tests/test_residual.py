"""residual_forward against reference.residual_forward, and its argument checks."""
import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import ops, reference

SHAPES = [(1,), (7,), (3, 5, 77), (16, 1024, 768)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_forward_matches_reference(cp, rng, shape):
    a = rng.standard_normal(shape).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    out = cp.full(shape, np.nan, dtype=np.float32)  # poisoned: every element must be written
    ops.residual_forward(cp.asarray(a), cp.asarray(b), out=out)
    # fp32: one rounding per element, so the relative error is at most 2^-24 per value
    assert rel_err(out.get(), reference.residual_forward(a, b)) < 1e-7


@pytest.mark.gpu
def test_residual_forward_in_place(cp, rng):
    a = cp.asarray(rng.standard_normal((5, 33)).astype(np.float32))
    b = cp.asarray(rng.standard_normal((5, 33)).astype(np.float32))
    expect = a.get() + b.get()
    ops.residual_forward(a, b, out=a)
    assert rel_err(a.get(), expect) < 1e-7


def test_residual_rejects_host_array():
    with pytest.raises(TypeError, match="residual_forward: argument 'a'.*NumPy"):
        ops.residual_forward(np.zeros(4, np.float32), np.zeros(4, np.float32))


@pytest.mark.gpu
def test_residual_rejects_bad_arguments(cp):
    a = cp.zeros((4, 6), cp.float32)
    with pytest.raises(ValueError, match="residual_forward: argument 'b' has shape"):
        ops.residual_forward(a, cp.zeros((4, 5), cp.float32))
    with pytest.raises(TypeError, match="residual_forward: argument 'b' has dtype float64"):
        ops.residual_forward(a, cp.zeros((4, 6), cp.float64))
    with pytest.raises(ValueError, match="residual_forward: argument 'a' must be C-contiguous"):
        ops.residual_forward(cp.zeros((6, 4), cp.float32).T, a)
    with pytest.raises(ValueError, match="residual_forward: argument 'out' has shape"):
        ops.residual_forward(a, a, out=cp.zeros(24, cp.float32))
    with pytest.raises(TypeError, match="residual_forward: argument 'b' must be a CuPy array"):
        ops.residual_forward(a, [1.0, 2.0])


@pytest.mark.gpu
def test_residual_forward_misaligned_views(cp, rng):
    # a[1:] starts 4 bytes past a 16-byte boundary: the kernel must take its scalar path
    a = cp.asarray(rng.standard_normal(1001).astype(np.float32))
    b = cp.asarray(rng.standard_normal(1001).astype(np.float32))
    out = cp.full(1001, np.nan, dtype=np.float32)
    ops.residual_forward(a[1:], b[1:], out=out[1:])
    assert rel_err(out[1:].get(), a[1:].get() + b[1:].get()) < 1e-7
    assert np.isnan(out[0].get())  # nothing written before the view
