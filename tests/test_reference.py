"""reference.py checked on the CPU: every backward against central finite differences of its
forward in float64, every forward against an independent straightforward formulation, and the
tiny GPT's gradients for every parameter tensor.

Tolerances: central differences with step h have truncation error ~h^2 |f'''| and rounding
error ~1e-16 |f| / h. With h = 1e-6 on O(1) quantities both are around 1e-10 or below, so a
relative error under 1e-7 is expected; we assert 1e-6 for the ops. For the GPT the loss goes
through ~20 ops and some gradient entries are small (~1e-4), so h = 1e-5 (balancing the two
error terms), which measured ~2e-8; we assert 1e-6. Any real backward bug gives errors of
order 1e-2 or more.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import reference as R

OP_TOL = 1e-6


def numerical_grad(f, x, h=1e-6, indices=None):
    """Central differences (f(x + h e_i) - f(x - h e_i)) / 2h of the scalar f at x, for every
    entry of x (or only at `indices`, flat positions; the rest stay 0). x is modified and restored."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in (range(flat.size) if indices is None else indices):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def check_grad(f, x, analytic, h=1e-6, tol=OP_TOL):
    """Assert the analytic gradient of the scalar f w.r.t. x matches central differences."""
    num = numerical_grad(f, x, h)
    assert analytic.shape == x.shape
    assert rel_err(analytic, num) < tol


# ---- residual, bias, matmul -------------------------------------------------------------

def test_residual_forward(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    np.testing.assert_array_equal(R.residual_forward(a, b), a + b)


def test_bias_forward_backward(rng):
    x, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5)
    G = rng.standard_normal((2, 3, 5))
    np.testing.assert_array_equal(R.bias_forward(x, b), x + b[None, None, :])
    db = R.bias_backward(G)
    check_grad(lambda: np.sum(R.bias_forward(x, b) * G), b, db)


def test_matmul_forward(rng):
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    expect = np.einsum("btc,oc->bto", x, w) + b
    np.testing.assert_allclose(R.matmul_forward(x, w, b), expect, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(R.matmul_forward(x, w), expect - b, rtol=1e-13, atol=1e-13)


def test_matmul_backward(rng):
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((7, 5)), rng.standard_normal(7)
    G = rng.standard_normal((2, 3, 7))
    dx, dw, db = R.matmul_backward(G, x, w)
    loss = lambda: np.sum(R.matmul_forward(x, w, b) * G)
    check_grad(loss, x, dx)
    check_grad(loss, w, dw)
    check_grad(loss, b, db)


# ---- encoder ------------------------------------------------------------------------------

def test_encoder_forward(rng):
    V, maxT, C = 11, 9, 6
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((maxT, C))
    idx = np.array([[3, 3, 0, 10, 3], [7, 0, 0, 1, 2]], dtype=np.int32)
    out = R.encoder_forward(idx, wte, wpe)
    for b in range(2):
        for t in range(5):
            np.testing.assert_array_equal(out[b, t], wte[idx[b, t]] + wpe[t])


def test_encoder_backward(rng):
    V, maxT, C, B, T = 11, 9, 6, 2, 5
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((maxT, C))
    # token 3 appears three times and 0 three times: their gradients must add up
    idx = np.array([[3, 3, 0, 10, 3], [7, 0, 0, 1, 2]], dtype=np.int32)
    G = rng.standard_normal((B, T, C))
    dwte, dwpe = R.encoder_backward(G, idx, V, maxT)
    assert dwte.shape == (V, C) and dwpe.shape == (maxT, C)
    loss = lambda: np.sum(R.encoder_forward(idx, wte, wpe) * G)
    check_grad(loss, wte, dwte)
    check_grad(loss, wpe, dwpe)
    np.testing.assert_allclose(dwte[3], G[0, 0] + G[0, 1] + G[0, 4], rtol=1e-14)
    assert np.all(dwte[[4, 5, 6, 8, 9]] == 0) and np.all(dwpe[T:] == 0)


def test_encoder_rejects_out_of_range_ids(rng):
    wte, wpe = np.zeros((5, 2)), np.zeros((4, 2))
    with pytest.raises(ValueError, match="idx"):
        R.encoder_forward(np.array([[0, 5]]), wte, wpe)
    with pytest.raises(ValueError, match="idx"):
        R.encoder_forward(np.array([[-1, 0]]), wte, wpe)
    with pytest.raises(ValueError, match="sequence length"):
        R.encoder_forward(np.zeros((1, 5), np.int32), wte, wpe)
    with pytest.raises(ValueError, match="idx"):
        R.encoder_backward(np.zeros((1, 2, 2)), np.array([[0, 5]]), 5, 4)


# ---- layernorm ----------------------------------------------------------------------------

def test_layernorm_forward(rng):
    x = 3.0 + 2.0 * rng.standard_normal((2, 3, 7))
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    out, mean, rstd = R.layernorm_forward(x, w, b)
    assert mean.shape == (2, 3) and rstd.shape == (2, 3)
    for row in np.ndindex(2, 3):
        xr = x[row]
        mu, var = xr.sum() / 7, ((xr - xr.sum() / 7) ** 2).sum() / 7   # biased variance
        assert math.isclose(mean[row], mu, rel_tol=1e-14)
        assert math.isclose(rstd[row], 1 / math.sqrt(var + 1e-5), rel_tol=1e-14)
        np.testing.assert_allclose(out[row], (xr - mu) / math.sqrt(var + 1e-5) * w + b,
                                   rtol=1e-12, atol=1e-12)
    # normalised rows have mean 0 and variance var/(var+eps) before the affine part
    xhat = R.layernorm_forward(x, np.ones(7), np.zeros(7))[0]
    np.testing.assert_allclose(xhat.mean(-1), 0, atol=1e-14)


def test_layernorm_backward(rng):
    x = rng.standard_normal((2, 3, 7))
    w, b = 1 + 0.5 * rng.standard_normal(7), rng.standard_normal(7)
    G = rng.standard_normal((2, 3, 7))
    _, mean, rstd = R.layernorm_forward(x, w, b)
    dx, dw, db = R.layernorm_backward(G, x, w, mean, rstd)
    loss = lambda: np.sum(R.layernorm_forward(x, w, b)[0] * G)
    check_grad(loss, x, dx)
    check_grad(loss, w, dw)
    check_grad(loss, b, db)


# ---- gelu ---------------------------------------------------------------------------------

def test_gelu_forward(rng):
    x = np.concatenate([rng.standard_normal(20) * 3, [0.0, 10.0, -10.0]])
    s = math.sqrt(2 / math.pi)
    expect = [0.5 * v * (1 + math.tanh(s * (v + 0.044715 * v ** 3))) for v in x]
    # for negative x, 1 + tanh(u) cancels: both sides lose digits there, hence the atol
    np.testing.assert_allclose(R.gelu_forward(x), expect, rtol=1e-13, atol=1e-15)
    y = R.gelu_forward(np.array([0.0, 10.0, -10.0]))
    assert y[0] == 0 and math.isclose(y[1], 10.0) and abs(y[2]) < 1e-20
    assert math.isclose(R.gelu_forward(np.array([1.0]))[0], 0.8411919906082768, rel_tol=1e-14)


def test_gelu_backward(rng):
    x = 2 * rng.standard_normal((3, 11))
    G = rng.standard_normal((3, 11))
    dx = R.gelu_backward(G, x)
    check_grad(lambda: np.sum(R.gelu_forward(x) * G), x, dx)


# ---- cross-entropy ----------------------------------------------------------------------

def test_cross_entropy_forward_uses_only_real_columns(rng):
    N, V, Vp = 6, 37, 128
    logits = rng.standard_normal((N, Vp)) * 3
    targets = rng.integers(0, V, N).astype(np.int32)
    losses = R.cross_entropy_forward(logits, targets, V)
    assert losses.shape == (N,)
    for i in range(N):
        p = np.exp(logits[i, :V]) / np.exp(logits[i, :V]).sum()
        assert math.isclose(losses[i], -math.log(p[targets[i]]), rel_tol=1e-13)
    # garbage in the padded columns changes nothing
    logits2 = logits.copy()
    logits2[:, V:] = 1e6 * rng.standard_normal((N, Vp - V))
    np.testing.assert_array_equal(R.cross_entropy_forward(logits2, targets, V), losses)
    # V=None means every column is real
    np.testing.assert_allclose(R.cross_entropy_forward(logits[:, :V], targets),
                               losses, rtol=1e-15)
    # stable for large logits
    assert np.all(np.isfinite(R.cross_entropy_forward(logits + 1e4, targets, V)))


def test_cross_entropy_backward(rng):
    N, V, Vp = 5, 37, 128
    logits = rng.standard_normal((N, Vp)) * 2
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[1] = targets[0]
    dlogits = R.cross_entropy_backward(logits, targets, V)
    assert dlogits.shape == (N, Vp)
    assert np.all(dlogits[:, V:] == 0)                       # exactly 0, not just small
    np.testing.assert_allclose(dlogits[:, :V].sum(-1), 0, atol=1e-15)  # softmax - onehot
    # default scale is 1/N: the gradient of the mean loss
    check_grad(lambda: R.cross_entropy_forward(logits, targets, V).mean(), logits, dlogits)
    # explicit scale: gradient of scale * sum
    d2 = R.cross_entropy_backward(logits, targets, V, scale=2.5)
    np.testing.assert_allclose(d2, dlogits * 2.5 * N, rtol=1e-13, atol=1e-17)


def test_cross_entropy_rejects_padded_or_negative_targets():
    logits = np.zeros((2, 128))
    with pytest.raises(ValueError, match="targets"):
        R.cross_entropy_forward(logits, np.array([0, 37]), V=37)
    with pytest.raises(ValueError, match="targets"):
        R.cross_entropy_backward(logits, np.array([-1, 0]), V=37)


# ---- attention ----------------------------------------------------------------------------

def attention_loops(qkv, n_head):
    """Attention written out position by position: out and lse per (b, h, i)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    d = C // n_head
    out, lse = np.zeros((B, T, C)), np.zeros((B, n_head, T))
    for b in range(B):
        for h in range(n_head):
            q = qkv[b, :, h * d:(h + 1) * d]
            k = qkv[b, :, C + h * d:C + (h + 1) * d]
            v = qkv[b, :, 2 * C + h * d:2 * C + (h + 1) * d]
            for i in range(T):
                s = np.array([q[i] @ k[j] / math.sqrt(d) for j in range(i + 1)])
                lse[b, h, i] = math.log(sum(math.exp(z) for z in s))
                p = np.exp(s - lse[b, h, i])
                out[b, i, h * d:(h + 1) * d] = p @ v[:i + 1]
    return out, lse


@pytest.mark.parametrize("B,T,H,d", [(1, 1, 2, 3), (2, 5, 2, 3), (1, 7, 3, 2), (2, 4, 1, 5)])
def test_attention_forward(rng, B, T, H, d):
    qkv = rng.standard_normal((B, T, 3 * H * d))
    out, lse = R.attention_forward(qkv, H)
    assert out.shape == (B, T, H * d) and lse.shape == (B, H, T)
    out_ref, lse_ref = attention_loops(qkv, H)
    np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-12, atol=1e-13)
    if T == 1:  # one key: softmax is 1, the output is v
        np.testing.assert_allclose(out, qkv[:, :, 2 * H * d:], rtol=1e-15)


@pytest.mark.parametrize("B,T,H,d", [(1, 1, 2, 3), (2, 5, 2, 3), (1, 6, 2, 4)])
def test_attention_backward(rng, B, T, H, d):
    qkv = rng.standard_normal((B, T, 3 * H * d))
    G = rng.standard_normal((B, T, H * d))
    dqkv = R.attention_backward(G, qkv, H)
    assert dqkv.shape == qkv.shape
    check_grad(lambda: np.sum(R.attention_forward(qkv, H)[0] * G), qkv, dqkv)


def test_attention_is_causal(rng):
    B, T, H, d = 2, 6, 2, 3
    C = H * d
    qkv = rng.standard_normal((B, T, 3 * C))
    out, lse = R.attention_forward(qkv, H)
    for t0 in range(T):
        moved = qkv.copy()
        moved[:, t0, C:] += rng.standard_normal((B, 2 * C))  # new k and v at position t0
        out2, lse2 = R.attention_forward(moved, H)
        np.testing.assert_array_equal(out2[:, :t0], out[:, :t0])   # earlier positions: untouched
        np.testing.assert_array_equal(lse2[:, :, :t0], lse[:, :, :t0])
        assert np.all(np.abs(out2[:, t0:] - out[:, t0:]).max(-1) > 0)  # the rest does see it
    # and the gradient flows only backward in time: dL/dk,v at t0 from outputs before t0 is 0
    G = np.zeros((B, T, C))
    G[:, 2] = rng.standard_normal((B, C))
    dqkv = R.attention_backward(G, qkv, H)
    assert np.all(dqkv[:, 3:] == 0) and np.all(dqkv[:, :3, C:] != 0)


# ---- global norm, clipping, AdamW ----------------------------------------------------------

def test_global_norm_and_clip_scale(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(5)
    expect = math.sqrt(sum(v * v for v in a.ravel()) + sum(v * v for v in b.ravel()))
    assert math.isclose(R.global_norm([a, b]), expect, rel_tol=1e-14)
    assert math.isclose(R.global_norm(a), math.sqrt((a ** 2).sum()), rel_tol=1e-14)
    assert R.global_norm([np.array([3.0]), np.array([[4.0]])]) == 5.0
    assert isinstance(R.global_norm(a), float)
    assert R.clip_scale(0.5, 1.0) == 1.0
    assert R.clip_scale(0.0, 1.0) == 1.0
    assert math.isclose(R.clip_scale(4.0, 1.0), 1 / (4 + 1e-6), rel_tol=1e-15)
    # clipping to max_norm: the scaled gradients' norm is max_norm (up to the 1e-6 guard)
    n = R.global_norm([a, b])
    s = R.clip_scale(n, 0.1)
    assert math.isclose(R.global_norm([a * s, b * s]), 0.1, rel_tol=1e-5)


def test_adamw_first_step(rng):
    """Step 1 from zero moments: mhat = g, vhat = g^2, so without decay the update is
    lr * g / (|g| + eps) = lr * sign(g) (up to eps): its size is lr whatever |g| is."""
    p = rng.standard_normal(10)
    g = rng.choice([-1.0, 1.0], 10) * 10.0 ** rng.uniform(-3, 3, 10)   # |g| from 1e-3 to 1e3
    g[0] = 0.0
    lr, eps = 1e-3, 1e-8
    z = np.zeros(10)
    p1, m, v = R.adamw_update(p, g, z, z, lr, 0.9, 0.95, eps, 0.1, 1, decay=False)
    np.testing.assert_allclose(p - p1, lr * g / (np.abs(g) + eps), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(p - p1, lr * np.sign(g), rtol=2e-5)  # eps/|g| <= 1e-5
    assert p1[0] == p[0]
    np.testing.assert_allclose(m, 0.1 * g, rtol=1e-15)
    np.testing.assert_allclose(v, 0.05 * g * g, rtol=1e-14)
    # with decay the param additionally shrinks by lr * wd * param
    p2, _, _ = R.adamw_update(p, g, z, z, lr, 0.9, 0.95, eps, 0.1, 1, decay=True)
    np.testing.assert_allclose(p2, p1 - lr * 0.1 * p, rtol=1e-14)
    # inputs are not modified, outputs are new arrays
    assert np.all(z == 0) and p1 is not p


def test_adamw_matches_loop_formulation(rng):
    """Several steps against a scalar, PyTorch-style formulation (param *= 1 - lr*wd first,
    then the Adam step), with grad_scale folded in."""
    n, lr, b1, b2, eps, wd, scale = 7, 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.25
    p = rng.standard_normal(n)
    m, v = np.zeros(n), np.zeros(n)
    ps, ms, vs = list(p), [0.0] * n, [0.0] * n
    for step in range(1, 6):
        g = rng.standard_normal(n)
        p, m, v = R.adamw_update(p, g, m, v, lr, b1, b2, eps, wd, step, decay=True,
                                 grad_scale=scale)
        for i in range(n):
            gi = g[i] * scale
            ms[i] = b1 * ms[i] + (1 - b1) * gi
            vs[i] = b2 * vs[i] + (1 - b2) * gi * gi
            ps[i] *= 1 - lr * wd
            denom = math.sqrt(vs[i]) / math.sqrt(1 - b2 ** step) + eps
            ps[i] -= lr / (1 - b1 ** step) * ms[i] / denom
    # the two forms put eps in slightly different places (sqrt(vhat)+eps vs the same, scaled):
    # they agree to rounding here, since eps << sqrt(vhat)
    np.testing.assert_allclose(p, ps, rtol=1e-12)
    np.testing.assert_allclose(m, ms, rtol=1e-13)
    np.testing.assert_allclose(v, vs, rtol=1e-13)


# ---- tiny GPT -------------------------------------------------------------------------------

CONFIG = SimpleNamespace(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=37,
                         padded_vocab_size=128)
B, T = 2, 8


def tokens(rng):
    idx = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
    targets = rng.integers(0, CONFIG.vocab_size, (B, T)).astype(np.int32)
    return idx, targets


def test_gpt_init_shapes_and_statistics():
    rng = np.random.default_rng(0)
    big = SimpleNamespace(n_layer=3, n_head=2, n_embd=64, block_size=32, vocab_size=300,
                          padded_vocab_size=384)
    params = R.gpt_init(big, rng)
    shapes = R.gpt_param_shapes(big)
    assert list(params) == list(shapes) and len(params) == 2 + 12 * 3 + 2
    for name, p in params.items():
        assert p.shape == shapes[name] and p.dtype == np.float64
    C = 64
    assert shapes["h.2.attn.c_attn.weight"] == (3 * C, C) and shapes["h.0.mlp.c_proj.weight"] == (C, 4 * C)
    assert np.all(params["wte"][300:] == 0)
    assert abs(params["wte"][:300].std() - 0.02) < 0.001
    assert abs(params["h.1.mlp.c_fc.weight"].std() - 0.02) < 0.001
    assert abs(params["h.1.attn.c_proj.weight"].std() - 0.02 / math.sqrt(6)) < 0.001
    assert abs(params["h.2.mlp.c_proj.weight"].std() - 0.02 / math.sqrt(6)) < 0.001
    assert np.all(params["h.0.ln_1.weight"] == 1) and np.all(params["ln_f.bias"] == 0)
    assert np.all(params["h.1.attn.c_attn.bias"] == 0)


def test_gpt_loss_at_init_is_near_uniform(rng):
    params = R.gpt_init(CONFIG, rng)
    idx, targets = tokens(rng)
    loss, cache = R.gpt_forward(params, idx, targets, CONFIG)
    assert cache["logits"].shape == (B, T, 128)
    # small init weights give near-uniform predictions over the 37 real tokens
    assert abs(loss - math.log(37)) < 0.05
    # the loss is the mean of the per-position cross-entropies of the returned logits
    per_pos = R.cross_entropy_forward(cache["logits"].reshape(-1, 128), targets.reshape(-1), 37)
    assert math.isclose(loss, per_pos.mean(), rel_tol=1e-14)
    # targets=None: no loss, logits still returned
    none_loss, cache2 = R.gpt_forward(params, idx, None, CONFIG)
    assert none_loss is None
    np.testing.assert_array_equal(cache2["logits"], cache["logits"])


def test_gpt_padded_logits_do_not_affect_loss(rng):
    params = R.gpt_init(CONFIG, rng)
    idx, targets = tokens(rng)
    loss, cache = R.gpt_forward(params, idx, targets, CONFIG)
    params["wte"][37:] = rng.standard_normal((128 - 37, 16)) * 5  # padded rows -> big logits
    loss2, cache2 = R.gpt_forward(params, idx, targets, CONFIG)
    assert np.abs(cache2["logits"][..., 37:]).max() > 1  # the padded logits did change
    assert loss2 == loss
    grads = R.gpt_backward(params, cache2, CONFIG)
    assert np.all(grads["wte"][37:] == 0)


def test_gpt_is_causal(rng):
    params = R.gpt_init(CONFIG, rng)
    idx, targets = tokens(rng)
    _, cache = R.gpt_forward(params, idx, None, CONFIG)
    idx2 = idx.copy()
    idx2[:, 5] = (idx[:, 5] + 1) % 37
    _, cache2 = R.gpt_forward(params, idx2, None, CONFIG)
    np.testing.assert_array_equal(cache2["logits"][:, :5], cache["logits"][:, :5])
    assert np.all(np.abs(cache2["logits"][:, 5:, :37] - cache["logits"][:, 5:, :37]).max(-1) > 0)


def gpt_loss_plain(params, idx, targets, cfg):
    """GPT-2 forward written inline with plain NumPy (no reference.py function), to check
    gpt_forward's architecture: pre-LN blocks, causal attention, tanh GELU, tied lm head."""
    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b

    C, H = cfg.n_embd, cfg.n_head
    d = C // H
    x = params["wte"][idx] + params["wpe"][np.arange(idx.shape[1])]
    future = np.triu(np.ones((idx.shape[1],) * 2, dtype=bool), k=1)
    for i in range(cfg.n_layer):
        P = lambda k: params[f"h.{i}.{k}"]
        qkv = ln(x, P("ln_1.weight"), P("ln_1.bias")) @ P("attn.c_attn.weight").T + P("attn.c_attn.bias")
        heads = []
        for h in range(H):
            q, k, v = (qkv[..., j * C + h * d:j * C + (h + 1) * d] for j in range(3))
            s = np.einsum("bid,bjd->bij", q, k) / math.sqrt(d)
            s[:, future] = -np.inf
            a = np.exp(s - s.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v)
        x = x + np.concatenate(heads, -1) @ P("attn.c_proj.weight").T + P("attn.c_proj.bias")
        u = ln(x, P("ln_2.weight"), P("ln_2.bias")) @ P("mlp.c_fc.weight").T + P("mlp.c_fc.bias")
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        x = x + u @ P("mlp.c_proj.weight").T + P("mlp.c_proj.bias")
    logits = ln(x, params["ln_f.weight"], params["ln_f.bias"]) @ params["wte"].T
    z = logits[..., :cfg.vocab_size]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean(), logits


def perturbed_params(rng):
    """Init, then noise on every tensor (biases, layernorm, padded wte rows excepted) so no
    gradient path is trivially zero and all values are O(0.1-1): larger, better-conditioned
    gradients for the finite-difference check."""
    params = R.gpt_init(CONFIG, rng)
    for name, p in params.items():
        p += 0.1 * rng.standard_normal(p.shape)
    params["wte"][CONFIG.vocab_size:] = 0.0
    return params


def test_gpt_forward_matches_plain_numpy(rng):
    params = perturbed_params(rng)
    idx, targets = tokens(rng)
    loss, cache = R.gpt_forward(params, idx, targets, CONFIG)
    loss_plain, logits_plain = gpt_loss_plain(params, idx, targets, CONFIG)
    np.testing.assert_allclose(cache["logits"], logits_plain, rtol=1e-12, atol=1e-12)
    assert math.isclose(loss, loss_plain, rel_tol=1e-12)
    # shorter sequences use the first T position embeddings
    loss3, _ = R.gpt_forward(params, idx[:, :3], targets[:, :3], CONFIG)
    assert math.isclose(loss3, gpt_loss_plain(params, idx[:, :3], targets[:, :3], CONFIG)[0],
                        rel_tol=1e-12)


def test_gpt_backward_matches_finite_differences(rng):
    params = perturbed_params(rng)
    idx, targets = tokens(rng)
    loss, cache = R.gpt_forward(params, idx, targets, CONFIG)
    grads = R.gpt_backward(params, cache, CONFIG)
    assert list(grads) == list(params)
    f = lambda: R.gpt_forward(params, idx, targets, CONFIG)[0]
    for name, p in params.items():
        g = grads[name]
        assert g.shape == p.shape and np.all(np.isfinite(g))
        rows = CONFIG.vocab_size if name == "wte" else p.shape[0]
        # 5 entries per tensor; for wte one of them is a token that occurs in idx (so the
        # embedding path is exercised, not only the lm head)
        cand = np.arange(rows * (p.size // p.shape[0]))
        picks = rng.choice(cand, 5, replace=False)
        if name == "wte":
            picks[0] = idx[0, 0] * p.shape[1] + 3
        num = numerical_grad(f, p, h=1e-5, indices=picks)
        err = rel_err(g.reshape(-1)[picks], num.reshape(-1)[picks])
        assert err < 1e-6, f"{name}: relative error {err:.2e}"
    assert np.all(grads["wte"][CONFIG.vocab_size:] == 0)
    # wpe rows past T get no gradient; here T = block_size, so all are used
    assert np.all(np.abs(grads["wpe"]).sum(-1) > 0)


def test_gpt_backward_full_gradient_of_small_tensors(rng):
    """Every entry (not a sample) of the layernorm and bias tensors of layer 1 and ln_f."""
    params = perturbed_params(rng)
    idx, targets = tokens(rng)
    _, cache = R.gpt_forward(params, idx, targets, CONFIG)
    grads = R.gpt_backward(params, cache, CONFIG)
    f = lambda: R.gpt_forward(params, idx, targets, CONFIG)[0]
    for name in ["h.1.ln_1.weight", "h.1.attn.c_proj.bias", "ln_f.bias"]:
        num = numerical_grad(f, params[name], h=1e-5)
        assert rel_err(grads[name], num) < 1e-6, name


# ---- dropout ----------------------------------------------------------------------------

# Random123's published known-answer vectors for Philox-4x32-10 (its kat_vectors file):
# (counter, key, output), all 32-bit words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox4x32_10_known_answers(counter, key, expected):
    out = R.philox4x32_10(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert out.dtype == np.uint32
    assert out.tolist() == list(expected)


def test_philox4x32_10_batched_equals_single():
    counters = np.array([c for c, _, _ in PHILOX_KAT], dtype=np.uint32)
    keys = np.array([k for _, k, _ in PHILOX_KAT], dtype=np.uint32)
    assert R.philox4x32_10(counters, keys).tolist() == [list(e) for _, _, e in PHILOX_KAT]


def test_dropout_mask_counter_layout():
    """Element i is word i & 3 of Philox(counter = (g lo, g hi, offset lo, offset hi),
    key = (seed lo, seed hi)), g = i >> 2, kept iff word >= floor(float32(p) 2^32): the layout
    csrc/philox.cuh documents and the attention kernel relies on."""
    seed, offset, p, n = 0x0123456789ABCDEF, 0xFEDCBA9876543210, 0.3, 23
    mask = R.dropout_mask(seed, offset, n, p)
    thr = R.dropout_threshold(p)
    assert thr == int(np.float64(np.float32(0.3)) * 2**32)
    for i in range(n):
        g = i >> 2
        words = R.philox4x32_10([g & 0xFFFFFFFF, g >> 32, offset & 0xFFFFFFFF, offset >> 32],
                                [seed & 0xFFFFFFFF, seed >> 32])
        assert mask[i] == (int(words[i & 3]) >= thr)
    # a mask of n elements is the prefix of a longer one (no dependence on n)
    np.testing.assert_array_equal(R.dropout_mask(seed, offset, 1001, p)[:n], mask)
    # the high 32 bits of seed and offset take part
    base = R.dropout_mask(5, 7, 256, 0.5)
    assert not np.array_equal(base, R.dropout_mask(5 + 2**32, 7, 256, 0.5))
    assert not np.array_equal(base, R.dropout_mask(5, 7 + 2**32, 256, 0.5))
    assert R.dropout_mask(5, 7, 0, 0.5).shape == (0,)
    assert R.dropout_mask(5, 7, 99, 0.0).all()  # threshold 0 keeps everything


def test_dropout_threshold_and_scale():
    assert R.dropout_threshold(0.0) == 0
    assert R.dropout_threshold(0.5) == 2**31
    assert R.dropout_threshold(np.nextafter(np.float32(1), np.float32(0))) == 2**32 - 2**8
    assert R.dropout_scale(0.5) == np.float32(2.0)
    assert R.dropout_scale(0.1) == np.float32(1.0 / (1.0 - float(np.float32(0.1))))
    for bad in (-0.1, 1.0, 1.0 - 1e-12, float("nan")):  # 1 - 1e-12 rounds to 1 in float32
        with pytest.raises(ValueError):
            R.dropout_threshold(bad)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_kept_fraction(p):
    """Kept count ~ Binomial(n, 1 - p): within 5 standard deviations (a false failure has
    probability ~6e-7), overall and for each of the 4 words of a Philox output separately."""
    n = 1 << 20
    mask = R.dropout_mask(2024, 11, n, p)
    for sub in (mask, *(mask[k::4] for k in range(4))):
        m = sub.size
        assert abs(sub.sum() - m * (1 - p)) < 5 * math.sqrt(m * p * (1 - p))


def test_dropout_mask_streams_look_independent():
    """Masks of different seeds/offsets agree on a fraction (1-p)^2 + p^2 of the elements, as
    independent ones do (5 sigma), and neighbouring elements are uncorrelated."""
    n, p = 1 << 18, 0.5
    a = R.dropout_mask(1, 0, n, p)
    for b in (R.dropout_mask(2, 0, n, p), R.dropout_mask(1, 1, n, p),
              np.roll(a, 1)):  # lag-1 autocorrelation within one stream
        agree = np.mean(a == b)
        assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n)


def test_dropout_forward_values():
    x = np.array([1.0, -2.0, 3.0, np.inf, np.nan, 4.0])
    mask = np.array([True, False, True, False, False, True])
    out = R.dropout_forward(x, mask, 0.25)
    np.testing.assert_array_equal(out, [1 / 0.75, 0.0, 3 / 0.75, 0.0, 0.0, 4 / 0.75])
    np.testing.assert_array_equal(R.dropout_forward(x[:3], np.ones(3, bool), 0.0), x[:3])
    with pytest.raises(ValueError, match="mask shape"):
        R.dropout_forward(x, mask[:5], 0.25)
    with pytest.raises(TypeError, match="boolean"):
        R.dropout_forward(x, mask.astype(np.int32), 0.25)
    with pytest.raises(ValueError, match="0 <= p < 1"):
        R.dropout_forward(x, mask, 1.0)


def test_dropout_backward_finite_differences(rng):
    x = rng.standard_normal((3, 7))
    G = rng.standard_normal((3, 7))
    p = 0.3
    mask = R.dropout_mask(9, 4, x.size, p).reshape(x.shape)
    assert 0 < mask.sum() < mask.size  # both kept and dropped entries are exercised
    dx = R.dropout_backward(G, mask, p)
    check_grad(lambda: np.sum(R.dropout_forward(x, mask, p) * G), x, dx)
    np.testing.assert_array_equal(dx[~mask], 0.0)


# ---- attention with dropout on the probabilities ----------------------------------------------

def test_attention_dropout_mask_indexing():
    """Element (b, h, i, j) is index ((b*H + h)*T + i)*T + j of dropout_mask's stream."""
    B, H, T, p, seed, offset = 2, 3, 5, 0.4, 77, 2**33 + 1
    M = R.attention_dropout_mask(B, H, T, p, seed, offset)
    flat = R.dropout_mask(seed, offset, B * H * T * T, p)
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 4), (0, 1, 3, 2), (1, 0, 2, 3)]:
        assert M[b, h, i, j] == flat[((b * H + h) * T + i) * T + j]
    assert 0 < M.sum() < M.size


def test_attention_forward_dropout(rng):
    B, T, H, d, p = 2, 6, 2, 3, 0.3
    qkv = rng.standard_normal((B, T, 3 * H * d))
    out, lse = R.attention_forward_dropout(qkv, H, p, 5, 9)
    _, lse_plain = R.attention_forward(qkv, H)
    np.testing.assert_array_equal(lse, lse_plain)  # lse never sees the mask
    M = R.attention_dropout_mask(B, H, T, p, 5, 9)
    r = 1.0 / (1.0 - np.float64(np.float32(p)))
    for b in range(B):  # written out position by position
        for h in range(H):
            v = qkv[b, :, 2 * H * d + h * d:2 * H * d + (h + 1) * d]
            q = qkv[b, :, h * d:(h + 1) * d]
            k = qkv[b, :, H * d + h * d:H * d + (h + 1) * d]
            for i in range(T):
                s = np.array([q[i] @ k[j] / math.sqrt(d) for j in range(i + 1)])
                P = np.exp(s - lse[b, h, i])
                expect = (np.where(M[b, h, i, :i + 1], P * r, 0.0)) @ v[:i + 1]
                np.testing.assert_allclose(out[b, i, h * d:(h + 1) * d], expect, rtol=1e-12,
                                           atol=1e-13)
    # p = 0 is exactly the plain attention
    out0, lse0 = R.attention_forward_dropout(qkv, H, 0.0, 5, 9)
    np.testing.assert_array_equal(out0, R.attention_forward(qkv, H)[0])
    np.testing.assert_array_equal(lse0, lse_plain)


@pytest.mark.parametrize("B,T,H,d,p", [(1, 1, 2, 3, 0.5), (2, 5, 2, 3, 0.3), (1, 7, 2, 4, 0.5)])
def test_attention_backward_dropout_finite_differences(rng, B, T, H, d, p):
    """At a fixed mask (seed, offset fixed: the mask does not depend on qkv) the forward is a
    smooth function of qkv; the analytic backward matches central differences."""
    qkv = rng.standard_normal((B, T, 3 * H * d))
    G = rng.standard_normal((B, T, H * d))
    seed, offset = 1234, 56
    dqkv = R.attention_backward_dropout(G, qkv, H, p, seed, offset)
    assert dqkv.shape == qkv.shape
    check_grad(lambda: np.sum(R.attention_forward_dropout(qkv, H, p, seed, offset)[0] * G),
               qkv, dqkv)
    np.testing.assert_array_equal(R.attention_backward_dropout(G, qkv, H, 0.0, seed, offset),
                                  R.attention_backward(G, qkv, H))


def test_attention_dropout_D_identity(rng):
    """D_i = sum_j P_ij dP_ij (dP = M r dO v^T) equals dO_i . O_i with the dropped output O."""
    B, T, H, d, p = 1, 6, 1, 4, 0.5
    qkv = rng.standard_normal((B, T, 3 * H * d))
    G = rng.standard_normal((B, T, H * d))
    out, _ = R.attention_forward_dropout(qkv, H, p, 3, 4)
    q, k, v = R._split_heads(qkv, H)
    P, _ = R._attention_probs(q, k)
    M = R.attention_dropout_mask(B, H, T, p, 3, 4)
    r = 1.0 / (1.0 - np.float64(np.float32(p)))
    dP = np.where(M, G.reshape(B, T, H, d).transpose(0, 2, 1, 3) @ v.swapaxes(-1, -2) * r, 0.0)
    np.testing.assert_allclose((P * dP).sum(-1)[0, 0], (G * out).sum(-1)[0], rtol=1e-12,
                               atol=1e-13)
