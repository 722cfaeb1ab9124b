"""attention_forward / attention_backward (csrc/attention.cu) against reference.py, and their
argument checks.

Tolerances. The kernels round q, k, v, dO and the probabilities to TF32 (10-bit mantissa,
relative rounding error 2^-11 ~ 4.9e-4) for the tensor-core products and accumulate in fp32.
Emulating exactly that arithmetic in NumPy (lane by lane, T up to 257, d 32/64/128) gives
norm-wise relative errors of 2.5e-4 .. 4e-4 for out and 2.7e-4 .. 6.5e-4 for dq, dk, dv, flat in
T. lse is compared by its largest absolute error over all rows: early rows average few scores,
so it is about one score's TF32 error (sigma ~7e-4 for unit-normal inputs); 2.5e-4 .. 8.2e-4
was seen. The limits leave 6x to 8x headroom; an indexing or masking mistake shows up as 1e-2
or (much) more.
"""
import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import ops, reference

OUT_TOL = 2e-3   # ||out - ref|| / ||ref||
LSE_TOL = 5e-3   # max |lse - ref| (lse is a log, so this is a relative error of sum exp)
GRAD_TOL = 5e-3  # per part (dq, dk, dv): ||x - ref|| / ||ref|| (see _grad_errors for exact zeros)

T_VALUES = (1, 7, 64, 65, 257, 1024)
HEAD_DIMS = (32, 64, 128)


def _bh(T):
    """Batch and head counts: a few heads at small T, B*H = 2 at T >= 257 so the float64
    reference (B*H*T*T probabilities) stays quick."""
    return (2, 3) if T <= 65 else (1, 2)


CASES = [pytest.param(T, d, marks=[pytest.mark.big] if T >= 1024 else [], id=f"T{T}-d{d}")
         for T in T_VALUES for d in HEAD_DIMS]


def _inputs(rng, B, T, H, d):
    C = H * d
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    return qkv, dout


def _grad_errors(dqkv, ref):
    """Relative error of the dq, dk and dv thirds. A part whose exact value is 0 (dq and dk at
    T = 1: one key, P = 1, dS = dP - D = 0) comes out of the kernel as the rounding noise of
    dP (TF32) minus D (fp32), so it is measured against the whole gradient's norm instead."""
    C = ref.shape[-1] // 3
    whole = np.linalg.norm(ref)
    errs = []
    for i in range(3):
        x = np.asarray(dqkv[..., i * C:(i + 1) * C], np.float64)
        r = ref[..., i * C:(i + 1) * C]
        scale = np.linalg.norm(r) if np.linalg.norm(r) > 1e-6 * whole else whole
        errs.append(float(np.linalg.norm(x - r) / scale))
    return errs


def _run_forward(cp, qkv, H):
    B, T, C3 = qkv.shape
    out = cp.full((B, T, C3 // 3), np.nan, dtype=np.float32)   # poisoned: every element written
    lse = cp.full((B, H, T), np.nan, dtype=np.float32)
    ops.attention_forward(cp.asarray(qkv), H, out=out, lse=lse)
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("T, d", CASES)
def test_attention_forward_matches_reference(cp, rng, T, d):
    B, H = _bh(T)
    qkv, _ = _inputs(rng, B, T, H, d)
    out, lse = _run_forward(cp, qkv, H)
    ref_out, ref_lse = reference.attention_forward(qkv, H)
    out, lse = out.get(), lse.get()
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert rel_err(out, ref_out) < OUT_TOL
    assert np.max(np.abs(lse.astype(np.float64) - ref_lse)) < LSE_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("T, d", CASES)
def test_attention_backward_matches_reference(cp, rng, T, d):
    B, H = _bh(T)
    qkv, dout = _inputs(rng, B, T, H, d)
    out, lse = _run_forward(cp, qkv, H)
    dqkv = cp.full(qkv.shape, np.nan, dtype=np.float32)  # poisoned: fully overwritten
    ops.attention_backward(cp.asarray(dout), cp.asarray(qkv), out, lse, H, dqkv=dqkv)
    dqkv = dqkv.get()
    assert not np.isnan(dqkv).any()
    errs = _grad_errors(dqkv, reference.attention_backward(dout, qkv, H))
    assert max(errs) < GRAD_TOL, f"dq, dk, dv relative errors {errs}"


@pytest.mark.gpu
@pytest.mark.big
def test_attention_long_sequence(cp, rng):
    """T = 2048 (the issue's 'at least 2048'), one head of 64."""
    B, T, H, d = 1, 2048, 1, 64
    qkv, dout = _inputs(rng, B, T, H, d)
    out, lse = _run_forward(cp, qkv, H)
    ref_out, ref_lse = reference.attention_forward(qkv, H)
    assert rel_err(out.get(), ref_out) < OUT_TOL
    assert np.max(np.abs(lse.get().astype(np.float64) - ref_lse)) < LSE_TOL
    dqkv = ops.attention_backward(cp.asarray(dout), cp.asarray(qkv), out, lse, H)
    errs = _grad_errors(dqkv.get(), reference.attention_backward(dout, qkv, H))
    assert max(errs) < GRAD_TOL, f"dq, dk, dv relative errors {errs}"


@pytest.mark.gpu
def test_attention_backward_is_deterministic(cp, rng):
    """No atomics: two runs give identical bits (T not a multiple of any tile)."""
    B, T, H, d = 2, 257, 2, 64
    qkv, dout = _inputs(rng, B, T, H, d)
    qkv, dout = cp.asarray(qkv), cp.asarray(dout)
    out, lse = ops.attention_forward(qkv, H)
    first = cp.full(qkv.shape, np.nan, dtype=np.float32)
    second = cp.full(qkv.shape, -np.inf, dtype=np.float32)
    ops.attention_backward(dout, qkv, out, lse, H, dqkv=first)
    ops.attention_backward(dout, qkv, out, lse, H, dqkv=second)
    assert bool(cp.all(first.view(cp.uint32) == second.view(cp.uint32)))
    out2, lse2 = ops.attention_forward(qkv, H)
    assert bool(cp.all(out.view(cp.uint32) == out2.view(cp.uint32)))
    assert bool(cp.all(lse.view(cp.uint32) == lse2.view(cp.uint32)))


@pytest.mark.gpu
def test_attention_allocates_outputs_and_uses_stream(cp, rng):
    B, T, H, d = 2, 33, 2, 32
    qkv, dout = _inputs(rng, B, T, H, d)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        q, g = cp.asarray(qkv), cp.asarray(dout)
    out, lse = ops.attention_forward(q, H, stream=stream)
    assert out.shape == (B, T, H * d) and out.dtype == np.float32
    assert lse.shape == (B, H, T) and lse.dtype == np.float32
    dqkv = ops.attention_backward(g, q, out, lse, H, stream=stream)
    assert dqkv.shape == qkv.shape
    stream.synchronize()
    ref_out, _ = reference.attention_forward(qkv, H)
    assert rel_err(out.get(), ref_out) < OUT_TOL
    errs = _grad_errors(dqkv.get(), reference.attention_backward(dout, qkv, H))
    assert max(errs) < GRAD_TOL


# ---- argument checks -------------------------------------------------------------------------

def test_attention_rejects_host_array():
    qkv = np.zeros((1, 4, 96), np.float32)
    with pytest.raises(TypeError, match="attention_forward: argument 'qkv'.*NumPy"):
        ops.attention_forward(qkv, 1)
    with pytest.raises(TypeError, match="attention_backward: argument 'dout'.*NumPy"):
        ops.attention_backward(np.zeros((1, 4, 32), np.float32), qkv, None, None, 1)


@pytest.mark.gpu
def test_attention_forward_rejects_bad_arguments(cp):
    qkv = cp.zeros((2, 5, 3 * 64), cp.float32)
    with pytest.raises(ValueError, match="attention_forward: argument 'qkv' must have 3 dimensions"):
        ops.attention_forward(cp.zeros((5, 192), cp.float32), 1)
    with pytest.raises(ValueError, match="attention_forward: argument 'qkv' has shape .* not divisible by 3"):
        ops.attention_forward(cp.zeros((2, 5, 100), cp.float32), 1)
    with pytest.raises(ValueError, match="attention_forward: 'n_head' = 3 does not divide C = 64"):
        ops.attention_forward(qkv, 3)
    with pytest.raises(ValueError, match=r"attention_forward: head dimension C/n_head = 64/4 = 16 is not supported"):
        ops.attention_forward(qkv, 4)
    with pytest.raises(ValueError, match=r"attention_forward: head dimension C/n_head = 96/2 = 48 is not supported"):
        ops.attention_forward(cp.zeros((1, 3, 288), cp.float32), 2)
    with pytest.raises(ValueError, match=r"attention_forward: head dimension C/n_head = 256/1 = 256 is not supported"):
        ops.attention_forward(cp.zeros((1, 3, 768), cp.float32), 1)
    with pytest.raises(ValueError, match="attention_forward: 'n_head' must be a positive integer"):
        ops.attention_forward(qkv, 0)
    with pytest.raises(ValueError, match="attention_forward: 'n_head' must be a positive integer"):
        ops.attention_forward(qkv, 2.0)
    with pytest.raises(ValueError, match="attention_forward: argument 'qkv' has shape .*B and T must be at least 1"):
        ops.attention_forward(cp.zeros((2, 0, 192), cp.float32), 1)
    with pytest.raises(TypeError, match="attention_forward: argument 'qkv' has dtype float64"):
        ops.attention_forward(qkv.astype(cp.float64), 1)
    with pytest.raises(ValueError, match="attention_forward: argument 'qkv' must be C-contiguous"):
        ops.attention_forward(cp.zeros((2, 3 * 64, 5), cp.float32).transpose(0, 2, 1), 1)
    with pytest.raises(ValueError, match="attention_forward: argument 'out' has shape"):
        ops.attention_forward(qkv, 1, out=cp.zeros((2, 5, 192), cp.float32))
    with pytest.raises(ValueError, match="attention_forward: argument 'lse' has shape"):
        ops.attention_forward(qkv, 1, lse=cp.zeros((2, 5), cp.float32))
    with pytest.raises(TypeError, match="attention_forward: argument 'lse' has dtype float64"):
        ops.attention_forward(qkv, 1, lse=cp.zeros((2, 1, 5), cp.float64))
    flat = cp.zeros(2 * 5 * 192 + 1, cp.float32)
    with pytest.raises(ValueError, match="attention_forward: argument 'qkv' must be 16-byte aligned"):
        ops.attention_forward(flat[1:].reshape(2, 5, 192), 1)
    with pytest.raises(ValueError, match="attention_forward: arguments 'out' and 'qkv' overlap"):
        ops.attention_forward(qkv, 1, out=qkv.reshape(-1)[:640].reshape(2, 5, 64))


@pytest.mark.gpu
def test_attention_backward_rejects_bad_arguments(cp):
    B, T, H, d = 2, 5, 2, 32
    C = H * d
    qkv = cp.zeros((B, T, 3 * C), cp.float32)
    dout = cp.zeros((B, T, C), cp.float32)
    out = cp.zeros((B, T, C), cp.float32)
    lse = cp.zeros((B, H, T), cp.float32)
    with pytest.raises(ValueError, match="attention_backward: argument 'dout' has shape"):
        ops.attention_backward(cp.zeros((B, T, C + 1), cp.float32), qkv, out, lse, H)
    with pytest.raises(ValueError, match="attention_backward: argument 'out' has shape"):
        ops.attention_backward(dout, qkv, cp.zeros((B, T + 1, C), cp.float32), lse, H)
    with pytest.raises(ValueError, match="attention_backward: argument 'lse' has shape"):
        ops.attention_backward(dout, qkv, out, cp.zeros((B, T, H), cp.float32), H)
    with pytest.raises(TypeError, match="attention_backward: argument 'lse' has dtype float64"):
        ops.attention_backward(dout, qkv, out, lse.astype(cp.float64), H)
    with pytest.raises(TypeError, match="attention_backward: argument 'dout' has dtype float64"):
        ops.attention_backward(dout.astype(cp.float64), qkv, out, lse, H)
    with pytest.raises(ValueError, match="attention_backward: 'n_head' = 3 does not divide C = 64"):
        ops.attention_backward(dout, qkv, out, lse, 3)
    with pytest.raises(ValueError, match=r"attention_backward: head dimension C/n_head = 64/4 = 16 is not supported"):
        ops.attention_backward(dout, qkv, out, lse, 4)
    with pytest.raises(ValueError, match="attention_backward: argument 'dout' must be C-contiguous"):
        ops.attention_backward(cp.zeros((B, C, T), cp.float32).transpose(0, 2, 1), qkv, out, lse, H)
    with pytest.raises(ValueError, match="attention_backward: argument 'dqkv' has shape"):
        ops.attention_backward(dout, qkv, out, lse, H, dqkv=cp.zeros((B, T, C), cp.float32))
    with pytest.raises(ValueError, match="attention_backward: arguments 'dqkv' and 'qkv' overlap"):
        ops.attention_backward(dout, qkv, out, lse, H, dqkv=qkv)
    with pytest.raises(TypeError, match="attention_backward: argument 'out' must be a CuPy array"):
        ops.attention_backward(dout, qkv, out.get(), lse, H)


# ---- dropout on the attention probabilities ----------------------------------------------------
# The kernels regenerate the keep mask reference.attention_dropout_mask(B, H, T, p, seed, offset)
# (Philox, element index ((b*H + h)*T + i)*T + j) in each of forward, dk/dv and dq; the float64
# reference uses that same mask, so the tolerances are those above: dropout only zeroes and
# rescales TF32 products, it adds no rounding of its own beyond one fp32 multiply by 1/(1-p).
# The mask itself is checked exactly (test_attention_dropout_mask_is_the_reference_mask).

DROP_T = (1, 7, 65, 257)
DROP_CASES = [pytest.param(T, d, p, id=f"T{T}-d{d}-p{p}")
              for T in DROP_T for d in HEAD_DIMS for p in (0.1, 0.5)]


def _keys(rng):
    """A seed and an offset that use both 32-bit halves."""
    return int(rng.integers(2**32, 2**63)), int(rng.integers(2**32, 2**62))


def _drop_grad_errors(dqkv, ref):
    """_grad_errors, except that everything may be dropped at T = 1 (exact zeros then)."""
    if np.linalg.norm(ref) == 0:
        assert not np.any(dqkv)
        return [0.0, 0.0, 0.0]
    return _grad_errors(dqkv, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("T, d, p", DROP_CASES)
def test_attention_dropout_matches_reference(cp, rng, T, d, p):
    B, H = _bh(T)
    qkv, dout = _inputs(rng, B, T, H, d)
    seed, offset = _keys(rng)
    out = cp.full((B, T, H * d), np.nan, dtype=np.float32)
    lse = cp.full((B, H, T), np.nan, dtype=np.float32)
    g_qkv, g_dout = cp.asarray(qkv), cp.asarray(dout)
    ops.attention_forward(g_qkv, H, out=out, lse=lse, dropout_p=p, seed=seed, offset=offset)
    ref_out, ref_lse = reference.attention_forward_dropout(qkv, H, p, seed, offset)
    o, l = out.get(), lse.get()
    assert not np.isnan(o).any() and not np.isnan(l).any()
    assert rel_err(o, ref_out) < OUT_TOL
    assert np.max(np.abs(l.astype(np.float64) - ref_lse)) < LSE_TOL
    dqkv = cp.full(qkv.shape, np.nan, dtype=np.float32)
    ops.attention_backward(g_dout, g_qkv, out, lse, H, dqkv=dqkv, dropout_p=p, seed=seed,
                           offset=offset)
    got = dqkv.get()
    assert not np.isnan(got).any()
    errs = _drop_grad_errors(got, reference.attention_backward_dropout(dout, qkv, H, p, seed,
                                                                       offset))
    assert max(errs) < GRAD_TOL, f"dq, dk, dv relative errors {errs}"


@pytest.mark.gpu
@pytest.mark.parametrize("T, d", [(7, 64), (65, 32), (257, 128)], ids=["T7-d64", "T65-d32",
                                                                      "T257-d128"])
def test_attention_dropout_mask_is_the_reference_mask(cp, rng, T, d):
    """Each kernel's mask, bit for bit, through inputs that expose it. With q = 0 every
    probability is P_ij = 1/(i+1). Key window j0 (k_j = v_j = e_(j-j0) for j0 <= j < j0+d, else
    0): out_i[m] = r M[i, j0+m] / (i+1), nonzero exactly where kept (forward kernel); with dO = 1,
    dS_ij = P_ij (M_ij r - D_i) and dq_i[m] = dS_(i, j0+m) / sqrt(d), so a wrong keep bit moves
    dq by P r / sqrt(d), far above the TF32 noise (~1e-3 of it) (dq kernel). Query window i0
    (k = v = 0, dO_i = e_(i-i0)): dv_j[m] = r M[i0+m, j] / (i0+m+1), nonzero exactly where kept
    (dk/dv kernel). Two heads, so (b*H + h) is exercised too; T % 4 != 0 puts groups across rows."""
    B, H, p = 1, 2, 0.5
    C = H * d
    seed, offset = _keys(rng)
    M = reference.attention_dropout_mask(B, H, T, p, seed, offset)[0]  # (H, T, T)
    causal = np.tril(np.ones((T, T), bool))
    r = float(reference.dropout_scale(p))
    for w0 in range(0, T, d):
        n = min(d, T - w0)
        eye = np.zeros((T, d), np.float32)
        eye[w0:w0 + n, :n] = np.eye(n, dtype=np.float32)
        # key window: forward and dq
        qkv = np.zeros((B, T, 3 * C), np.float32)
        for h in range(H):
            qkv[0, :, C + h * d:C + (h + 1) * d] = eye
            qkv[0, :, 2 * C + h * d:2 * C + (h + 1) * d] = eye
        dout = np.ones((B, T, C), np.float32)
        g = cp.asarray(qkv)
        out, lse = ops.attention_forward(g, H, dropout_p=p, seed=seed, offset=offset)
        dqkv = ops.attention_backward(cp.asarray(dout), g, out, lse, H, dropout_p=p, seed=seed,
                                      offset=offset).get()
        out = out.get()
        ref = reference.attention_backward_dropout(dout, qkv, H, p, seed, offset)
        i = np.arange(T)[:, None]
        for h in range(H):
            want = (M[h] & causal)[:, w0:w0 + n]
            np.testing.assert_array_equal(out[0, :, h * d:h * d + n] != 0, want)
            dq = dqkv[0, :, h * d:h * d + n]
            tol = 0.25 * r / ((i + 1) * np.sqrt(d))
            assert np.all(np.abs(dq - ref[0, :, h * d:h * d + n]) < tol)
        # query window: dk/dv kernel
        qkv = np.zeros((B, T, 3 * C), np.float32)
        dout = np.zeros((B, T, C), np.float32)
        for h in range(H):
            dout[0, :, h * d:(h + 1) * d] = eye
        g = cp.asarray(qkv)
        out, lse = ops.attention_forward(g, H, dropout_p=p, seed=seed, offset=offset)
        dqkv = ops.attention_backward(cp.asarray(dout), g, out, lse, H, dropout_p=p, seed=seed,
                                      offset=offset).get()
        for h in range(H):
            dv = dqkv[0, :, 2 * C + h * d:2 * C + h * d + n]  # dv[j, m]: query w0 + m, key j
            want = (M[h] & causal)[w0:w0 + n, :].T
            np.testing.assert_array_equal(dv != 0, want)


@pytest.mark.gpu
def test_attention_dropout_is_reproducible_and_keyed(cp, rng):
    B, T, H, d, p = 2, 130, 2, 64, 0.2
    qkv, dout = _inputs(rng, B, T, H, d)
    qkv, dout = cp.asarray(qkv), cp.asarray(dout)

    def run(seed, offset):
        out, lse = ops.attention_forward(qkv, H, dropout_p=p, seed=seed, offset=offset)
        dqkv = ops.attention_backward(dout, qkv, out, lse, H, dropout_p=p, seed=seed,
                                      offset=offset)
        return out.view(cp.uint32), lse.view(cp.uint32), dqkv.view(cp.uint32)

    a, b = run(11, 2**35 + 3), run(11, 2**35 + 3)
    for x, y in zip(a, b):
        assert bool(cp.all(x == y))
    for other in (run(11, 2**35 + 4), run(12, 2**35 + 3)):
        assert not bool(cp.all(other[0] == a[0]))  # out differs
        assert bool(cp.all(other[1] == a[1]))      # lse never sees the mask
        assert not bool(cp.all(other[2] == a[2]))


@pytest.mark.gpu
def test_attention_dropout_p_zero_is_the_plain_kernel(cp, rng):
    B, T, H, d = 2, 65, 3, 32
    qkv, dout = _inputs(rng, B, T, H, d)
    qkv, dout = cp.asarray(qkv), cp.asarray(dout)
    out, lse = ops.attention_forward(qkv, H)
    out0, lse0 = ops.attention_forward(qkv, H, dropout_p=0.0, seed=99, offset=7)
    assert bool(cp.all(out.view(cp.uint32) == out0.view(cp.uint32)))
    assert bool(cp.all(lse.view(cp.uint32) == lse0.view(cp.uint32)))
    dq = ops.attention_backward(dout, qkv, out, lse, H)
    dq0 = ops.attention_backward(dout, qkv, out, lse, H, dropout_p=0, seed=99, offset=7)
    assert bool(cp.all(dq.view(cp.uint32) == dq0.view(cp.uint32)))


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(dropout_p=1.0), ValueError, "argument 'dropout_p' must satisfy 0 <= dropout_p < 1"),
    (dict(dropout_p=-0.1), ValueError, "argument 'dropout_p' must satisfy"),
    (dict(dropout_p=1 - 1e-9), ValueError, "argument 'dropout_p' must satisfy"),  # 1 as float32
    (dict(dropout_p=float("nan")), ValueError, "argument 'dropout_p' must satisfy"),
    (dict(dropout_p="0.1"), TypeError, "argument 'dropout_p' must be a number"),
    (dict(dropout_p=True), TypeError, "argument 'dropout_p' must be a number"),
    (dict(dropout_p=0.1, seed=-1), ValueError, "argument 'seed' must satisfy 0 <= seed < 2\\*\\*64"),
    (dict(dropout_p=0.1, seed=2**64), ValueError, "argument 'seed' must satisfy"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, "argument 'seed' must be an integer"),
    (dict(dropout_p=0.1, offset=-1), ValueError, "argument 'offset' must satisfy"),
    (dict(dropout_p=0.1, offset=None), TypeError, "argument 'offset' must be an integer"),
])
def test_attention_dropout_rejects_bad_scalars(kw, exc, msg):
    """Checked before the arrays (so this runs without a GPU, with host arrays)."""
    qkv = np.zeros((1, 4, 96), np.float32)
    dout = np.zeros((1, 4, 32), np.float32)
    with pytest.raises(exc, match=f"attention_forward: {msg}"):
        ops.attention_forward(qkv, 1, **kw)
    with pytest.raises(exc, match=f"attention_backward: {msg}"):
        ops.attention_backward(dout, qkv, None, None, 1, **kw)
