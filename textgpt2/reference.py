"""NumPy float64 reference of every op, forward and backward, and of a tiny GPT-2.

This is the oracle the CUDA kernels are tested against, and the place to read the math.
Every function converts its float inputs with np.asarray(..., dtype=np.float64) (token ids
and targets stay integers) and returns new arrays; nothing is modified in place.

Conventions (docs/CONTRACT.md):
  - activations (B, T, C); row-wise ops work on the last axis of any leading shape;
  - linear layers use the PyTorch layout: y = x @ W.T + b with W (out_features, in_features);
  - qkv (B, T, 3C) = [q | k | v], head h in columns h*d .. h*d+d-1 of each part (d = C/H);
  - vocabulary: V real tokens, wte and logits padded to Vp >= V columns; columns >= V are
    not part of the softmax and get zero gradient;
  - backward functions return the gradient of a scalar loss L given dout = dL/dout.
Out-of-range token ids or targets raise ValueError here (the kernels write NaN instead).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "residual_forward", "encoder_forward", "encoder_backward",
    "layernorm_forward", "layernorm_backward", "matmul_forward", "matmul_backward",
    "bias_forward", "bias_backward", "gelu_forward", "gelu_backward",
    "cross_entropy_forward", "cross_entropy_backward", "attention_forward", "attention_backward",
    "global_norm", "clip_scale", "adamw_update",
    "param_shapes", "gpt_param_shapes", "gpt_init", "gpt_forward", "gpt_backward",
    "gpt_dropout_offset",
]


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _ids(a, limit, name):
    """Integer ids as an int64 array, each in [0, limit)."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= limit):
        raise ValueError(f"{name} must lie in [0, {limit}), got values in [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


# ---- residual ----------------------------------------------------------------------------

def residual_forward(a, b):
    """out = a + b (backward: da = db = dout)."""
    return _f64(a) + _f64(b)


# ---- encoder: token + position embedding -------------------------------------------------

def encoder_forward(idx, wte, wpe):
    """out[b, t] = wte[idx[b, t]] + wpe[t];  idx (B, T), wte (V, C), wpe (maxT, C) -> (B, T, C)."""
    wte, wpe = _f64(wte), _f64(wpe)
    idx = _ids(idx, wte.shape[0], "idx")
    T = idx.shape[-1]
    if T > wpe.shape[0]:
        raise ValueError(f"sequence length {T} exceeds the {wpe.shape[0]} position embeddings")
    return wte[idx] + wpe[:T]


def encoder_backward(dout, idx, V, maxT):
    """dwte[v] = sum of dout[b, t] over positions with idx[b, t] == v (repeats add up);
    dwpe[t] = sum_b dout[b, t] (rows t >= T are zero).  Returns (dwte (V, C), dwpe (maxT, C))."""
    dout = _f64(dout)
    idx = _ids(idx, V, "idx")
    T, C = dout.shape[-2], dout.shape[-1]
    dwte = np.zeros((V, C))
    np.add.at(dwte, idx.reshape(-1), dout.reshape(-1, C))  # unbuffered: repeated ids accumulate
    dwpe = np.zeros((maxT, C))
    dwpe[:T] = dout.reshape(-1, T, C).sum(axis=0)
    return dwte, dwpe


# ---- layernorm ---------------------------------------------------------------------------

def layernorm_forward(x, w, b, eps=1e-5):
    """Over the last axis: mean = E[x], rstd = 1/sqrt(Var[x] + eps) (biased variance),
    out = (x - mean) * rstd * w + b.  Returns (out, mean, rstd); mean/rstd have shape x.shape[:-1]."""
    x, w, b = _f64(x), _f64(w), _f64(b)
    mean = x.mean(axis=-1)
    rstd = 1.0 / np.sqrt(((x - mean[..., None]) ** 2).mean(axis=-1) + eps)
    xhat = (x - mean[..., None]) * rstd[..., None]
    return xhat * w + b, mean, rstd


def layernorm_backward(dout, x, w, mean, rstd):
    """With xhat = (x - mean) * rstd and g = dout * w (the gradient w.r.t. xhat):
    db = sum dout, dw = sum dout * xhat (over all leading axes),
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (means over the last axis).
    The two mean terms come from mean and rstd depending on every x of the row."""
    dout, x, w = _f64(dout), _f64(x), _f64(w)
    mean, rstd = _f64(mean)[..., None], _f64(rstd)[..., None]
    xhat = (x - mean) * rstd
    g = dout * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    C = x.shape[-1]
    dw = (dout * xhat).reshape(-1, C).sum(axis=0)
    db = dout.reshape(-1, C).sum(axis=0)
    return dx, dw, db


# ---- matmul (linear layer) ---------------------------------------------------------------

def matmul_forward(x, w, b=None):
    """out = x @ w.T (+ b);  x (..., C), w (OC, C), b (OC,) -> (..., OC)."""
    out = _f64(x) @ _f64(w).T
    return out if b is None else out + _f64(b)


def matmul_backward(dout, x, w):
    """dx = dout @ w;  dw = dout^T x and db = sum dout, both summed over all leading axes.
    Returns (dx (..., C), dw (OC, C), db (OC,))."""
    dout, x, w = _f64(dout), _f64(x), _f64(w)
    d2, x2 = dout.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1])
    return dout @ w, d2.T @ x2, d2.sum(axis=0)


# ---- bias --------------------------------------------------------------------------------

def bias_forward(x, b):
    """out = x + b, b broadcast along the last axis."""
    return _f64(x) + _f64(b)


def bias_backward(dout):
    """db = dout summed over all leading axes -> (C,)."""
    dout = _f64(dout)
    return dout.reshape(-1, dout.shape[-1]).sum(axis=0)


# ---- GELU (tanh approximation, as GPT-2) --------------------------------------------------

_GELU_S = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x):
    """gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)."""
    x = _f64(x)
    return 0.5 * x * (1.0 + np.tanh(_GELU_S * (x + _GELU_A * x ** 3)))


def gelu_backward(dout, x):
    """dx = dout * [0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3*0.044715 x^2)]."""
    dout, x = _f64(dout), _f64(x)
    t = np.tanh(_GELU_S * (x + _GELU_A * x ** 3))
    dudx = _GELU_S * (1.0 + 3.0 * _GELU_A * x ** 2)
    return dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx)


# ---- softmax cross-entropy over a padded vocabulary --------------------------------------

def _logsumexp(z, axis=-1):
    """log sum exp z along axis, shifted by the max for stability (a row of all -inf gives -inf)."""
    m = np.max(z, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return (np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def _ce_inputs(logits, targets, V):
    logits = _f64(logits)
    V = logits.shape[-1] if V is None else int(V)
    if not 0 < V <= logits.shape[-1]:
        raise ValueError(f"V must be in [1, {logits.shape[-1]}], got {V}")
    targets = _ids(targets, V, "targets")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {targets.shape} does not match logits {logits.shape}")
    return logits, targets, V


def cross_entropy_forward(logits, targets, V=None):
    """losses[i] = logsumexp(logits[i, :V]) - logits[i, targets[i]]  (= -log softmax[target]).
    Columns >= V (vocabulary padding) take no part.  logits (N, Vp) -> losses (N,)
    (any leading shape: losses have shape logits.shape[:-1])."""
    logits, targets, V = _ce_inputs(logits, targets, V)
    z = logits[..., :V]
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return _logsumexp(z) - picked


def cross_entropy_backward(logits, targets, V=None, scale=None):
    """Gradient of L = scale * sum_i losses[i]:  dlogits[i, :V] = scale * (softmax(logits[i, :V])
    - onehot(targets[i])), dlogits[i, V:] = 0.  scale defaults to 1/N (N rows: the mean loss).
    Each row of dlogits sums to zero."""
    logits, targets, V = _ce_inputs(logits, targets, V)
    N = targets.size
    scale = 1.0 / N if scale is None else float(scale)
    z = logits[..., :V]
    p = np.exp(z - _logsumexp(z)[..., None])
    np.put_along_axis(p, targets[..., None],
                      np.take_along_axis(p, targets[..., None], axis=-1) - 1.0, axis=-1)
    dlogits = np.zeros_like(logits)
    dlogits[..., :V] = scale * p
    return dlogits


# ---- causal multi-head self-attention ------------------------------------------------------

def _split_heads(qkv, n_head):
    """qkv (B, T, 3C) -> q, k, v each (B, H, T, d)."""
    B, T, C3 = qkv.shape
    if C3 % 3 or (C3 // 3) % n_head:
        raise ValueError(f"qkv last dim {C3} must be 3*C with C divisible by n_head={n_head}")
    d = C3 // 3 // n_head
    heads = qkv.reshape(B, T, 3, n_head, d).transpose(2, 0, 3, 1, 4)
    return heads[0], heads[1], heads[2]


def _merge_heads(y):
    """(B, H, T, d) -> (B, T, H*d), head h at columns h*d."""
    B, H, T, d = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * d)


def _attention_probs(q, k):
    """S = q k^T / sqrt(d) with S[i, j] = -inf for j > i (causal); lse = logsumexp_j S[i, j];
    P = exp(S - lse).  Returns (P (B, H, T, T), lse (B, H, T))."""
    T, d = q.shape[-2], q.shape[-1]
    s = (q @ k.swapaxes(-1, -2)) / math.sqrt(d)
    s = np.where(np.tril(np.ones((T, T), dtype=bool)), s, -np.inf)
    lse = _logsumexp(s)
    return np.exp(s - lse[..., None]), lse


def attention_forward(qkv, n_head):
    """Causal attention per head: out_i = sum_{j<=i} P[i, j] v_j with P the row softmax of
    S = q k^T / sqrt(d) over j <= i.  qkv (B, T, 3C) -> (out (B, T, C), lse (B, H, T)), lse being
    the logsumexp of each row of S (what a flash kernel saves for its backward)."""
    q, k, v = _split_heads(_f64(qkv), n_head)
    p, lse = _attention_probs(q, k)
    return _merge_heads(p @ v), lse


def attention_backward(dout, qkv, n_head):
    """With O = P v and P = softmax(S) (causal rows), per head:
    dv = P^T dO;  dP = dO v^T;  dS = P * (dP - D) with D_i = sum_j P_ij dP_ij = dO_i . O_i;
    dq = dS k / sqrt(d);  dk = dS^T q / sqrt(d).  Masked entries have P = 0, hence dS = 0.
    Returns dqkv (B, T, 3C) laid out like qkv."""
    qkv = _f64(qkv)
    q, k, v = _split_heads(qkv, n_head)
    p, _ = _attention_probs(q, k)
    B, T, C3 = qkv.shape
    do = _f64(dout).reshape(B, T, n_head, -1).transpose(0, 2, 1, 3)
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.swapaxes(-1, -2)
    D = (do * (p @ v)).sum(axis=-1, keepdims=True)
    ds = p * (dp - D) / math.sqrt(q.shape[-1])
    dq, dk = ds @ k, ds.swapaxes(-1, -2) @ q
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


# ---- gradient norm, clipping, AdamW ---------------------------------------------------------

def global_norm(grads):
    """sqrt(sum of squares of every element of every array) -> float."""
    if isinstance(grads, (list, tuple)):
        return math.sqrt(sum(float(np.sum(_f64(g) ** 2)) for g in grads))
    return math.sqrt(float(np.sum(_f64(grads) ** 2)))


def clip_scale(norm, max_norm):
    """The factor gradients are multiplied by: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, float(max_norm) / (float(norm) + 1e-6))


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step,
                 decay=True, grad_scale=1.0):
    """One AdamW step (step counts from 1), decoupled weight decay:
    g = grad * grad_scale;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    mhat = m / (1 - b1^step);  vhat = v / (1 - b2^step);
    param = param - lr * (mhat / (sqrt(vhat) + eps) + weight_decay * param [if decay]).
    Returns new (param, m, v)."""
    param, m, v = _f64(param), _f64(m), _f64(v)
    g = _f64(grad) * grad_scale
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    mhat = m / (1.0 - beta1 ** step)
    vhat = v / (1.0 - beta2 ** step)
    update = mhat / (np.sqrt(vhat) + eps)
    if decay:
        update = update + weight_decay * param
    return param - lr * update, m, v


# ---- the tiny GPT-2 reference model ---------------------------------------------------------

def _cfg(config):
    """(n_layer, n_head, C, block_size, V, Vp) from a config object or dict."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
    return (int(get("n_layer")), int(get("n_head")), int(get("n_embd")),
            int(get("block_size")), int(get("vocab_size")), int(get("padded_vocab_size")))


def param_shapes(n_layer: int, n_embd: int, block_size: int, padded_vocab_size: int) -> dict:
    """{name: shape} of every parameter in the contract's order: wte (Vp, C), wpe (block_size,
    C), then per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, then ln_f.
    Linear weights are (out_features, in_features). The one definition of the layout: the
    model and checkpoint.py take it from here."""
    C, Vp = n_embd, padded_vocab_size
    shapes = {"wte": (Vp, C), "wpe": (block_size, C)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def gpt_param_shapes(config):
    """param_shapes for a config object or dict (HF GPT-2 names, Linear weights as
    (out_features, in_features))."""
    L, _, C, maxT, _, Vp = _cfg(config)
    return param_shapes(L, C, maxT, Vp)


def gpt_init(config, rng):
    """GPT-2 / nanoGPT init: weights and embeddings N(0, 0.02), the two residual projections
    (attn.c_proj, mlp.c_proj weights) N(0, 0.02/sqrt(2 n_layer)), biases 0, layernorm weight 1
    and bias 0, wte rows >= vocab_size 0.  rng: np.random.Generator.  Returns {name: float64}."""
    L, _, _, _, V, _ = _cfg(config)
    params = {}
    for name, shape in gpt_param_shapes(config).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            params[name] = np.ones(shape)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape)
        elif name.endswith("c_proj.weight"):
            params[name] = rng.normal(0.0, 0.02 / math.sqrt(2 * L), shape)
        else:
            params[name] = rng.normal(0.0, 0.02, shape)
    params["wte"][V:] = 0.0
    return params


# Dropout sites of the model and the Philox offset of each (step, micro-step, layer, site):
# the same formula as textgpt2.model.dropout_offset, written out here independently.
GPT_DROP_ATTN, GPT_DROP_ATTN_PROJ, GPT_DROP_MLP, GPT_DROP_EMBD = 0, 1, 2, 3


def gpt_dropout_offset(step, micro_step, layer, site):
    """((step * 1024 + micro_step) * 256 + layer) * 4 + site; the embedding is layer 0's
    GPT_DROP_EMBD site."""
    if not (0 <= micro_step < 1024 and 0 <= layer < 256 and 0 <= site < 4 and step >= 0):
        raise ValueError(f"dropout key out of range: step {step}, micro_step {micro_step}, "
                         f"layer {layer}, site {site}")
    return ((int(step) * 1024 + int(micro_step)) * 256 + int(layer)) * 4 + int(site)


class _GptDropout:
    """The masks of one training micro-step (p == 0: identities)."""

    def __init__(self, p, seed, step, micro_step):
        self.p, self.seed, self.step, self.micro_step = float(p), seed, step, micro_step

    def offset(self, layer, site):
        return gpt_dropout_offset(self.step, self.micro_step, layer, site)

    def forward(self, x, layer, site):
        if not self.p:
            return x
        mask = dropout_mask(self.seed, self.offset(layer, site), x.size, self.p)
        return dropout_forward(x, mask.reshape(x.shape), self.p)

    def backward(self, dout, layer, site):
        if not self.p:
            return dout
        mask = dropout_mask(self.seed, self.offset(layer, site), dout.size, self.p)
        return dropout_backward(dout, mask.reshape(dout.shape), self.p)

    def _attention_ref(self, name):
        fn = globals().get(name)
        if fn is None:
            raise NotImplementedError(f"reference.{name} (attention-probability dropout) is not "
                                      "defined; gpt_forward/gpt_backward with dropout need it")
        return fn

    def attention_forward(self, qkv, n_head, layer):
        if not self.p:
            return attention_forward(qkv, n_head)[0]
        out = self._attention_ref("attention_forward_dropout")(
            qkv, n_head, self.p, self.seed, self.offset(layer, GPT_DROP_ATTN))
        return out[0] if isinstance(out, tuple) else out

    def attention_backward(self, dout, qkv, n_head, layer):
        if not self.p:
            return attention_backward(dout, qkv, n_head)
        return self._attention_ref("attention_backward_dropout")(
            dout, qkv, n_head, self.p, self.seed, self.offset(layer, GPT_DROP_ATTN))


def gpt_forward(params, idx, targets, config, dropout=0.0, seed=0, step=0, micro_step=0):
    """GPT-2 forward.  x = drop(wte[idx] + wpe[:T]); per layer
        x = x + drop(c_proj(attention(c_attn(ln_1(x)))));
        x = x + drop(mlp.c_proj(gelu(c_fc(ln_2(x)))));
    then ln_f, logits = x @ wte.T (B, T, Vp) (tied head), loss = mean cross-entropy over the
    B*T positions with V = vocab_size.  idx, targets (B, T) ints (targets may be None: loss None).
    dropout = p > 0 also drops attention probabilities (attention_forward_dropout); every drop
    uses dropout_mask(seed, gpt_dropout_offset(step, micro_step, layer, site), size, p), the
    masks the CUDA model draws in the training forward with dropout_step=step. p = 0 (the
    default): no dropout, evaluation.
    Returns (loss, cache); cache["logits"] holds the logits, the rest is for gpt_backward."""
    L, H, C, maxT, V, Vp = _cfg(config)
    P = {k: _f64(p) for k, p in params.items()}
    idx = _ids(idx, V, "idx")
    drop = _GptDropout(_dropout_p(dropout), seed, step, micro_step)
    x = drop.forward(encoder_forward(idx, P["wte"], P["wpe"]), 0, GPT_DROP_EMBD)
    layers = []
    for i in range(L):
        p = f"h.{i}."
        c = {"x": x}
        c["ln1"], c["ln1_mean"], c["ln1_rstd"] = layernorm_forward(
            x, P[p + "ln_1.weight"], P[p + "ln_1.bias"])
        c["qkv"] = matmul_forward(c["ln1"], P[p + "attn.c_attn.weight"], P[p + "attn.c_attn.bias"])
        c["att"] = drop.attention_forward(c["qkv"], H, i)
        x = x + drop.forward(matmul_forward(c["att"], P[p + "attn.c_proj.weight"],
                                            P[p + "attn.c_proj.bias"]), i, GPT_DROP_ATTN_PROJ)
        c["x_mid"] = x
        c["ln2"], c["ln2_mean"], c["ln2_rstd"] = layernorm_forward(
            x, P[p + "ln_2.weight"], P[p + "ln_2.bias"])
        c["fc"] = matmul_forward(c["ln2"], P[p + "mlp.c_fc.weight"], P[p + "mlp.c_fc.bias"])
        c["gelu"] = gelu_forward(c["fc"])
        x = x + drop.forward(matmul_forward(c["gelu"], P[p + "mlp.c_proj.weight"],
                                            P[p + "mlp.c_proj.bias"]), i, GPT_DROP_MLP)
        layers.append(c)
    lnf, lnf_mean, lnf_rstd = layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"])
    logits = matmul_forward(lnf, P["wte"])
    cache = {"idx": idx, "layers": layers, "x_final": x, "lnf": lnf, "lnf_mean": lnf_mean,
             "lnf_rstd": lnf_rstd, "logits": logits, "targets": None, "dropout": drop}
    if targets is None:
        return None, cache
    cache["targets"] = _ids(targets, V, "targets")
    loss = float(cross_entropy_forward(logits.reshape(-1, Vp), cache["targets"].reshape(-1), V).mean())
    return loss, cache


def gpt_backward(params, cache, config):
    """Gradient of gpt_forward's mean loss for every parameter ({name: array}, same shapes).
    The layers are walked backward; each residual add passes dx unchanged to both branches
    (into a branch through its dropout mask, the forward's, kept in the cache).
    dwte gets the tied lm head's dlogits^T ln_f(x) plus the embedding gradient; its padded
    rows stay 0 because dlogits is 0 in the padded columns."""
    L, H, C, maxT, V, Vp = _cfg(config)
    if cache["targets"] is None:
        raise ValueError("gpt_backward needs a forward pass that was given targets")
    P = {k: _f64(p) for k, p in params.items()}
    B, T = cache["idx"].shape
    drop = cache.get("dropout") or _GptDropout(0.0, 0, 0, 0)
    grads = {}
    dlogits = cross_entropy_backward(cache["logits"].reshape(-1, Vp),
                                     cache["targets"].reshape(-1), V).reshape(B, T, Vp)
    dlnf, dwte_head, _ = matmul_backward(dlogits, cache["lnf"], P["wte"])
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(
        dlnf, cache["x_final"], P["ln_f.weight"], cache["lnf_mean"], cache["lnf_rstd"])
    for i in reversed(range(L)):
        p, c = f"h.{i}.", cache["layers"][i]
        # x = x_mid + mlp.c_proj(gelu(c_fc(ln_2(x_mid))))
        dgelu, grads[p + "mlp.c_proj.weight"], grads[p + "mlp.c_proj.bias"] = matmul_backward(
            drop.backward(dx, i, GPT_DROP_MLP), c["gelu"], P[p + "mlp.c_proj.weight"])
        dfc = gelu_backward(dgelu, c["fc"])
        dln2, grads[p + "mlp.c_fc.weight"], grads[p + "mlp.c_fc.bias"] = matmul_backward(
            dfc, c["ln2"], P[p + "mlp.c_fc.weight"])
        dx_ln2, grads[p + "ln_2.weight"], grads[p + "ln_2.bias"] = layernorm_backward(
            dln2, c["x_mid"], P[p + "ln_2.weight"], c["ln2_mean"], c["ln2_rstd"])
        dx = dx + dx_ln2
        # x_mid = x + attn.c_proj(attention(c_attn(ln_1(x))))
        datt, grads[p + "attn.c_proj.weight"], grads[p + "attn.c_proj.bias"] = matmul_backward(
            drop.backward(dx, i, GPT_DROP_ATTN_PROJ), c["att"], P[p + "attn.c_proj.weight"])
        dqkv = drop.attention_backward(datt, c["qkv"], H, i)
        dln1, grads[p + "attn.c_attn.weight"], grads[p + "attn.c_attn.bias"] = matmul_backward(
            dqkv, c["ln1"], P[p + "attn.c_attn.weight"])
        dx_ln1, grads[p + "ln_1.weight"], grads[p + "ln_1.bias"] = layernorm_backward(
            dln1, c["x"], P[p + "ln_1.weight"], c["ln1_mean"], c["ln1_rstd"])
        dx = dx + dx_ln1
    dx = drop.backward(dx, 0, GPT_DROP_EMBD)
    dwte_emb, grads["wpe"] = encoder_backward(dx, cache["idx"], Vp, maxT)
    grads["wte"] = dwte_head + dwte_emb
    return {name: grads[name] for name in gpt_param_shapes(config)}


# ---- dropout -------------------------------------------------------------------------------
# The CUDA mask generator (csrc/philox.cuh) in NumPy, bit for bit: Philox-4x32-10 with
#   key = (seed & 0xffffffff, seed >> 32), counter = (g & 0xffffffff, g >> 32,
#   offset & 0xffffffff, offset >> 32), g = i >> 2; element i uses output word i & 3 and is kept
#   iff that word >= floor(float32(p) * 2^32).

__all__ += ["dropout_forward", "dropout_backward", "philox4x32_10", "dropout_threshold",
            "dropout_scale", "dropout_mask"]

_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_PHILOX_W0, _PHILOX_W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # Weyl key increments
_U32 = np.uint64(0xFFFFFFFF)


def _dropout_p(p):
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability p must satisfy 0 <= p < 1, got {p}")
    return p


def _keep_mask(mask, shape):
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be boolean (True = kept), got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match {shape}")
    return mask


def dropout_forward(x, mask, p):
    """Inverted dropout with a given keep mask: out = x / (1 - p) where mask, else 0 (exactly
    0, also for inf/NaN inputs, as the kernel's select does)."""
    x, p = _f64(x), _dropout_p(p)
    return np.where(_keep_mask(mask, x.shape), x / (1.0 - p), 0.0)


def dropout_backward(dout, mask, p):
    """out_i = x_i * mask_i / (1 - p) depends on x_i alone, linearly, so
    dx = dout / (1 - p) where mask, else 0: the forward map applied to dout."""
    dout, p = _f64(dout), _dropout_p(p)
    return np.where(_keep_mask(mask, dout.shape), dout / (1.0 - p), 0.0)


def _u64_words(values, name, words):
    """Integers in [0, 2^32) as a uint64 array with last axis `words`."""
    a = np.asarray(values)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {a.dtype}")
    if a.shape[-1:] != (words,):
        raise ValueError(f"{name} must have last dimension {words}, got shape {a.shape}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFFFFFF):
        raise ValueError(f"{name} words must lie in [0, 2^32)")
    return a.astype(np.uint64)


def _philox_words(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on uint64 arrays holding 32-bit words (broadcast together). Each round:
    (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0));
    the key is bumped by (W0, W1) between rounds. Products of two 32-bit values fit uint64."""
    for r in range(10):
        if r:
            k0 = (k0 + _PHILOX_W0) & _U32
            k1 = (k1 + _PHILOX_W1) & _U32
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _U32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32)
    return c0, c1, c2, c3


def philox4x32_10(counter, key):
    """Philox-4x32-10 of Salmon et al. (SC 2011): counter (..., 4) and key (..., 2) of 32-bit
    words (broadcast against each other) -> (..., 4) uint32."""
    c = _u64_words(counter, "counter", 4)
    k = _u64_words(key, "key", 2)
    out = _philox_words(c[..., 0], c[..., 1], c[..., 2], c[..., 3], k[..., 0], k[..., 1])
    return np.stack(np.broadcast_arrays(*out), axis=-1).astype(np.uint32)


def dropout_threshold(p):
    """floor(float32(p) * 2^32): an element is kept iff its 32-bit random word is >= this, so
    P(keep) = 1 - threshold / 2^32. p crosses to the kernels as a C float, hence the rounding."""
    p32 = np.float64(np.float32(_dropout_p(p)))
    if p32 >= 1.0:
        raise ValueError(f"dropout probability p={p} rounds to 1 as a float32")
    return int(p32 * 4294967296.0)  # exact product (24-bit mantissa), int() floors


def dropout_scale(p):
    """The float32 factor the kernels multiply kept values by: float32(1 / (1 - float32(p)))."""
    return np.float32(1.0 / (1.0 - np.float64(np.float32(_dropout_p(p)))))


def _u64_scalar(value, name):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or not 0 <= int(value) < 2**64):
        raise ValueError(f"{name} must be an integer in [0, 2^64), got {value!r}")
    return int(value)


def dropout_mask(seed, offset, n, p):
    """The keep mask (bool, shape (n,), True = kept) that the CUDA dropout kernels draw for n
    elements of stream (seed, offset) at drop probability p, bit for bit."""
    seed, offset = _u64_scalar(seed, "seed"), _u64_scalar(offset, "offset")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    thr = np.uint64(dropout_threshold(p))
    g = np.arange((n + 3) // 4, dtype=np.uint64)
    w32 = lambda v: np.uint64(v & 0xFFFFFFFF)
    words = _philox_words(g & _U32, g >> np.uint64(32), w32(offset), w32(offset >> 32),
                          w32(seed), w32(seed >> 32))
    words = np.stack(np.broadcast_arrays(*words), axis=-1).reshape(-1)[:n]
    return words >= thr


# ---- attention with dropout on the probabilities (csrc/attention.cu, dropout_p > 0) ----------

__all__ += ["attention_dropout_mask", "attention_forward_dropout", "attention_backward_dropout"]


def attention_dropout_mask(B, n_head, T, p, seed, offset):
    """The keep mask (bool, (B, H, T, T), [b, h, i, j] for query i and key j) the attention
    kernels draw: element index ((b*H + h)*T + i)*T + j of dropout_mask's stream (seed, offset),
    i.e. dropout_mask(seed, offset, B*H*T*T, p) in C order. Entries with j > i exist too (the
    causal mask makes them irrelevant)."""
    return dropout_mask(seed, offset, B * n_head * T * T, p).reshape(B, n_head, T, T)


def _attention_dropped(qkv, n_head, p, seed, offset):
    """q, k, v, P (undropped softmax), lse, M (keep mask) and Pd = M * P * r, r = 1 / (1 - p)
    with p rounded to float32 as the kernels see it."""
    q, k, v = _split_heads(_f64(qkv), n_head)
    P, lse = _attention_probs(q, k)
    B, H, T = lse.shape
    M = attention_dropout_mask(B, H, T, p, seed, offset)
    r = 1.0 / (1.0 - np.float64(np.float32(_dropout_p(p))))
    return q, k, v, P, lse, M, np.where(M, P * r, 0.0), r


def attention_forward_dropout(qkv, n_head, p, seed, offset):
    """attention_forward with dropout on the probabilities (GPT-2's attn_dropout): per head
    out = (M o P r) v, r = 1 / (1 - p), M = attention_dropout_mask(...). lse stays the logsumexp
    of the undropped scores (the softmax normalisation never sees the mask).
    Returns (out (B, T, C), lse (B, H, T))."""
    _, _, v, _, lse, _, Pd, _ = _attention_dropped(qkv, n_head, p, seed, offset)
    return _merge_heads(Pd @ v), lse


def attention_backward_dropout(dout, qkv, n_head, p, seed, offset):
    """Gradient of attention_forward_dropout at its (fixed) mask. With Pd = M o P r, O = Pd v:
    dv = Pd^T dO;  dPd = dO v^T;  dP = M o dPd r;  dS = P o (dP - D) with
    D_i = sum_j P_ij dP_ij = dO_i . sum_j M_ij r P_ij v_j = dO_i . O_i (the dropped output);
    dq = dS k / sqrt(d), dk = dS^T q / sqrt(d). Returns dqkv (B, T, 3C) laid out like qkv."""
    q, k, v, P, _, M, Pd, r = _attention_dropped(qkv, n_head, p, seed, offset)
    B, H, T, d = q.shape
    do = _f64(dout).reshape(B, T, H, d).transpose(0, 2, 1, 3)
    dv = Pd.swapaxes(-1, -2) @ do
    dP = np.where(M, (do @ v.swapaxes(-1, -2)) * r, 0.0)
    D = (do * (Pd @ v)).sum(axis=-1, keepdims=True)
    ds = P * (dP - D) / math.sqrt(d)
    dq, dk = ds @ k, ds.swapaxes(-1, -2) @ q
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)
