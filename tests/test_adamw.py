"""global_norm_squared and adamw_update against reference.global_norm / reference.adamw_update,
textgpt2.optim (AdamW on a stand-in model, state_dict checks, lr_schedule), and argument checks.

Tolerances (the reason each holds):
- global norm: partial sums are float64 and each square of four floats is summed in float32,
  so the float32 result is within a few ulps of the float64 sum: rel_err < 1e-6.
- adamw, elementwise: beta1/beta2 cross the binding as float32, so (1 - beta) carries a
  relative error of 2.4e-7 into m and v, plus one rounding per step. v sums positive terms:
  |v - v_ref| <= 1e-6 |v_ref|. m's terms can cancel, so its error is bounded by the size of
  the terms: |m - m_ref| <= 1e-6 (|m_ref| + max|g|). params: float32 storage rounds each
  step by up to 6e-8 |p|; the update itself (p - p0, ~lr per step) must satisfy
  |dp - dp_ref| <= 1e-3 lr (a float32 emulation gives <= 1e-4 lr after 5 steps with |p| ~ 1),
  which still catches any element updated wrongly (missed tail, decay boundary off by one:
  errors of order lr * weight_decay * |p| or more).
"""
import math

import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import ops, optim, reference

B1, B2, EPS = 0.9, 0.95, 1e-8


# ---- helpers -------------------------------------------------------------------------------

def ref_update(P, G, M, V, lr, step, wd, n_decay, grad_scale=1.0, b1=B1, b2=B2, eps=EPS):
    """reference.adamw_update over a flat buffer: decay on [0, n_decay), none after."""
    parts = []
    for lo, hi, decay in ((0, n_decay, True), (n_decay, P.size, False)):
        if hi > lo:
            parts.append(reference.adamw_update(
                P[lo:hi], G[lo:hi], M[lo:hi], V[lo:hi], lr=lr, beta1=b1, beta2=b2, eps=eps,
                weight_decay=wd, step=step, decay=decay, grad_scale=grad_scale))
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def assert_adamw_close(p, m, v, P, M, V, p0, lr, gmax):
    """Elementwise, so a single wrong element (tail, head, decay boundary) fails. gmax: the
    largest |gradient| (or |m0|) that went into m, whose rounding error m inherits even where
    the terms cancel."""
    p, m, v = (np.asarray(a, np.float64) for a in (p, m, v))
    bad = np.abs(m - M) > 1e-6 * (np.abs(M) + gmax)
    assert not bad.any(), f"m differs at {np.flatnonzero(bad)[:5]}"
    bad = np.abs(v - V) > 1e-6 * np.abs(V)
    assert not bad.any(), f"v differs at {np.flatnonzero(bad)[:5]}"
    err = np.abs((p - p0) - (P - p0))
    assert err.max() <= 1e-3 * lr, f"update error {err.max():.3g} at element {np.argmax(err)}"


# ---- lr_schedule (CPU) ---------------------------------------------------------------------

def test_lr_schedule_warmup():
    lr, min_lr = 6e-4, 6e-5
    assert optim.lr_schedule(0, 1000, lr, min_lr, 100) == pytest.approx(lr / 100)
    assert optim.lr_schedule(49, 1000, lr, min_lr, 100) == pytest.approx(lr * 50 / 100)
    assert optim.lr_schedule(99, 1000, lr, min_lr, 100) == pytest.approx(lr)
    warm = [optim.lr_schedule(s, 1000, lr, min_lr, 100) for s in range(100)]
    assert all(a < b for a, b in zip(warm, warm[1:]))


def test_lr_schedule_cosine_decay():
    lr, min_lr, warmup, max_steps = 1e-3, 1e-4, 10, 110
    assert optim.lr_schedule(warmup, max_steps, lr, min_lr, warmup) == pytest.approx(lr)
    mid = optim.lr_schedule(warmup + 50, max_steps, lr, min_lr, warmup)
    assert mid == pytest.approx((lr + min_lr) / 2)
    decay = [optim.lr_schedule(s, max_steps, lr, min_lr, warmup)
             for s in range(warmup, max_steps + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing
    assert all(min_lr <= x <= lr for x in decay)
    assert optim.lr_schedule(max_steps, max_steps, lr, min_lr, warmup) == pytest.approx(min_lr)
    assert optim.lr_schedule(max_steps + 500, max_steps, lr, min_lr, warmup) == min_lr


def test_lr_schedule_edge_cases():
    # no warmup: step 0 is the peak
    assert optim.lr_schedule(0, 100, 1e-3, 0.0, 0) == pytest.approx(1e-3)
    # all warmup: reaches lr at the last step, min_lr from max_steps on
    assert optim.lr_schedule(9, 10, 1e-3, 1e-5, 10) == pytest.approx(1e-3)
    assert optim.lr_schedule(10, 10, 1e-3, 1e-5, 10) == 1e-5
    # constant schedule
    assert optim.lr_schedule(5, 10, 1e-3, 1e-3, 2) == pytest.approx(1e-3)
    assert isinstance(optim.lr_schedule(np.int64(3), 10, 1e-3, 0.0, 2), float)


@pytest.mark.parametrize("args, match", [
    ((-1, 100, 1e-3, 0.0, 10), "lr_schedule: argument 'step' must be an integer >= 0"),
    ((1.0, 100, 1e-3, 0.0, 10), "lr_schedule: argument 'step' must be an integer"),
    ((True, 100, 1e-3, 0.0, 10), "lr_schedule: argument 'step' must be an integer"),
    ((0, 0, 1e-3, 0.0, 0), "lr_schedule: argument 'max_steps' must be an integer >= 1"),
    ((0, 100, 1e-3, 0.0, -1), "lr_schedule: argument 'warmup' must be an integer >= 0"),
    ((0, 100, 1e-3, 0.0, 101), r"lr_schedule: argument 'warmup' \(101\) must not exceed"),
    ((0, 100, -1e-3, 0.0, 10), "lr_schedule: argument 'lr' must be a finite number >= 0"),
    ((0, 100, float("nan"), 0.0, 10), "lr_schedule: argument 'lr' must be a finite number"),
    ((0, 100, 1e-3, float("inf"), 10), "lr_schedule: argument 'min_lr' must be a finite number"),
    ((0, 100, 1e-3, -1e-5, 10), "lr_schedule: argument 'min_lr' must be a finite number >= 0"),
    ((0, 100, 1e-3, 2e-3, 10), "lr_schedule: argument 'min_lr' .* must not exceed 'lr'"),
    ((0, 100, "1e-3", 0.0, 10), "lr_schedule: argument 'lr' must be a finite number"),
])
def test_lr_schedule_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        optim.lr_schedule(*args)


# ---- optim: state dict checks, constructor checks, grad_norm (CPU) --------------------------

def good_state(n=10):
    return {"m": np.zeros(n, np.float32), "v": np.ones(n, np.float32), "step": 3, "lr": 1e-3,
            "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "max_norm": 1.0}


def test_check_state_dict_normalizes():
    s = good_state()
    s["m"] = np.arange(10, dtype=np.float64)  # converted to float32
    s["betas"] = [0.8, 0.99]                   # a JSON round trip gives a list
    out = optim.check_state_dict(s, 10)
    assert out["m"].dtype == np.float32 and out["m"].shape == (10,)
    assert out["step"] == 3 and out["betas"] == (0.8, 0.99) and out["max_norm"] == 1.0
    # hyperparameters are optional
    out = optim.check_state_dict({"m": s["m"], "v": s["v"], "step": 0}, 10)
    assert set(out) == {"m", "v", "step"}


@pytest.mark.parametrize("change, exc, match", [
    (lambda s: s.pop("v"), ValueError, "missing key\\(s\\) 'v'"),
    (lambda s: s.update(wte=np.zeros(3)), ValueError, "unexpected key\\(s\\) 'wte'"),
    (lambda s: s.update(m=np.zeros(9, np.float32)), ValueError,
     r"key 'm' has shape \(9,\), expected \(10,\)"),
    (lambda s: s.update(v=np.zeros((2, 5), np.float32)), ValueError,
     r"key 'v' has shape \(2, 5\)"),
    (lambda s: s.update(m=np.zeros(10, np.int32)), TypeError,
     "key 'm' must be a floating-point array"),
    (lambda s: s["m"].__setitem__(4, np.nan), ValueError, "key 'm' contains NaN or infinite"),
    (lambda s: s["v"].__setitem__(2, -1.0), ValueError, "key 'v' .* contains negative values"),
    (lambda s: s.update(step=-1), ValueError, "key 'step' must be an integer >= 0"),
    (lambda s: s.update(step=2.0), ValueError, "key 'step' must be an integer"),
    (lambda s: s.update(betas=(0.9, 1.0)), ValueError, r"key 'betas\[1\]' must be a finite number"),
    (lambda s: s.update(betas=0.9), ValueError, "key 'betas' must be a pair"),
    (lambda s: s.update(lr=-1.0), ValueError, "key 'lr' must be a finite number >= 0"),
    (lambda s: s.update(eps=0.0), ValueError, "key 'eps' must be a finite number > 0"),
])
def test_check_state_dict_rejects(change, exc, match):
    s = good_state()
    change(s)
    with pytest.raises(exc, match="AdamW.load_state_dict: " + match):
        optim.check_state_dict(s, 10)


def test_check_state_dict_rejects_non_dict():
    with pytest.raises(TypeError, match="AdamW.load_state_dict: expected a dict"):
        optim.check_state_dict([1, 2], 10)


class FakeModel:
    """Stands in for model.GPT: only the three attributes AdamW relies on."""

    def __init__(self, params, grads, n_decay):
        self.params, self.grads, self.n_decay = params, grads, n_decay


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "AdamW: argument 'lr' must be a finite number >= 0"),
    (dict(lr=1e-3, betas=(1.0, 0.95)),
     r"AdamW: argument 'betas\[0\]' must be a finite number >= 0.0 and < 1.0"),
    (dict(lr=1e-3, betas=(0.9,)), "AdamW: argument 'betas' must be a pair"),
    (dict(lr=1e-3, eps=0.0), "AdamW: argument 'eps' must be a finite number > 0"),
    (dict(lr=1e-3, weight_decay=-0.1),
     "AdamW: argument 'weight_decay' must be a finite number >= 0"),
    (dict(lr=1e-3, max_norm=-1.0), "AdamW: argument 'max_norm' must be a finite number >= 0"),
])
def test_adamw_optimizer_rejects_bad_hyperparameters(kwargs, match):
    model = FakeModel(np.zeros(4, np.float32), np.zeros(4, np.float32), 2)
    with pytest.raises(ValueError, match=match):
        optim.AdamW(model, **kwargs)


def test_adamw_optimizer_rejects_host_model():
    model = FakeModel(np.zeros(4, np.float32), np.zeros(4, np.float32), 2)
    with pytest.raises(TypeError,
                       match="AdamW: argument 'model.params' must be a CuPy array.*NumPy"):
        optim.AdamW(model, lr=1e-3)
    with pytest.raises(TypeError, match="AdamW: the model has no attribute 'params'"):
        optim.AdamW(object(), lr=1e-3)


def test_grad_norm_host_values():
    assert optim.grad_norm(np.array([16.0], np.float32)) == 4.0
    assert optim.grad_norm(9.0) == 3.0
    assert math.isnan(optim.grad_norm(np.array([np.nan], np.float32)))
    with pytest.raises(ValueError, match="grad_norm: expected a 1-element squared norm"):
        optim.grad_norm(np.zeros(2, np.float32))


# ---- ops argument checks that run without a GPU --------------------------------------------

def test_global_norm_rejects_host_array():
    with pytest.raises(TypeError, match="global_norm_squared: argument 'grads'.*NumPy"):
        ops.global_norm_squared(np.zeros(4, np.float32))


def test_adamw_update_rejects_host_array():
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="adamw_update: argument 'params'.*NumPy"):
        ops.adamw_update(a, a.copy(), a.copy(), a.copy(), lr=1e-3, step=1)


# Scalars are checked before the arrays, so these run without a GPU too.
@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "argument 'lr' must be a finite number >= 0"),
    (dict(lr=float("nan")), "argument 'lr' must be a finite number"),
    (dict(lr=float("inf")), "argument 'lr' must be a finite number"),
    (dict(lr=1e39), "argument 'lr' must be a finite number"),  # overflows the C float it becomes
    (dict(lr="0.1"), "argument 'lr' must be a finite number"),
    (dict(step=0), "argument 'step' must be an integer >= 1"),
    (dict(step=1.0), "argument 'step' must be an integer >= 1"),
    (dict(step=True), "argument 'step' must be an integer >= 1"),
    (dict(step=2**31), "argument 'step' must be an integer >= 1 .* < 2\\*\\*31"),
    (dict(beta1=1.0), "argument 'beta1' must be a finite number >= 0.0 and < 1.0"),
    (dict(beta1=-0.1), "argument 'beta1' must be a finite number >= 0.0 and < 1.0"),
    (dict(beta2=1.0), "argument 'beta2' must be a finite number >= 0.0 and < 1.0"),
    (dict(beta2=float("nan")), "argument 'beta2' must be a finite number"),
    (dict(eps=0.0), "argument 'eps' must be a finite number > 0"),
    (dict(eps=-1e-8), "argument 'eps' must be a finite number > 0"),
    (dict(weight_decay=-0.1), "argument 'weight_decay' must be a finite number >= 0"),
    (dict(max_norm=0.0), "argument 'max_norm' must be a finite number > 0"),
    (dict(max_norm=float("inf")), "argument 'max_norm' must be a finite number > 0"),
])
def test_adamw_update_rejects_bad_scalars(kwargs, match):
    args = dict(lr=1e-3, step=1)
    args.update(kwargs)
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="adamw_update: " + match):
        ops.adamw_update(a, a, a, a, **args)


# ---- global_norm_squared (GPU) -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 1000003, pytest.param(50_000_000, marks=pytest.mark.big)])
def test_global_norm_squared_matches_float64(cp, rng, n):
    g = (rng.standard_normal(n) * 0.01).astype(np.float32)
    out = cp.full(1, np.nan, dtype=np.float32)  # poisoned
    ops.global_norm_squared(cp.asarray(g), out=out)
    expect = reference.global_norm(g) ** 2
    assert rel_err(out.get()[0], expect) < 1e-6


@pytest.mark.gpu
def test_global_norm_squared_empty_is_zero(cp):
    out = cp.full(1, np.nan, dtype=np.float32)
    ops.global_norm_squared(cp.zeros(0, np.float32), out=out)
    assert out.get()[0] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("n", [2, 5, 100003])
def test_global_norm_squared_unaligned_view(cp, rng, offset, n):
    # views that start off a 16-byte boundary take the scalar head path
    g = rng.standard_normal(n + 4).astype(np.float32)
    buf = cp.asarray(g)
    out = ops.global_norm_squared(buf[offset:offset + n])
    assert rel_err(out.get()[0], reference.global_norm(g[offset:offset + n]) ** 2) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000003, 12_345_679])
def test_global_norm_squared_is_bitwise_reproducible(cp, rng, n):
    g = cp.asarray(rng.standard_normal(n).astype(np.float32))
    scratch = cp.empty(ops.global_norm_scratch_size(n), np.float32)
    runs = [ops.global_norm_squared(g).get() for _ in range(3)]
    runs.append(ops.global_norm_squared(g, scratch=scratch).get())
    assert all(r.tobytes() == runs[0].tobytes() for r in runs)


@pytest.mark.gpu
def test_global_norm_squared_rejects_bad_arguments(cp):
    g = cp.zeros(10, cp.float32)
    op = "global_norm_squared: "
    with pytest.raises(TypeError, match=op + "argument 'grads' has dtype float64"):
        ops.global_norm_squared(cp.zeros(10, cp.float64))
    with pytest.raises(ValueError, match=op + "argument 'grads' must have 1 dimensions"):
        ops.global_norm_squared(cp.zeros((2, 5), cp.float32))
    with pytest.raises(ValueError, match=op + "argument 'grads' must be C-contiguous"):
        ops.global_norm_squared(cp.zeros(20, cp.float32)[::2])
    with pytest.raises(TypeError, match=op + "argument 'out' has dtype float64"):
        ops.global_norm_squared(g, out=cp.zeros(1, cp.float64))
    with pytest.raises(ValueError, match=op + "argument 'out' must have exactly 1 element"):
        ops.global_norm_squared(g, out=cp.zeros(2, cp.float32))
    with pytest.raises(ValueError, match=op + "arguments 'out' and 'grads' overlap"):
        ops.global_norm_squared(g, out=g[3:4])
    n = 5_000_000
    with pytest.raises(ValueError, match=op + "argument 'scratch' has 1 elements, needs at least"):
        ops.global_norm_squared(cp.zeros(n, cp.float32), scratch=cp.zeros(1, cp.float32))
    with pytest.raises(ValueError, match=op + "argument 'scratch' must be 8-byte aligned"):
        s = cp.zeros(ops.global_norm_scratch_size(n) + 1, cp.float32)[1:]
        ops.global_norm_squared(cp.zeros(n, cp.float32), scratch=s)


# ---- adamw_update (GPU) --------------------------------------------------------------------

# (n, n_decay): n not a multiple of 4, n_decay inside a float4 and at the ends
ADAMW_CASES = [(1, 1), (1, 0), (7, 3), (1001, 517), (1001, 0), (1001, 1001), (1000003, 654321)]


@pytest.mark.gpu
@pytest.mark.parametrize("n, n_decay", ADAMW_CASES)
@pytest.mark.parametrize("clip", ["none", "inactive", "active"])
def test_adamw_update_matches_reference(cp, rng, n, n_decay, clip):
    lr, wd, steps = 1e-2, 0.1, 4
    p0 = rng.standard_normal(n).astype(np.float32)
    p, m, v = cp.asarray(p0), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    P, M, V = p0.astype(np.float64), np.zeros(n), np.zeros(n)
    gmax = 0.0
    for step in range(1, steps + 1):  # several steps: bias corrections change with step
        g = rng.standard_normal(n).astype(np.float32)
        gmax = max(gmax, float(np.abs(g).max()))
        if step == 2:
            g[1::5] = 0.0  # moments decaying without new gradient
        norm = reference.global_norm(g)
        norm_sq, max_norm, scale = None, 1.0, 1.0
        if clip != "none":
            max_norm = 2.0 * norm if clip == "inactive" else 0.25 * norm
            norm_sq = ops.global_norm_squared(cp.asarray(g))
            scale = reference.clip_scale(norm, max_norm)
            assert (scale == 1.0) == (clip == "inactive")
        g_dev = cp.asarray(g)
        ops.adamw_update(p, g_dev, m, v, lr, step, beta1=B1, beta2=B2, eps=EPS,
                         weight_decay=wd, n_decay=n_decay, norm_sq=norm_sq, max_norm=max_norm)
        assert np.array_equal(g_dev.get(), g)  # clipping scales a copy, not grads
        P, M, V = ref_update(P, g, M, V, lr, step, wd, n_decay, grad_scale=scale)
    assert_adamw_close(p.get(), m.get(), v.get(), P, M, V, p0, lr, gmax)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_sq_value, max_norm", [(16.0, 1.0), (16.0, 10.0), (0.0, 1.0)])
def test_adamw_update_reads_norm_on_device(cp, rng, norm_sq_value, max_norm):
    # clip = min(1, max_norm / (sqrt(norm_sq) + 1e-6)) from whatever norm_sq holds
    n, lr, wd, n_decay = 333, 3e-3, 0.05, 100
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m0 = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v0 = (rng.random(n) * 0.01).astype(np.float32)
    p, m, v = cp.asarray(p0), cp.asarray(m0), cp.asarray(v0)
    ops.adamw_update(p, cp.asarray(g), m, v, lr, 7, weight_decay=wd, n_decay=n_decay,
                     norm_sq=cp.asarray([norm_sq_value], dtype=np.float32), max_norm=max_norm)
    scale = reference.clip_scale(math.sqrt(norm_sq_value), max_norm)
    P, M, V = ref_update(p0, g, m0, v0, lr, 7, wd, n_decay, grad_scale=scale)
    gmax = max(np.abs(g).max(), np.abs(m0).max())
    assert_adamw_close(p.get(), m.get(), v.get(), P, M, V, p0, lr, gmax)


@pytest.mark.gpu
@pytest.mark.parametrize("offsets", [(0, 0, 0, 0), (1, 1, 1, 1), (3, 3, 3, 3), (1, 2, 3, 0)])
def test_adamw_update_views_stay_in_bounds(cp, rng, offsets):
    # Same offset within 16 bytes: scalar head + float4 body; mixed offsets: all-scalar path.
    # Sentinels around each view must be untouched.
    n, n_decay, lr, wd, pad = 1030, 513, 1e-2, 0.1, 8
    p0 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m0 = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v0 = (rng.random(n) * 0.01).astype(np.float32)
    bufs, views = [], []
    for off, init in zip(offsets, (p0, g, m0, v0)):
        buf = cp.full(n + pad, 12345.0, dtype=np.float32)
        buf[off:off + n] = cp.asarray(init)
        bufs.append(buf)
        views.append(buf[off:off + n])
    ops.adamw_update(*views, lr, 2, weight_decay=wd, n_decay=n_decay)
    for off, buf in zip(offsets, bufs):
        host = buf.get()
        assert np.all(host[:off] == 12345.0) and np.all(host[off + n:] == 12345.0)
    P, M, V = ref_update(p0, g, m0, v0, lr, 2, wd, n_decay)
    gmax = max(np.abs(g).max(), np.abs(m0).max())
    assert_adamw_close(views[0].get(), views[2].get(), views[3].get(), P, M, V, p0, lr, gmax)


@pytest.mark.gpu
@pytest.mark.big
def test_adamw_update_gpt2_size(cp, rng):
    # GPT-2 124M-sized flat buffer, n_decay as for its 2-D weights + embeddings. The update is
    # elementwise, so the float64 reference runs on a sample (both ends, around n_decay, and
    # 1M random elements) to keep the test to seconds.
    n, n_decay, lr, wd = 124_475_904 + 3, 124_337_664 + 1, 6e-4, 0.1
    p0 = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    p, m, v = cp.asarray(p0), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    g_dev = cp.asarray(g)
    norm_sq = ops.global_norm_squared(g_dev)
    norm = reference.global_norm(g)
    assert rel_err(norm_sq.get()[0], norm ** 2) < 1e-6
    ops.adamw_update(p, g_dev, m, v, lr, 1, weight_decay=wd, n_decay=n_decay, norm_sq=norm_sq,
                     max_norm=1.0)
    idx = np.sort(np.concatenate([np.arange(1000), np.arange(n_decay - 1000, n_decay + 1000),
                                  np.arange(n - 1000, n), rng.integers(0, n, 1_000_000)]))
    idx = idx[np.r_[True, idx[1:] != idx[:-1]]]
    k = int(np.searchsorted(idx, n_decay))  # idx[:k] get weight decay
    P, M, V = ref_update(p0[idx].astype(np.float64), g[idx], np.zeros(idx.size),
                         np.zeros(idx.size), lr, 1, wd, k,
                         grad_scale=reference.clip_scale(norm, 1.0))
    assert_adamw_close(p.get()[idx], m.get()[idx], v.get()[idx], P, M, V, p0[idx], lr,
                       float(np.abs(g).max()))


@pytest.mark.gpu
def test_adamw_update_rejects_bad_arguments(cp):
    n = 10
    p, g, m, v = (cp.zeros(n, cp.float32) for _ in range(4))
    op = "adamw_update: "

    def call(*arrays, **kw):
        args = dict(lr=1e-3, step=1)
        args.update(kw)
        ops.adamw_update(*arrays, **args)

    with pytest.raises(TypeError, match=op + "argument 'grads' has dtype float64"):
        call(p, cp.zeros(n, cp.float64), m, v)
    with pytest.raises(TypeError, match=op + "argument 'params' has dtype float16"):
        call(cp.zeros(n, cp.float16), g, m, v)
    with pytest.raises(ValueError, match=op + r"argument 'm' has shape \(9,\), expected \(10\)"):
        call(p, g, cp.zeros(n - 1, cp.float32), v)
    with pytest.raises(ValueError, match=op + "argument 'params' must have 1 dimensions"):
        call(cp.zeros((2, 5), cp.float32), g, m, v)
    with pytest.raises(ValueError, match=op + "argument 'params' must be C-contiguous"):
        call(cp.zeros(2 * n, cp.float32)[::2], g, m, v)
    with pytest.raises(ValueError, match=op + "argument 'v' must be C-contiguous"):
        call(p, g, m, cp.zeros(2 * n, cp.float32)[::2])
    with pytest.raises(TypeError, match=op + "argument 'grads'.*NumPy"):
        call(p, np.zeros(n, np.float32), m, v)
    for bad in (-1, n + 1, 2.5, True):
        with pytest.raises(ValueError,
                           match=op + "argument 'n_decay' must be an integer with 0 <= n_decay <= 10"):
            call(p, g, m, v, n_decay=bad)
    with pytest.raises(ValueError, match=op + "argument 'norm_sq' must have exactly 1 element"):
        call(p, g, m, v, norm_sq=cp.zeros(2, cp.float32))
    with pytest.raises(TypeError, match=op + "argument 'norm_sq' has dtype float64"):
        call(p, g, m, v, norm_sq=cp.zeros(1, cp.float64))
    with pytest.raises(ValueError, match=op + "arguments 'm' and 'v' overlap"):
        call(p, g, m, m)
    with pytest.raises(ValueError, match=op + "arguments 'params' and 'norm_sq' overlap"):
        call(p, g, m, v, norm_sq=p[4:5])
    with pytest.raises(ValueError, match=op + "argument 'lr' must be a finite number >= 0"):
        call(p, g, m, v, lr=-1.0)
    with pytest.raises(ValueError, match=op + "argument 'step' must be an integer >= 1"):
        call(p, g, m, v, step=0)
    with pytest.raises(ValueError, match=op + "argument 'beta1' must be a finite number"):
        call(p, g, m, v, beta1=1.5)


# ---- optim.AdamW on a stand-in model (GPU) ---------------------------------------------------

def make_fake_model(cp, rng, n, n_decay):
    p0 = rng.standard_normal(n).astype(np.float32) * 0.5
    return FakeModel(cp.asarray(p0), cp.zeros(n, cp.float32), n_decay), p0


@pytest.mark.gpu
@pytest.mark.parametrize("max_norm", [1.0, None, 0.0, 1e6])
def test_optimizer_step_matches_reference(cp, rng, max_norm):
    n, n_decay, wd, max_steps = 4099, 2051, 0.1, 5
    model, p0 = make_fake_model(cp, rng, n, n_decay)
    opt = optim.AdamW(model, lr=1e-2, betas=(B1, B2), eps=EPS, weight_decay=wd, max_norm=max_norm)
    P, M, V = p0.astype(np.float64), np.zeros(n), np.zeros(n)
    gmax = 0.0
    for s in range(max_steps):
        g = rng.standard_normal(n).astype(np.float32)  # norm ~ 64: clipping at 1.0 is active
        gmax = max(gmax, float(np.abs(g).max()))
        model.grads[...] = cp.asarray(g)
        lr = optim.lr_schedule(s, max_steps, 1e-2, 1e-3, 2)
        norm_sq = opt.step(lr)
        norm = reference.global_norm(g)
        assert rel_err(optim.grad_norm(norm_sq), norm) < 1e-6
        scale = reference.clip_scale(norm, max_norm) if max_norm else 1.0
        P, M, V = ref_update(P, g, M, V, lr, s + 1, wd, n_decay, grad_scale=scale)
    assert opt.step_count == max_steps
    # the update tolerance scales with the largest lr of the schedule
    assert_adamw_close(model.params.get(), opt.m.get(), opt.v.get(), P, M, V, p0, 1e-2, gmax)


@pytest.mark.gpu
def test_optimizer_state_dict_round_trip(cp, rng):
    n, n_decay = 1001, 600
    model_a, p0 = make_fake_model(cp, rng, n, n_decay)
    opt_a = optim.AdamW(model_a, lr=2e-3, weight_decay=0.05, max_norm=0.5)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    for g in grads[:2]:
        model_a.grads[...] = cp.asarray(g)
        opt_a.step()
    state = opt_a.state_dict()
    assert state["step"] == 2 and state["m"].dtype == np.float32 and state["m"].shape == (n,)
    assert state["betas"] == (0.9, 0.95) and state["max_norm"] == 0.5 and state["lr"] == 2e-3

    model_b = FakeModel(model_a.params.copy(), cp.zeros(n, cp.float32), n_decay)
    opt_b = optim.AdamW(model_b, lr=1.0, weight_decay=0.0, max_norm=None)
    opt_b.load_state_dict(state)
    assert (opt_b.lr, opt_b.weight_decay, opt_b.max_norm, opt_b.step_count) == (2e-3, 0.05, 0.5, 2)
    for g in grads[2:]:
        for model, opt in ((model_a, opt_a), (model_b, opt_b)):
            model.grads[...] = cp.asarray(g)
            opt.step()
    # same kernels, same inputs: identical bits
    assert model_a.params.get().tobytes() == model_b.params.get().tobytes()
    assert opt_a.v.get().tobytes() == opt_b.v.get().tobytes()

    bad = dict(state, m=np.zeros(n + 1, np.float32))
    with pytest.raises(ValueError, match=r"AdamW.load_state_dict: key 'm' has shape \(1002,\)"):
        opt_b.load_state_dict(bad)
    assert opt_b.step_count == 4  # nothing changed


@pytest.mark.gpu
def test_optimizer_rejects_bad_model(cp):
    with pytest.raises(ValueError,
                       match=r"AdamW: argument 'model.n_decay' must be an integer in \[0, 8\]"):
        optim.AdamW(FakeModel(cp.zeros(8, cp.float32), cp.zeros(8, cp.float32), 9), lr=1e-3)
    with pytest.raises(ValueError, match="AdamW: argument 'model.grads' has shape"):
        optim.AdamW(FakeModel(cp.zeros(8, cp.float32), cp.zeros(7, cp.float32), 4), lr=1e-3)
    model = FakeModel(cp.zeros(8, cp.float32), cp.zeros(8, cp.float32), 4)
    opt = optim.AdamW(model, lr=1e-3)
    model.params, model.grads = cp.zeros(9, cp.float32), cp.zeros(9, cp.float32)
    with pytest.raises(ValueError,
                       match="AdamW: model.params has 9 elements but the optimizer state has 8"):
        opt.step()
