"""cross_entropy_forward_backward against reference.cross_entropy_forward/_backward, and its
argument checks."""
import numpy as np
import pytest

from textgpt2 import ops, reference

# Tolerances. Losses: fp32 exp2 (hardware, ~2 ulp), per-thread and block-wide fp32 sums and logf
# give a relative error of a few 1e-7 (1e-7 absolute for a near-zero loss); 1e-5 leaves margin.
# dlogits: each softmax entry carries ~1e-6 relative error (exp2, the sum, 1/sum); after
# subtracting the one-hot that is an absolute error of up to ~1e-6 on the target entry, so
# compare dlogits / scale with rtol 1e-5 and atol 1e-6.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-5
D_RTOL, D_ATOL = 1e-5, 1e-6

# (leading shape of targets, V, Vp): V = 37 padded to 128; GPT-2's 50257 -> 50304; V == Vp
# (1000, a multiple of 4; 37, not: scalar path); V = 1; N = 1, 33 (not a multiple of 32), 2*3.
CASES = [((1,), 37, 128), ((33,), 37, 128), ((5,), 50257, 50304), ((2, 3), 1000, 1000),
         ((3,), 37, 37), ((4,), 1, 128), ((7,), 256, 256)]


def _logits(rng, lead, V, Vp, kind="normal"):
    if kind == "normal":
        x = rng.standard_normal(lead + (Vp,)) * 2.0
    elif kind == "wide":      # logits spread over [-80, 80]
        x = rng.uniform(-80.0, 80.0, lead + (Vp,))
    elif kind == "high":      # every logit near +80 (naive exp overflows fp32 at 88.7)
        x = 80.0 + rng.standard_normal(lead + (Vp,))
    elif kind == "low":       # every logit near -80 (naive exp underflows)
        x = -80.0 + rng.standard_normal(lead + (Vp,))
    x = x.astype(np.float32)
    # padded columns hold garbage that must not matter (NaN and inf in alternate columns)
    x[..., V::2] = np.nan
    x[..., V + 1::2] = np.inf
    return x


def _targets(rng, lead, V):
    return rng.integers(0, V, size=lead).astype(np.int32)


def _run(cp, logits, targets, V, scale=None, in_place=False):
    lg = cp.asarray(logits)
    losses = cp.full(targets.shape, np.nan, dtype=np.float32)
    dl = lg if in_place else cp.full(logits.shape, np.nan, dtype=np.float32)
    out_l, out_d = ops.cross_entropy_forward_backward(lg, cp.asarray(targets), V, losses=losses,
                                                      dlogits=dl, dloss_scale=scale)
    assert out_l is losses and out_d is dl
    return losses.get(), dl.get()


def _check(logits, targets, V, losses, dlogits, scale=None):
    N = targets.size
    s = 1.0 / N if scale is None else scale
    np.testing.assert_allclose(losses, reference.cross_entropy_forward(logits, targets, V),
                               rtol=LOSS_RTOL, atol=LOSS_ATOL)
    ref = reference.cross_entropy_backward(logits, targets, V, scale=s)
    np.testing.assert_allclose(dlogits[..., :V] / s, ref[..., :V] / s, rtol=D_RTOL, atol=D_ATOL)
    assert np.all(dlogits[..., V:] == 0.0)  # padded columns exactly 0 (not -0.0 either way)


@pytest.mark.gpu
@pytest.mark.parametrize("lead,V,Vp", CASES)
def test_cross_entropy_matches_reference(cp, rng, lead, V, Vp):
    logits, targets = _logits(rng, lead, V, Vp), _targets(rng, lead, V)
    losses, dlogits = _run(cp, logits, targets, V)
    _check(logits, targets, V, losses, dlogits)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["wide", "high", "low"])
@pytest.mark.parametrize("V,Vp", [(50257, 50304), (37, 128)])
def test_cross_entropy_extreme_logits(cp, rng, kind, V, Vp):
    lead = (3,)
    logits, targets = _logits(rng, lead, V, Vp, kind), _targets(rng, lead, V)
    losses, dlogits = _run(cp, logits, targets, V)
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(dlogits))
    _check(logits, targets, V, losses, dlogits)


@pytest.mark.gpu
def test_cross_entropy_confident_rows(cp, rng):
    # target logit far above the rest: loss ~ 0 must come out ~0, not ulp(80) ~ 8e-6
    V, Vp = 1000, 1024
    logits = _logits(rng, (2,), V, Vp)
    targets = np.array([10, 999], dtype=np.int32)
    logits[0, 10], logits[1, 999] = 90.0, 85.0
    losses, dlogits = _run(cp, logits, targets, V, scale=1.0)
    assert np.all(np.abs(losses) < 1e-6)
    _check(logits, targets, V, losses, dlogits, scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("V,Vp", [(50257, 50304), (37, 128), (1000, 1000), (37, 37)])
def test_cross_entropy_in_place_equals_out_of_place(cp, rng, V, Vp):
    logits, targets = _logits(rng, (9,), V, Vp), _targets(rng, (9,), V)
    l1, d1 = _run(cp, logits, targets, V, scale=0.37)
    l2, d2 = _run(cp, logits, targets, V, scale=0.37, in_place=True)
    assert np.array_equal(l1, l2)
    assert np.array_equal(d1, d2)
    _check(logits, targets, V, l2, d2, scale=0.37)


@pytest.mark.gpu
def test_cross_entropy_forward_only(cp, rng):
    V, Vp = 50257, 50304
    logits, targets = _logits(rng, (4,), V, Vp), _targets(rng, (4,), V)
    lg = cp.asarray(logits)
    losses, dl = ops.cross_entropy_forward_backward(lg, cp.asarray(targets), V, backward=False)
    assert dl is None
    np.testing.assert_array_equal(lg.get(), logits)  # logits untouched
    l_full, _ = _run(cp, logits, targets, V)
    assert np.array_equal(losses.get(), l_full)  # the same pass-1 arithmetic
    np.testing.assert_allclose(losses.get(), reference.cross_entropy_forward(logits, targets, V),
                               rtol=LOSS_RTOL, atol=LOSS_ATOL)


@pytest.mark.gpu
def test_cross_entropy_default_v_and_scale(cp, rng):
    logits, targets = _logits(rng, (2, 5), 300, 300), _targets(rng, (2, 5), 300)
    losses, dl = ops.cross_entropy_forward_backward(cp.asarray(logits), cp.asarray(targets))
    _check(logits, targets, 300, losses.get(), dl.get())  # V = Vp, scale = 1/10


@pytest.mark.gpu
@pytest.mark.parametrize("V,Vp", [(50257, 50304), (37, 128), (37, 37)])
def test_cross_entropy_bad_targets_give_nan_rows(cp, rng, V, Vp):
    logits = _logits(rng, (5,), V, Vp)
    targets = np.array([3, -1, V, Vp + 7, V - 1], dtype=np.int32)
    losses, dlogits = _run(cp, logits, targets, V, scale=1.0)
    bad = np.array([False, True, True, True, False])
    assert np.all(np.isnan(losses[bad])) and np.all(np.isnan(dlogits[bad, :V]))
    assert np.all(dlogits[:, V:] == 0.0)
    good = ~bad
    _check(logits[good], targets[good], V, losses[good], dlogits[good], scale=1.0)


@pytest.mark.gpu
def test_cross_entropy_nonfinite_logits(cp, rng):
    V, Vp = 300, 384
    logits = _logits(rng, (3,), V, Vp)
    targets = np.array([5, 7, 9], dtype=np.int32)
    logits[0, 17] = np.nan                 # poisons row 0 only
    logits[1, [3, 200]] = -np.inf          # masked columns: probability 0
    losses, dlogits = _run(cp, logits, targets, V, scale=1.0)
    assert np.isnan(losses[0]) and np.all(np.isfinite(losses[1:]))
    assert dlogits[1, 3] == 0.0 and dlogits[1, 200] == 0.0
    _check(logits[1:], targets[1:], V, losses[1:], dlogits[1:], scale=1.0)


@pytest.mark.gpu
@pytest.mark.big
def test_cross_entropy_gpt2_size(cp, rng):
    # B*T = 16384 rows of 50304 logits (3.3 GB), in place as training does; the float64 reference
    # runs on 256 sampled rows
    N, V, Vp = 16384, 50257, 50304
    lg = cp.random.standard_normal((N, Vp), dtype=cp.float32) * 3
    lg[:, V:] = 0
    targets = _targets(rng, (N,), V)
    rows = np.sort(rng.choice(N, 256, replace=False))
    sample = lg[cp.asarray(rows)].get()
    losses, dl = ops.cross_entropy_forward_backward(lg, cp.asarray(targets), V, dlogits=lg)
    losses, dl = losses.get(), dl[cp.asarray(rows)].get()
    assert np.all(np.isfinite(losses))
    _check(sample, targets[rows], V, losses[rows], dl, scale=1.0 / N)


# ---- argument checks ---------------------------------------------------------------------

def test_cross_entropy_rejects_host_arrays():
    with pytest.raises(TypeError,
                       match="cross_entropy_forward_backward: argument 'logits'.*NumPy"):
        ops.cross_entropy_forward_backward(np.zeros((2, 8), np.float32), np.zeros(2, np.int32))


@pytest.mark.gpu
def test_cross_entropy_rejects_bad_arguments(cp):
    op = "cross_entropy_forward_backward"
    lg = cp.zeros((4, 8), cp.float32)
    tg = cp.zeros(4, cp.int32)
    f = ops.cross_entropy_forward_backward
    with pytest.raises(TypeError, match=f"{op}: argument 'targets'.*NumPy"):
        f(lg, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=fr"{op}: argument 'targets' has shape \(5,\)"):
        f(lg, cp.zeros(5, cp.int32))
    with pytest.raises(TypeError, match=f"{op}: argument 'targets' has dtype int64"):
        f(lg, cp.zeros(4, cp.int64))
    with pytest.raises(TypeError, match=f"{op}: argument 'logits' has dtype float64"):
        f(cp.zeros((4, 8), cp.float64), tg)
    with pytest.raises(ValueError, match=f"{op}: argument 'logits' must be C-contiguous"):
        f(cp.zeros((8, 4), cp.float32).T, tg)
    with pytest.raises(ValueError, match=f"{op}: 'V' must be an integer with 0 < V <= Vp = 8"):
        f(lg, tg, 9)
    with pytest.raises(ValueError, match=f"{op}: 'V' must be an integer"):
        f(lg, tg, 0)
    with pytest.raises(ValueError, match=f"{op}: 'V' must be an integer"):
        f(lg, tg, 4.0)
    with pytest.raises(ValueError, match=f"{op}: 'dloss_scale' must be a finite number"):
        f(lg, tg, 8, dloss_scale=float("nan"))
    with pytest.raises(ValueError, match=f"{op}: argument 'losses' has shape"):
        f(lg, tg, losses=cp.zeros(5, cp.float32))
    with pytest.raises(ValueError, match=f"{op}: argument 'dlogits' has shape"):
        f(lg, tg, dlogits=cp.zeros((4, 7), cp.float32))
    with pytest.raises(ValueError, match=f"{op}: argument 'dlogits' was given with backward=False"):
        f(lg, tg, dlogits=cp.zeros((4, 8), cp.float32), backward=False)
    with pytest.raises(ValueError, match=f"{op}: argument 'dlogits' overlaps 'logits'"):
        buf = cp.zeros(40, cp.float32)
        f(buf[:32].reshape(4, 8), tg, dlogits=buf[8:].reshape(4, 8))
    with pytest.raises(ValueError, match=f"{op}: argument 'losses' overlaps 'logits'"):
        f(lg, tg, losses=lg[0, :4], backward=False)
    with pytest.raises(ValueError, match=f"{op}: argument 'logits' must have at least 1 dim"):
        f(cp.zeros((), cp.float32), cp.zeros((), cp.int32))
