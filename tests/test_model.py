"""textgpt2.model: GPTConfig (CPU), the parameter layout (CPU), and on the GPU the whole model
against reference.gpt_forward / gpt_backward, training, gradient accumulation, determinism,
CUDA graphs, and the state dict.

Tolerances (relative L2 error per tensor, conftest.rel_err), from a float64 simulation of the
rounding (the reference model with the matmul / attention inputs rounded to TF32's 10-bit
mantissa, 4 configs x 3 seeds, including GPT-2 widths): the attention kernel always multiplies
in TF32 (csrc/attention.cu), which alone gives up to 1e-6 on the loss, 8e-5 on the logits and
4.5e-4 on the gradients (worst: ln_1 weights, c_attn weights); TF32 matmuls as well give up to
1.1e-5, 5e-4 and 1.2e-3. We allow 6-20x that:
  - fp32 matmuls (gemm.set_math("fp32")): loss 2e-5, logits 1e-3, gradients 3e-3;
  - TF32 matmuls (the default): loss 1e-4, logits 3e-3, gradients 1e-2.
A wrong op (a missing bias, a swapped operand, a lost residual) is off by O(1).
"""
import math

import numpy as np
import pytest

from conftest import rel_err
from textgpt2 import reference
from textgpt2.model import (PRESETS, SUPPORTED_HEAD_DIMS, GPTConfig, init_params,
                            param_layout)

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=37)

# (config, B, T): head sizes 32 / 128 / 64; vocab 37 -> 128, 300 -> 384 and 128 (no padding);
# T below, at, and not a multiple of anything relative to block_size
REF_CASES = [
    (TINY, 2, 8),
    (dict(n_layer=1, n_head=2, n_embd=256, block_size=32, vocab_size=300), 3, 13),
    (dict(n_layer=2, n_head=3, n_embd=192, block_size=8, vocab_size=128), 1, 8),
]


# ---- GPTConfig (CPU) ---------------------------------------------------------------------

def test_presets():
    d = GPTConfig.preset("default")
    assert (d.n_layer, d.n_head, d.n_embd, d.block_size, d.vocab_size) == (6, 6, 384, 256, 256)
    assert d == GPTConfig()                      # the dataclass defaults are the default preset
    g = GPTConfig.preset("gpt2")
    assert (g.n_layer, g.n_head, g.n_embd, g.block_size, g.vocab_size) == (12, 12, 768, 1024, 50257)
    assert g.padded_vocab_size == 50304
    assert GPTConfig.preset("gpt2", n_layer=4, n_head=None).n_layer == 4
    assert GPTConfig.preset("gpt2", n_head=None).n_head == 12   # None: keep the preset's
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.preset("gpt2", n_heads=4)


@pytest.mark.parametrize("V,Vp", [(1, 128), (37, 128), (128, 128), (129, 256), (256, 256),
                                  (300, 384), (50257, 50304)])
def test_padded_vocab_size(V, Vp):
    assert GPTConfig(**{**TINY, "vocab_size": V}).padded_vocab_size == Vp


@pytest.mark.parametrize("field,value,match", [
    ("n_layer", 0, "'n_layer' must be a positive integer, got 0"),
    ("n_head", -2, "'n_head' must be a positive integer, got -2"),
    ("n_embd", 64.0, "'n_embd' must be a positive integer, got 64.0"),
    ("block_size", True, "'block_size' must be a positive integer, got True"),
    ("vocab_size", "256", "'vocab_size' must be a positive integer"),
    ("n_embd", 65, r"n_embd \(65\) must be divisible by n_head \(2\)"),
    ("n_embd", 96, "head size n_embd/n_head = 96/2 = 48 is not supported"),
    ("n_embd", 512, "= 256 is not supported by the attention kernel"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**TINY, field: value})


@pytest.mark.parametrize("d", SUPPORTED_HEAD_DIMS)
def test_config_supported_head_dims(d):
    assert GPTConfig(n_layer=1, n_head=3, n_embd=3 * d, block_size=4, vocab_size=5).head_dim == d


def test_config_dict_round_trip():
    for name in PRESETS:
        c = GPTConfig.preset(name)
        assert GPTConfig.from_dict(c.to_dict()) == c
    c = GPTConfig(**TINY)
    assert c.to_dict() == {**TINY, "dropout": 0.0}
    assert GPTConfig.from_dict({**TINY, "padded_vocab_size": 128}) == c
    with pytest.raises(ValueError, match="padded_vocab_size 256 does not match"):
        GPTConfig.from_dict({**TINY, "padded_vocab_size": 256})
    with pytest.raises(ValueError, match="unknown key.*n_embed"):
        GPTConfig.from_dict({**TINY, "n_embed": 64})
    with pytest.raises(ValueError, match="missing key.*block_size"):
        GPTConfig.from_dict({k: v for k, v in TINY.items() if k != "block_size"})
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig.from_dict({**TINY, "n_embd": 65})


def test_param_count_and_flops_gpt2():
    g = GPTConfig.preset("gpt2")
    # GPT-2 small has 124,439,808 parameters with vocab 50257; wte's 47 padded rows add
    # 47 * 768, and non_embedding leaves out wpe (1024 * 768), as nanoGPT counts.
    assert g.num_params(non_embedding=False) == 124_439_808 + 47 * 768
    assert g.num_params() == 124_439_808 + 47 * 768 - 1024 * 768
    assert g.flops_per_token() == 6 * g.num_params() + 12 * 12 * 12 * 64 * 1024
    assert g.flops_per_token(256) == 6 * g.num_params() + 12 * 12 * 12 * 64 * 256


def test_param_shapes_match_reference():
    for cfg in (GPTConfig(**TINY), GPTConfig.preset("gpt2")):
        assert cfg.param_shapes() == reference.gpt_param_shapes(cfg)


def test_param_layout():
    cfg = GPTConfig(**REF_CASES[1][0])
    layout, n_decay, total = param_layout(cfg)
    assert list(layout) == list(cfg.param_shapes())
    spans = sorted((off, off + math.prod(shape), name) for name, (off, shape) in layout.items())
    for (a0, a1, _), (b0, _, _) in zip(spans, spans[1:]):
        assert a1 <= b0                                     # no overlap
    assert spans[-1][1] <= total
    for name, (off, shape) in layout.items():
        assert off % 64 == 0                                # 256-byte aligned
        assert (off < n_decay) == (len(shape) == 2), name   # weights and embeddings decay
        if len(shape) == 2:
            assert off + math.prod(shape) <= n_decay


def test_init_matches_reference_init():
    cfg = GPTConfig(**TINY)
    ours = init_params(cfg, seed=5)
    ref = reference.gpt_init(cfg, np.random.default_rng(5))
    assert list(ours) == list(ref)
    for name in ours:
        assert ours[name].dtype == np.float32
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-7, atol=1e-9, err_msg=name)
    assert not ours["wte"][cfg.vocab_size:].any()
    std = np.std(ours["h.0.attn.c_proj.weight"])
    assert 0.5 * 0.02 / math.sqrt(4) < std < 1.5 * 0.02 / math.sqrt(4)


def test_gpt_without_gpu_says_so():
    from textgpt2.device import NoGPUError, gpu_status
    if gpu_status()[0]:
        pytest.skip("a GPU is present")
    from textgpt2.model import GPT
    with pytest.raises(NoGPUError, match="needs an NVIDIA GPU"):
        GPT(GPTConfig(**TINY))


# ---- helpers for the GPU tests -----------------------------------------------------------

@pytest.fixture
def fp32_matmuls():
    """Full fp32 cuBLAS math for the duration of a test (the default is TF32)."""
    from textgpt2 import gemm
    before = gemm.get_math()
    gemm.set_math("fp32")
    try:
        yield
    finally:
        gemm.set_math(before)


def _perturbed_params(cfg, rng, seed=0):
    """Initial values with every bias and layernorm parameter moved off 0 / 1, so a missing
    bias add or layernorm scale could not go unnoticed; padded wte rows stay 0."""
    params = init_params(cfg, seed)
    for name, a in params.items():
        if a.ndim == 1:
            base = 1.0 if name.endswith("weight") else 0.0
            params[name] = (base + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    return params


def _batch(rng, cfg, B, T):
    return (rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
            rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32))


def _poison(model, cp, B, T):
    """Fill every activation and activation-gradient buffer with NaN: whatever an op fails to
    write shows up as NaN in the loss or the gradients."""
    v = model._acts(B, T)
    model._grad_bufs(v)
    for a in list(model._store.values()) + list(model._gstore.values()):
        if a.dtype == np.float32:
            a.fill(np.nan)


def _grads(model):
    return {name: g.get() for name, g in model.grad_views.items()}


# ---- the model against the reference -----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("cfg_dict,B,T", REF_CASES)
def test_loss_and_grads_match_reference(cp, rng, fp32_matmuls, cfg_dict, B, T):
    from textgpt2.model import GPT
    cfg = GPTConfig(**cfg_dict)
    model = GPT(cfg, seed=1)
    params = _perturbed_params(cfg, rng)
    model.load_state_dict(params)
    idx, targets = _batch(rng, cfg, B, T)
    ref_loss, cache = reference.gpt_forward(params, idx, targets, cfg)
    ref_grads = reference.gpt_backward(params, cache, cfg)

    _poison(model, cp, B, T)
    model.grads.fill(np.nan)
    model.zero_grad()
    loss = model.forward(idx, targets)
    assert isinstance(loss, float)
    model.backward()
    assert abs(loss - ref_loss) / abs(ref_loss) < 2e-5, (loss, ref_loss)
    grads = _grads(model)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) < 3e-3, (name, rel_err(grads[name], ref))
    assert not grads["wte"][cfg.vocab_size:].any()          # padded rows get no gradient
    assert not grads["wpe"][T:].any()                       # unused positions neither
    # nothing outside the named tensors (alignment gaps) was written
    flat = model.grads.get()
    assert np.sum(flat.astype(np.float64) ** 2) == pytest.approx(
        sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()), rel=1e-12)

    # inference forward: the logits
    logits = model.forward(cp.asarray(idx))
    assert logits.shape == (B, T, cfg.padded_vocab_size)
    ref_logits = cache["logits"]
    assert rel_err(logits.get()[..., :cfg.vocab_size], ref_logits[..., :cfg.vocab_size]) < 1e-3
    last = model.logits_last(idx)
    assert last.shape == (B, cfg.vocab_size) and last.dtype == np.float32
    assert rel_err(last, ref_logits[:, -1, :cfg.vocab_size]) < 1e-3


@pytest.mark.gpu
def test_tf32_matches_reference_loosely(rng):
    """The default math (TF32 tensor cores) at the tiny config."""
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    params = _perturbed_params(cfg, rng)
    model.load_state_dict(params)
    idx, targets = _batch(rng, cfg, 2, 8)
    ref_loss, cache = reference.gpt_forward(params, idx, targets, cfg)
    ref_grads = reference.gpt_backward(params, cache, cfg)
    model.zero_grad()
    loss = model.forward(idx, targets)
    model.backward()
    assert abs(loss - ref_loss) / abs(ref_loss) < 1e-4, (loss, ref_loss)
    grads = _grads(model)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) < 1e-2, (name, rel_err(grads[name], ref))


@pytest.mark.gpu
@pytest.mark.big
def test_gpt2_widths_match_reference(cp, rng, fp32_matmuls):
    """GPT-2 small's widths (C=768, 12 heads of 64, vocab 50257 padded to 50304) at 2 layers."""
    from textgpt2.model import GPT
    cfg = GPTConfig.preset("gpt2", n_layer=2)
    model = GPT(cfg)
    params = _perturbed_params(cfg, rng)
    model.load_state_dict(params)
    idx, targets = _batch(rng, cfg, 2, 77)
    ref_loss, cache = reference.gpt_forward(params, idx, targets, cfg)
    ref_grads = reference.gpt_backward(params, cache, cfg)
    model.zero_grad()
    loss = model.forward(cp.asarray(idx), cp.asarray(targets))
    model.backward()
    assert abs(loss - ref_loss) / abs(ref_loss) < 2e-5, (loss, ref_loss)
    grads = _grads(model)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) < 3e-3, (name, rel_err(grads[name], ref))


# ---- training behaviour ------------------------------------------------------------------

@pytest.mark.gpu
def test_loss_decreases_on_a_fixed_batch(rng):
    """20 AdamW steps on one (2, 8) batch: the float64 reference model with the same optimizer
    goes from ~3.6 to ~0.38 (lr 3e-3, checked with reference.adamw_update); require < 0.3x."""
    from textgpt2.model import GPT
    from textgpt2.optim import AdamW
    cfg = GPTConfig(**TINY)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, lr=3e-3, weight_decay=0.1, max_norm=1.0)
    idx, targets = _batch(rng, cfg, 2, 8)
    losses = []
    for _ in range(20):
        model.zero_grad()
        losses.append(model.forward(idx, targets))
        model.backward()
        opt.step()
    assert all(np.isfinite(losses)), losses
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), abs=0.3)
    assert losses[-1] < 0.3 * losses[0], losses
    assert losses[10] < losses[0], losses


@pytest.mark.gpu
def test_gradient_accumulation_equals_full_batch(cp, rng, fp32_matmuls):
    """Two half-batches with loss_scale 1/(B*T) of the full batch accumulate to the full
    batch's gradients (only the summation order differs: 1e-5)."""
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY)
    B, T = 4, 12
    params = _perturbed_params(cfg, rng)
    idx, targets = _batch(rng, cfg, B, T)
    full = GPT(cfg)
    full.load_state_dict(params)
    full.zero_grad()
    loss_full = full.forward(idx, targets)
    full.backward()

    acc = GPT(cfg)
    acc.load_state_dict(params)
    acc.grads.fill(np.nan)
    acc.zero_grad()
    halves = []
    for sl in (slice(0, 2), slice(2, 4)):
        halves.append(acc.forward(cp.asarray(idx[sl]), cp.asarray(targets[sl]),
                                  loss_scale=1.0 / (B * T), sync=False).get())
        acc.backward()
    assert float(np.mean(halves)) == pytest.approx(loss_full, rel=1e-6)
    g_full, g_acc = _grads(full), _grads(acc)
    for name in g_full:
        assert rel_err(g_acc[name], g_full[name]) < 1e-5, name


@pytest.mark.gpu
def test_forward_backward_is_deterministic(rng):
    """The kernels avoid float atomics: two identical steps give bitwise identical results."""
    from textgpt2.model import GPT
    cfg = GPTConfig(**REF_CASES[1][0])
    model = GPT(cfg)
    idx, targets = _batch(rng, cfg, 3, 13)
    results = []
    for _ in range(2):
        model.zero_grad()
        loss = model.forward(idx, targets)
        model.backward()
        results.append((loss, model.grads.get()))
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1])


@pytest.mark.gpu
def test_cuda_graph_matches_eager(cp, rng):
    """use_graph=True (warm-up call, capture, then replays) gives the eager model's losses and
    parameters over several optimizer steps, including an evaluation and an inference pass in
    between (other graphs), and a second batch shape."""
    from textgpt2.model import GPT
    from textgpt2.optim import AdamW
    cfg = GPTConfig(**TINY)
    runs = []
    for use_graph in (False, True):
        r = np.random.default_rng(123)
        model = GPT(cfg, seed=3, use_graph=use_graph)
        opt = AdamW(model, lr=1e-3)
        out = []
        for step in range(5):
            B, T = (2, 8) if step != 3 else (3, 5)
            idx, targets = _batch(r, cfg, B, T)
            model.zero_grad()
            out.append(model.forward(cp.asarray(idx), cp.asarray(targets)))
            model.backward()
            opt.step()
            out.append(model.loss(idx, targets))
            out.append(model.logits_last(idx))
        runs.append((out, model.params.get()))
    (eager, p_eager), (graph, p_graph) = runs
    for a, b in zip(eager, graph):
        assert rel_err(b, a) < 1e-6
    assert rel_err(p_graph, p_eager) < 1e-6


# ---- state dict, inputs, errors ----------------------------------------------------------

@pytest.mark.gpu
def test_state_dict_round_trip(rng):
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY)
    a, b = GPT(cfg, seed=0), GPT(cfg, seed=1)
    sd = a.state_dict()
    assert list(sd) == list(cfg.param_shapes())
    assert all(sd[k].shape == s and sd[k].dtype == np.float32 for k, s in cfg.param_shapes().items())
    assert not np.array_equal(sd["wte"], b.state_dict()["wte"])
    b.load_state_dict(sd)
    sd_b = b.state_dict()
    assert all(np.array_equal(sd[k], sd_b[k]) for k in sd)
    assert np.array_equal(a.params.get(), b.params.get())
    idx, targets = _batch(rng, cfg, 2, 8)
    assert a.loss(idx, targets) == b.loss(idx, targets)
    # unpadded wte (as from a Hugging Face checkpoint) is accepted and padded with zeros
    b.load_state_dict({**sd, "wte": sd["wte"][:cfg.vocab_size] + 1.0})
    wte = b.param_views["wte"].get()
    assert np.array_equal(wte[:cfg.vocab_size], sd["wte"][:cfg.vocab_size] + 1.0)
    assert not wte[cfg.vocab_size:].any()


@pytest.mark.gpu
def test_load_state_dict_rejects_mismatches():
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    sd = model.state_dict()
    before = model.params.get()
    with pytest.raises(ValueError, match="missing ln_f.bias"):
        model.load_state_dict({k: v for k, v in sd.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match="unexpected lm_head.weight"):
        model.load_state_dict({**sd, "lm_head.weight": sd["wte"]})
    with pytest.raises(ValueError, match=r"'h.1.mlp.c_fc.weight' has shape \(64, 256\), expected \(256, 64\)"):
        model.load_state_dict({**sd, "h.1.mlp.c_fc.weight": sd["h.1.mlp.c_fc.weight"].T})
    with pytest.raises(TypeError, match="'wpe' must be floating point"):
        model.load_state_dict({**sd, "wpe": sd["wpe"].astype(np.int32)})
    # a later bad tensor leaves the earlier ones untouched
    bad = {k: v + 1.0 for k, v in sd.items()}
    bad["ln_f.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="'ln_f.weight' has shape"):
        model.load_state_dict(bad)
    assert np.array_equal(model.params.get(), before)


@pytest.mark.gpu
def test_input_checks(cp):
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    ok = np.zeros((2, 8), np.int32)
    bad = ok.copy()
    bad[1, 3] = 37
    with pytest.raises(ValueError, match=r"'idx' must lie in \[0, 37\), got values in \[0, 37\]"):
        model.loss(bad, ok)
    with pytest.raises(ValueError, match=r"'targets' must lie in \[0, 37\)"):
        model.loss(ok, np.full((2, 8), -1))
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's context"):
        model.loss(np.zeros((1, 17), np.int64), np.zeros((1, 17), np.int64))
    with pytest.raises(ValueError, match=r"'targets' has shape \(2, 7\), expected \(2, 8\)"):
        model.loss(ok, ok[:, :7])
    with pytest.raises(TypeError, match="'idx' must hold integers"):
        model.forward(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match=r"'idx' must have shape \(B, T\)"):
        model.forward(np.zeros(8, np.int32))
    with pytest.raises(ValueError, match="loss_scale"):
        model.forward(ok, ok, loss_scale=-1.0)
    with pytest.raises(RuntimeError, match="no training forward"):
        model.backward()
    model.forward(ok, ok)
    model.backward()
    with pytest.raises(RuntimeError, match="no training forward"):
        model.backward()                 # one backward per training forward
    model.forward(ok, ok)
    model.forward(ok)                    # an inference pass in between invalidates it
    with pytest.raises(RuntimeError, match="no training forward"):
        model.backward()
    # CuPy int64 ids work and give the NumPy int32 result
    assert model.loss(ok, ok) == model.forward(cp.asarray(ok, dtype=cp.int64),
                                               cp.asarray(ok, dtype=cp.int64))
    assert model.logits_last(np.arange(5)).shape == (1, cfg.vocab_size)


@pytest.mark.gpu
def test_activation_buffers_grow_and_are_reused():
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    ids = np.arange(16, dtype=np.int32).reshape(2, 8) % cfg.vocab_size
    model.forward(ids, ids)
    store = model._store["qkv"]
    model.forward(ids[:1, :3], ids[:1, :3])             # smaller: views into the same storage
    assert model._store["qkv"] is store
    model.forward(np.tile(ids, (2, 2)), np.tile(ids, (2, 2)))   # (4, 16): grows
    assert model._cap == 64


@pytest.mark.gpu
@pytest.mark.big
def test_gpt2_step_runs(cp, rng):
    """GPT-2 124M, one training step at (4, 1024): the loss at init is about
    ln(50257) + var(logit)/2 = 10.82 + 0.15 (logit std 0.02 * sqrt(768)), and every gradient
    is finite."""
    from textgpt2.model import GPT
    from textgpt2.optim import AdamW, grad_norm
    cfg = GPTConfig.preset("gpt2")
    model = GPT(cfg)
    opt = AdamW(model, lr=6e-4)
    idx, targets = _batch(rng, cfg, 4, 1024)
    model.zero_grad()
    loss = model.forward(cp.asarray(idx), cp.asarray(targets))
    model.backward()
    norm = grad_norm(opt.step())
    assert 10.6 < loss < 11.4, loss
    assert np.isfinite(norm) and norm > 0
    assert bool(cp.isfinite(model.grads).all())


# ---- dropout -----------------------------------------------------------------------------
# Training forwards (targets and dropout_step given) drop with masks keyed by (seed, offset);
# reference.gpt_forward(..., dropout=p, seed, step, micro_step) draws the same masks
# (reference.dropout_mask, reference.attention_forward_dropout) in float64.

def _has_attention_dropout_reference():
    return hasattr(reference, "attention_forward_dropout") and hasattr(
        reference, "attention_backward_dropout")


needs_attention_dropout_ref = pytest.mark.skipif(
    not _has_attention_dropout_reference(),
    reason="reference.attention_forward_dropout / attention_backward_dropout not defined yet")


def test_config_dropout_field():
    assert GPTConfig().dropout == 0.0
    c = GPTConfig(**TINY, dropout=0.2)
    assert c.dropout == 0.2 and c.to_dict() == {**TINY, "dropout": 0.2}
    assert GPTConfig.from_dict(c.to_dict()) == c
    assert GPTConfig.from_dict(TINY).dropout == 0.0            # a dict saved before dropout
    assert GPTConfig.preset("default", dropout=0.2).dropout == 0.2
    assert GPTConfig(**TINY, dropout=0).dropout == 0.0 and isinstance(
        GPTConfig(**TINY, dropout=0).dropout, float)
    for bad in (-0.1, 1.0, 1.5, float("nan"), 1 - 1e-9):      # 1 - 1e-9 rounds to 1 in float32
        with pytest.raises(ValueError, match="'dropout' must satisfy 0 <= dropout < 1"):
            GPTConfig(**TINY, dropout=bad)
    for bad in ("0.1", True, None):
        with pytest.raises(ValueError, match="'dropout' must be a number"):
            GPTConfig(**TINY, dropout=bad)
    with pytest.raises(ValueError, match="at most 256 layers"):
        GPTConfig(n_layer=257, n_head=1, n_embd=32, block_size=4, vocab_size=5, dropout=0.1)
    assert GPTConfig(n_layer=257, n_head=1, n_embd=32, block_size=4, vocab_size=5).n_layer == 257


def test_dropout_offsets_are_distinct_and_match_reference():
    from textgpt2.model import (DROP_ATTN, DROP_ATTN_PROJ, DROP_EMBD, DROP_MLP,
                                DROPOUT_MAX_STEP, dropout_offset)
    assert (DROP_ATTN, DROP_ATTN_PROJ, DROP_MLP, DROP_EMBD) == (
        reference.GPT_DROP_ATTN, reference.GPT_DROP_ATTN_PROJ, reference.GPT_DROP_MLP,
        reference.GPT_DROP_EMBD)
    keys = [(s, m, l, site) for s in (0, 1, 7, 123456) for m in (0, 1, 3, 1023)
            for l in (0, 1, 5, 255) for site in range(4)]
    offs = [dropout_offset(*k) for k in keys]
    assert len(set(offs)) == len(offs)
    assert offs == [reference.gpt_dropout_offset(*k) for k in keys]
    assert dropout_offset(DROPOUT_MAX_STEP - 1, 1023, 255, 3) == 2**64 - 1
    for args, match in [((DROPOUT_MAX_STEP, 0, 0, 0), "'step'"), ((0, 1024, 0, 0), "'micro_step'"),
                        ((0, 0, 256, 0), "'layer'"), ((0, 0, 0, 4), "'site'"),
                        ((-1, 0, 0, 0), "'step'")]:
        with pytest.raises(ValueError, match=match):
            dropout_offset(*args)
    with pytest.raises(TypeError, match="'step' must be an integer"):
        dropout_offset(1.0, 0, 0, 0)


def test_reference_gpt_dropout_zero_is_the_plain_model(rng):
    cfg = GPTConfig(**TINY)
    params = reference.gpt_init(cfg, rng)
    idx, targets = _batch(rng, cfg, 2, 5)
    l0, c0 = reference.gpt_forward(params, idx, targets, cfg)
    l1, c1 = reference.gpt_forward(params, idx, targets, cfg, dropout=0.0, seed=3, step=9)
    assert l0 == l1
    g0, g1 = reference.gpt_backward(params, c0, cfg), reference.gpt_backward(params, c1, cfg)
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)


@needs_attention_dropout_ref
def test_reference_gpt_dropout_gradients_by_finite_differences():
    """The masks are fixed by (seed, step), so the loss is a smooth function of the weights."""
    cfg = dict(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11, padded_vocab_size=16)
    r = np.random.default_rng(1)
    params = reference.gpt_init(cfg, r)
    for k in params:
        if k != "wte":
            params[k] = params[k] + 0.05 * r.standard_normal(params[k].shape)
    idx, targets = r.integers(0, 11, (2, 5)), r.integers(0, 11, (2, 5))
    kw = dict(dropout=0.3, seed=5, step=2, micro_step=1)
    loss, cache = reference.gpt_forward(params, idx, targets, cfg, **kw)
    assert loss != reference.gpt_forward(params, idx, targets, cfg)[0]
    grads = reference.gpt_backward(params, cache, cfg)
    eps = 1e-6
    for name, g in grads.items():
        for j in r.choice(g.size, min(4, g.size), replace=False):
            if name == "wte" and j // 8 >= 11:
                continue
            hi = {k: v.copy() for k, v in params.items()}
            lo = {k: v.copy() for k, v in params.items()}
            hi[name].flat[j] += eps
            lo[name].flat[j] -= eps
            fd = (reference.gpt_forward(hi, idx, targets, cfg, **kw)[0]
                  - reference.gpt_forward(lo, idx, targets, cfg, **kw)[0]) / (2 * eps)
            assert abs(fd - g.flat[j]) <= 1e-6 + 1e-4 * abs(fd), (name, j, fd, g.flat[j])


@pytest.mark.gpu
@needs_attention_dropout_ref
@pytest.mark.parametrize("cfg_dict,B,T", REF_CASES[:2])
def test_dropout_loss_and_grads_match_reference(cp, rng, fp32_matmuls, cfg_dict, B, T):
    """Dropout 0.1 at all four sites, masks of (seed 7, step 3, micro-step 1): the loss and every
    gradient within the plain model's tolerances of the reference's."""
    from textgpt2.model import GPT
    cfg = GPTConfig(**cfg_dict, dropout=0.1)
    model = GPT(cfg, seed=7)
    assert model.dropout_seed == 7
    params = _perturbed_params(cfg, rng)
    model.load_state_dict(params)
    idx, targets = _batch(rng, cfg, B, T)
    kw = dict(dropout=0.1, seed=7, step=3, micro_step=1)
    ref_loss, cache = reference.gpt_forward(params, idx, targets, cfg, **kw)
    ref_grads = reference.gpt_backward(params, cache, cfg)
    # the masks matter: without them the gradients are far off
    plain_loss, plain_cache = reference.gpt_forward(params, idx, targets, cfg)
    plain_grads = reference.gpt_backward(params, plain_cache, cfg)
    assert max(rel_err(plain_grads[k], ref_grads[k]) for k in ref_grads) > 0.05

    _poison(model, cp, B, T)
    model.grads.fill(np.nan)
    model.zero_grad()
    loss = model.forward(idx, targets, dropout_step=3, micro_step=1)
    model.backward()
    assert abs(loss - ref_loss) / abs(ref_loss) < 2e-5, (loss, ref_loss, plain_loss)
    grads = _grads(model)
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) < 3e-3, (name, rel_err(grads[name], ref))
    assert not grads["wte"][cfg.vocab_size:].any()

    # evaluation never drops: loss() and a forward without dropout_step give the plain loss
    assert abs(model.loss(idx, targets) - plain_loss) / abs(plain_loss) < 2e-5
    assert abs(model.forward(idx, targets) - plain_loss) / abs(plain_loss) < 2e-5
    logits = model.forward(cp.asarray(idx)).get()[..., :cfg.vocab_size]
    assert rel_err(logits, plain_cache["logits"][..., :cfg.vocab_size]) < 1e-3


@pytest.mark.gpu
def test_dropout_same_key_same_bits_and_eval_ignores_it(cp, rng):
    """The same (seed, step, micro-step) gives identical bits; another step other masks; eval
    passes are bitwise those of the same weights without dropout."""
    from textgpt2.model import GPT
    cfg = GPTConfig(**TINY, dropout=0.1)
    model = GPT(cfg, seed=11)
    plain = GPT(GPTConfig(**TINY), seed=11)
    params = _perturbed_params(cfg, rng)
    model.load_state_dict(params)
    plain.load_state_dict(params)
    idx, targets = _batch(rng, cfg, 2, 8)
    runs = []
    for step in (5, 5, 6):
        model.zero_grad()
        loss = model.forward(idx, targets, dropout_step=step)
        model.backward()
        runs.append((loss, model.grads.get()))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    assert runs[2][0] != runs[0][0] and not np.array_equal(runs[2][1], runs[0][1])
    model.zero_grad()
    loss_micro = model.forward(idx, targets, dropout_step=5, micro_step=1)
    assert loss_micro != runs[0][0]
    # another seed, other masks
    other = GPT(cfg, seed=12)
    other.load_state_dict(params)
    assert other.forward(idx, targets, dropout_step=5) != runs[0][0]
    # evaluation: the same bits as the model without dropout
    assert model.loss(idx, targets) == plain.loss(idx, targets)
    assert np.array_equal(model.logits_last(idx), plain.logits_last(idx))
    model.zero_grad()
    plain.zero_grad()
    assert model.forward(idx, targets) == plain.forward(idx, targets)   # no dropout_step
    model.backward()
    plain.backward()
    assert np.array_equal(model.grads.get(), plain.grads.get())
    with pytest.raises(ValueError, match="dropout_step is for training forwards"):
        model.forward(idx, dropout_step=1)
    with pytest.raises(ValueError, match="'micro_step' must satisfy"):
        model.forward(idx, targets, dropout_step=1, micro_step=1024)
    with pytest.raises(ValueError, match="'dropout_step' must satisfy"):
        model.forward(idx, targets, dropout_step=-1)


@pytest.mark.gpu
def test_dropout_zero_launches_nothing_extra(monkeypatch, rng):
    """p == 0: no dropout kernel and no attention dropout arguments, even in training."""
    from textgpt2 import ops
    from textgpt2.model import GPT
    seen = []

    def refuse(*a, **k):
        raise AssertionError("dropout launched")

    def spy(fn):
        def wrapper(*a, **k):
            seen.append(sorted(k))
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(ops, "dropout_forward", refuse)
    monkeypatch.setattr(ops, "dropout_backward", refuse)
    monkeypatch.setattr(ops, "attention_forward", spy(ops.attention_forward))
    monkeypatch.setattr(ops, "attention_backward", spy(ops.attention_backward))
    cfg = GPTConfig(**TINY)
    model = GPT(cfg)
    idx, targets = _batch(rng, cfg, 2, 8)
    model.zero_grad()
    model.forward(idx, targets, dropout_step=3)
    model.backward()
    assert seen and not any("dropout_p" in k for k in seen)
    # a model with dropout drops nothing in evaluation or generation either
    drop = GPT(GPTConfig(**TINY, dropout=0.2))
    seen.clear()
    drop.loss(idx, targets)
    drop.logits_last(idx)
    assert seen and not any("dropout_p" in k for k in seen)


@pytest.mark.gpu
@pytest.mark.parametrize("use_graph", [False, True])
def test_dropout_training_with_and_without_graphs(cp, rng, use_graph):
    """With use_graph the training passes with dropout run eagerly (their offsets change every
    step; a replayed graph would repeat one step's masks), so graphs change nothing: the
    eager model's losses and weights, and every micro-step's masks differ."""
    from textgpt2.model import GPT
    from textgpt2.optim import AdamW
    cfg = GPTConfig(**TINY, dropout=0.2)
    runs = []
    for graph in (False, use_graph):
        model = GPT(cfg, seed=3, use_graph=graph)
        opt = AdamW(model, lr=1e-3)
        r = np.random.default_rng(5)
        idx, targets = _batch(r, cfg, 2, 8)
        out = []
        for step in range(4):
            model.zero_grad()
            for micro in range(2):
                out.append(model.forward(idx, targets, loss_scale=1 / 32, dropout_step=step,
                                         micro_step=micro))
                model.backward()
            opt.step()
            out.append(model.loss(idx, targets))
        runs.append((out, model.params.get()))
    (a, pa), (b, pb) = runs
    assert rel_err(b, a) < 1e-6 and rel_err(pb, pa) < 1e-6      # (as test_cuda_graph_matches_eager)
    train_losses = [x for i, x in enumerate(a) if i % 3 != 2]
    assert len(set(train_losses)) == len(train_losses)     # every micro-step its own masks
