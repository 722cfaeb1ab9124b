"""dropout_forward / dropout_backward: masks against reference.dropout_mask bit for bit, values
against reference.dropout_forward/backward, statistics of the kept fraction, and the argument
checks.

Exactness: the kernel writes float32(x) * scale with scale = reference.dropout_scale(p) (one
IEEE multiply, no other arithmetic), so outputs are compared bit for bit with that product;
against the float64 reference (at the kernel's float32 p) the error is two float32 roundings
(scale and product), at most 2^-23 relative per element.
"""
import math

import numpy as np
import pytest

from textgpt2 import ops, reference

SHAPES = [(1,), (3,), (4,), (7,), (5, 33), (3, 5, 77), (1001,)]
KEYS = [(0, 0), (1234, 7), (2**64 - 1, 2**63 + 5), (0x0123456789ABCDEF, 2**40)]


def nonzero_input(rng, shape):
    """float32 values in +-[0.5, 2): never 0, so an output is 0 exactly where it was dropped."""
    x = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    return x.astype(np.float32)


def expected(x, mask, p):
    """The kernel's output bit for bit: x * float32 scale where kept, else 0."""
    return np.where(mask, x * reference.dropout_scale(p), np.float32(0)).astype(np.float32)


def check_values(got, x, mask, p):
    """Mask, exact float32 values, and the float64 reference within two float32 roundings."""
    np.testing.assert_array_equal(got != 0, mask)
    assert got.tobytes() == expected(x, mask, p).tobytes()
    ref = reference.dropout_forward(x, mask, float(np.float32(p)))
    assert np.all(np.abs(got - ref) <= 2.0**-23 * np.abs(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed,offset", KEYS)
def test_dropout_forward_mask_matches_reference(cp, rng, shape, seed, offset):
    p = 0.37
    x = nonzero_input(rng, shape)
    out = cp.full(shape, np.nan, dtype=np.float32)  # poisoned: every element must be written
    assert ops.dropout_forward(cp.asarray(x), p, seed, offset, out=out) is out
    mask = reference.dropout_mask(seed, offset, x.size, p).reshape(shape)
    check_values(out.get(), x, mask, p)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.001, 0.1, 0.5, 0.9, 0.999])
def test_dropout_forward_scales_kept_values_exactly(cp, rng, p):
    x = nonzero_input(rng, (37, 29))
    out = ops.dropout_forward(cp.asarray(x), p, 5, 6).get()
    check_values(out, x, reference.dropout_mask(5, 6, x.size, p).reshape(x.shape), p)


@pytest.mark.gpu
@pytest.mark.parametrize("start", [1, 2, 3])
def test_dropout_misaligned_views(cp, rng, start):
    """Views that are contiguous but not 16-byte aligned take the scalar path, with the same
    mask (element i of the view uses word i & 3 of group i >> 2), and write nothing outside."""
    n, p = 1029, 0.5
    xb = nonzero_input(rng, n + 4)
    x = cp.asarray(xb)[start:start + n]
    out_base = cp.full(n + 4, np.nan, dtype=np.float32)
    out = out_base[start:start + n]
    ops.dropout_forward(x, p, 3, 9, out=out)
    mask = reference.dropout_mask(3, 9, n, p)
    check_values(out.get(), xb[start:start + n], mask, p)
    rest = np.concatenate([out_base[:start].get(), out_base[start + n:].get()])
    assert np.isnan(rest).all()
    # aligned input, misaligned output (and the reverse) agree too
    out2 = cp.full(n + 4, np.nan, dtype=np.float32)[start:start + n]
    ops.dropout_forward(cp.asarray(xb[start:start + n]), p, 3, 9, out=out2)
    assert out2.get().tobytes() == out.get().tobytes()
    out3 = ops.dropout_forward(x, p, 3, 9)  # freshly allocated, aligned
    assert out3.get().tobytes() == out.get().tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction(cp, p):
    """Kept count ~ Binomial(n, 1 - p): within 5 standard deviations (false failure ~6e-7)."""
    n = (1 << 22) + 3
    out = ops.dropout_forward(cp.ones(n, dtype=cp.float32), p, 42, 1)
    kept = int(cp.count_nonzero(out))
    assert abs(kept - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p))


@pytest.mark.gpu
def test_dropout_backward_uses_the_forward_mask(cp, rng):
    shape, p, seed, offset = (4, 37, 19), 0.5, 77, 3
    x, dout = nonzero_input(rng, shape), nonzero_input(rng, shape)
    out = ops.dropout_forward(cp.asarray(x), p, seed, offset).get()
    dx = cp.full(shape, np.nan, dtype=np.float32)
    assert ops.dropout_backward(cp.asarray(dout), p, seed, offset, dx=dx) is dx
    mask = out != 0
    np.testing.assert_array_equal(mask, reference.dropout_mask(seed, offset, x.size, p)
                                  .reshape(shape))
    check_values(dx.get(), dout, mask, p)
    ref = reference.dropout_backward(dout, mask, float(np.float32(p)))
    assert np.all(np.abs(dx.get() - ref) <= 2.0**-23 * np.abs(ref))


@pytest.mark.gpu
def test_dropout_is_reproducible_and_keyed(cp, rng):
    x = cp.asarray(nonzero_input(rng, (4099,)))
    a = ops.dropout_forward(x, 0.5, 11, 22).get()
    assert ops.dropout_forward(x, 0.5, 11, 22).get().tobytes() == a.tobytes()
    # another seed or offset (also in their high 32 bits) gives an independent mask, which
    # agrees with this one on about half of the 4099 elements (0.6 is > 12 sigma away)
    for seed, offset in ((12, 22), (11, 23), (11 + 2**32, 22), (11, 22 + 2**32)):
        c = ops.dropout_forward(x, 0.5, seed, offset).get()
        assert np.mean((a != 0) == (c != 0)) < 0.6


@pytest.mark.gpu
def test_dropout_p_zero_is_identity(cp, rng):
    x_np = nonzero_input(rng, (3, 41))
    x_np[0, :4] = [np.inf, -np.inf, np.nan, -0.0]
    x = cp.asarray(x_np)
    out = cp.full(x.shape, 7.0, dtype=np.float32)
    ops.dropout_forward(x, 0.0, 1, 2, out=out)
    assert out.get().tobytes() == x_np.tobytes()
    dx = ops.dropout_backward(x, 0, 1, 2)
    assert dx.get().tobytes() == x_np.tobytes()
    assert ops.dropout_forward(x, 0.0, 1, 2, out=x) is x  # in place: nothing to do
    assert x.get().tobytes() == x_np.tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dropout_in_place(cp, rng, direction):
    fn = ops.dropout_forward if direction == "forward" else ops.dropout_backward
    x_np = nonzero_input(rng, (3, 1001))
    expect = fn(cp.asarray(x_np), 0.2, 8, 1).get()
    x = cp.asarray(x_np)
    if direction == "forward":
        assert ops.dropout_forward(x, 0.2, 8, 1, out=x) is x
    else:
        assert ops.dropout_backward(x, 0.2, 8, 1, dx=x) is x
    assert x.get().tobytes() == expect.tobytes()


@pytest.mark.gpu
def test_dropout_on_a_stream(cp, rng):
    x_np = nonzero_input(rng, (257,))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(x_np)
        out = ops.dropout_forward(x, 0.3, 4, 5, stream=stream)
    stream.synchronize()
    check_values(out.get(), x_np, reference.dropout_mask(4, 5, x_np.size, 0.3), 0.3)


@pytest.mark.gpu
@pytest.mark.big
def test_dropout_gpt2_size(cp, rng):
    shape, p, seed, offset = (16, 1024, 768), 0.1, 2**63 + 1, 123456789
    x = nonzero_input(rng, shape)
    out = cp.full(shape, np.nan, dtype=np.float32)
    ops.dropout_forward(cp.asarray(x), p, seed, offset, out=out)
    check_values(out.get(), x, reference.dropout_mask(seed, offset, x.size, p).reshape(shape), p)


# ---- argument checks ----------------------------------------------------------------------

def test_dropout_rejects_host_array():
    with pytest.raises(TypeError, match="dropout_forward: argument 'x'.*NumPy"):
        ops.dropout_forward(np.zeros(4, np.float32), 0.5, 0, 0)
    with pytest.raises(TypeError, match="dropout_backward: argument 'dout'.*NumPy"):
        ops.dropout_backward(np.zeros(4, np.float32), 0.5, 0, 0)


# (p, seed, offset, exception, message) for scalars that must be refused. Scalars are checked
# before arrays, so these run without a GPU too.
BAD_SCALARS = [
    (-0.1, 0, 0, ValueError, r"argument 'p' must satisfy 0 <= p < 1"),
    (1.0, 0, 0, ValueError, r"argument 'p' must satisfy 0 <= p < 1"),
    (1.5, 0, 0, ValueError, r"argument 'p' must satisfy 0 <= p < 1"),
    (1.0 - 1e-12, 0, 0, ValueError, r"argument 'p' .*float32"),  # rounds to 1 as a float
    (float("nan"), 0, 0, ValueError, r"argument 'p'"),
    (float("inf"), 0, 0, ValueError, r"argument 'p'"),
    ("0.5", 0, 0, TypeError, r"argument 'p' must be a number"),
    (True, 0, 0, TypeError, r"argument 'p' must be a number"),
    (0.5, -1, 0, ValueError, r"argument 'seed' must satisfy 0 <= seed < 2\*\*64"),
    (0.5, 2**64, 0, ValueError, r"argument 'seed' must satisfy"),
    (0.5, 1.5, 0, TypeError, r"argument 'seed' must be an integer"),
    (0.5, True, 0, TypeError, r"argument 'seed' must be an integer"),
    (0.5, 0, -1, ValueError, r"argument 'offset' must satisfy 0 <= offset < 2\*\*64"),
    (0.5, 0, 2**64, ValueError, r"argument 'offset' must satisfy"),
    (0.5, 0, None, TypeError, r"argument 'offset' must be an integer"),
]


@pytest.mark.parametrize("p,seed,offset,exc,msg", BAD_SCALARS)
@pytest.mark.parametrize("op", ["dropout_forward", "dropout_backward"])
def test_dropout_rejects_bad_scalars_before_arrays(op, p, seed, offset, exc, msg):
    with pytest.raises(exc, match=f"{op}: {msg}"):
        getattr(ops, op)(np.zeros(4, np.float32), p, seed, offset)


@pytest.mark.gpu
@pytest.mark.parametrize("p,seed,offset,exc,msg", BAD_SCALARS)
def test_dropout_rejects_bad_scalars(cp, p, seed, offset, exc, msg):
    x = cp.ones(8, dtype=cp.float32)
    with pytest.raises(exc, match=f"dropout_forward: {msg}"):
        ops.dropout_forward(x, p, seed, offset)
    with pytest.raises(exc, match=f"dropout_backward: {msg}"):
        ops.dropout_backward(x, p, seed, offset)
    assert (x.get() == 1).all()  # nothing was launched


@pytest.mark.gpu
def test_dropout_accepts_numpy_scalars_and_extremes(cp):
    x = cp.ones(16, dtype=cp.float32)
    a = ops.dropout_forward(x, np.float32(0.5), np.uint64(2**64 - 1), np.int64(3))
    b = ops.dropout_forward(x, 0.5, 2**64 - 1, 3)
    assert a.get().tobytes() == b.get().tobytes()


@pytest.mark.gpu
def test_dropout_rejects_bad_arrays(cp):
    x = cp.zeros((4, 6), cp.float32)
    with pytest.raises(TypeError, match="dropout_forward: argument 'x' has dtype float64"):
        ops.dropout_forward(cp.zeros((4, 6), cp.float64), 0.5, 0, 0)
    with pytest.raises(TypeError, match="dropout_backward: argument 'dout' has dtype float16"):
        ops.dropout_backward(cp.zeros((4, 6), cp.float16), 0.5, 0, 0)
    with pytest.raises(ValueError, match="dropout_forward: argument 'x' must be C-contiguous"):
        ops.dropout_forward(cp.zeros((6, 4), cp.float32).T, 0.5, 0, 0)
    with pytest.raises(ValueError, match="dropout_backward: argument 'dout' must be C-contiguous"):
        ops.dropout_backward(cp.zeros((4, 12), cp.float32)[:, ::2], 0.5, 0, 0)
    with pytest.raises(ValueError, match="dropout_forward: argument 'out' has shape"):
        ops.dropout_forward(x, 0.5, 0, 0, out=cp.zeros(24, cp.float32))
    with pytest.raises(ValueError, match="dropout_backward: argument 'dx' has shape"):
        ops.dropout_backward(x, 0.5, 0, 0, dx=cp.zeros((6, 4), cp.float32))
    with pytest.raises(TypeError, match="dropout_forward: argument 'out' has dtype float64"):
        ops.dropout_forward(x, 0.5, 0, 0, out=cp.zeros((4, 6), cp.float64))
    with pytest.raises(TypeError, match="dropout_forward: argument 'x' must be a CuPy array"):
        ops.dropout_forward([1.0, 2.0], 0.5, 0, 0)
    buf = cp.zeros(100, cp.float32)
    with pytest.raises(ValueError, match="dropout_forward: arguments 'out' and 'x' overlap"):
        ops.dropout_forward(buf[:64], 0.5, 0, 0, out=buf[4:68])
    with pytest.raises(ValueError, match="dropout_backward: arguments 'dx' and 'dout' overlap"):
        ops.dropout_backward(buf[4:68], 0.5, 0, 0, dx=buf[:64])
