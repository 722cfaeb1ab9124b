"""GPT-2: the configuration, the parameter layout, and forward + backward as an explicit sequence
of our CUDA kernels (textgpt2.ops) and cuBLAS products (textgpt2.gemm).

Reads like nanoGPT's model.py, with the backward pass written out instead of left to autograd:

    x = drop(wte[idx] + wpe[:T])                             encoder_forward (+ dropout)
    for each block:
        x = x + drop(c_proj(attention(c_attn(ln_1(x)))))     layernorm, matmul + bias, attention
                                                             (dropout on its probabilities),
        x = x + drop(mlp.c_proj(gelu(mlp.c_fc(ln_2(x)))))    matmul + bias, residual, gelu, ...
    logits = ln_f(x) @ wte.T                                 the head is tied to wte
    loss = mean cross-entropy over the B*T positions         fused softmax + loss + dlogits

Memory:
  - every parameter lives in ONE flat float32 CuPy buffer `params` (decayed tensors, i.e. 2-D
    weights and embeddings, first: `n_decay` elements; then biases and layernorm parameters),
    gradients in `grads` with the same layout, so AdamW and the gradient norm are one kernel
    each over the whole model. `param_views` / `grad_views` name the tensors (HF GPT-2 names,
    Linear weights as (out_features, in_features), as reference.py).
  - activations and activation gradients are allocated once, sized for the largest B*T seen,
    and reused: a (B, T) batch uses the first B*T rows of each buffer (contiguous views), so
    generation at growing lengths does not allocate per length.
  - the cross-entropy kernel writes dlogits over the logits in place (a training forward keeps
    only the loss), so the (B*T, Vp) logits exist once.

Gradients ACCUMULATE (+=) into `grads` (gradient accumulation over micro-batches needs nothing
more); `zero_grad()` clears them. The loss gradient's scale is 1/(B*T) (the mean over the
micro-batch) unless forward() is given `loss_scale` (e.g. 1/(B*T*accum_steps)).

Nothing in forward/backward waits for the GPU except reading the loss as a Python float
(forward(..., sync=True), the default, as the contract's float return asks). With
`use_graph=True` forward and backward are each captured once per shape into a CUDA graph
(CuPy stream capture) and replayed: a GPT-2 step is several hundred launches, and a replay
costs one.

Dropout (config.dropout = p > 0) applies only in a TRAINING forward: one given targets and a
`dropout_step`. Evaluation (loss(), a forward without dropout_step), logits and generation never
drop. The masks are not stored: every site draws Philox numbers keyed by (seed, offset) with
seed = the model's `dropout_seed` (the run's seed) and offset = dropout_offset(step, micro_step,
layer, site), so backward() regenerates the same masks, a run is reproducible and a resumed run
draws the masks the uninterrupted one would have. Dropout offsets are kernel arguments, so a
training pass with dropout runs eagerly even with use_graph=True (a captured graph would replay
one step's masks forever); evaluation and inference still replay their graphs.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import SimpleNamespace

import numpy as np

from textgpt2 import gemm, ops
from textgpt2.device import require_gpu
from textgpt2.reference import param_shapes  # the one definition of the parameter layout

# The attention kernel is specialised for these head sizes.
SUPPORTED_HEAD_DIMS = (32, 64, 128)
VOCAB_PAD = 128            # wte rows and logits columns are padded to a multiple of this
_ALIGN = 64                # each tensor in the flat buffers starts at a multiple of 64 floats
                           # (256 bytes): vectorised kernels and cuBLAS like aligned pointers

# Dropout sites. Every (step, micro-step, layer, site) gets its own 64-bit Philox offset, so no
# two masks of a run share random numbers; the embedding's site lives in layer slot 0.
DROP_ATTN, DROP_ATTN_PROJ, DROP_MLP, DROP_EMBD = 0, 1, 2, 3
DROPOUT_MICRO_STEPS = 1024     # micro-steps (gradient accumulation) per step with dropout
DROPOUT_LAYERS = 256           # layers a model with dropout may have
DROPOUT_MAX_STEP = 2**64 // (DROPOUT_MICRO_STEPS * DROPOUT_LAYERS * 4)     # 2**44


def _index(where, name, value, hi):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: '{name}' must be an integer, got {type(value).__name__}")
    if not 0 <= int(value) < hi:
        raise ValueError(f"{where}: '{name}' must satisfy 0 <= {name} < {hi}, got {value!r}")
    return int(value)


def dropout_offset(step: int, micro_step: int, layer: int, site: int) -> int:
    """The Philox offset of one dropout mask: ((step * 1024 + micro_step) * 256 + layer) * 4
    + site, distinct for every step < 2**44, micro_step < 1024, layer < 256, site < 4
    (reference.gpt_dropout_offset is the same formula, written independently)."""
    step = _index("dropout_offset", "step", step, DROPOUT_MAX_STEP)
    micro_step = _index("dropout_offset", "micro_step", micro_step, DROPOUT_MICRO_STEPS)
    layer = _index("dropout_offset", "layer", layer, DROPOUT_LAYERS)
    site = _index("dropout_offset", "site", site, 4)
    return ((step * DROPOUT_MICRO_STEPS + micro_step) * DROPOUT_LAYERS + layer) * 4 + site


# ---- configuration -----------------------------------------------------------------------

PRESETS = {
    # a byte-level model that trains well in minutes on one GPU
    "default": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256),
    # GPT-2 small (124M)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


@dataclasses.dataclass
class GPTConfig:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256       # context length: rows of the position embedding
    vocab_size: int = 256       # real tokens (256 = bytes); wte is padded to padded_vocab_size
    dropout: float = 0.0        # drop probability in training (0 <= p < 1): on the embedding
                                # sum, the attention probabilities, the attention and MLP outputs

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError (naming the field and value) unless this config can be built."""
        for f in dataclasses.fields(self):
            if f.name == "dropout":
                continue
            v = getattr(self, f.name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig: '{f.name}' must be a positive integer, got {v!r}")
            setattr(self, f.name, int(v))
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head})")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            ok = ", ".join(map(str, SUPPORTED_HEAD_DIMS))
            raise ValueError(f"GPTConfig: head size n_embd/n_head = {self.n_embd}/{self.n_head} "
                             f"= {self.head_dim} is not supported by the attention kernel "
                             f"(supported: {ok})")
        if self.padded_vocab_size >= 2**31 or self.block_size >= 2**31:
            raise ValueError("GPTConfig: vocab_size and block_size must be below 2**31")
        p = self.dropout
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise ValueError(f"GPTConfig: 'dropout' must be a number in [0, 1), got {p!r}")
        # the kernels take p as a float32: it must stay below 1 after that rounding too
        if not (0 <= p < 1 and float(np.float32(p)) < 1.0):
            raise ValueError(f"GPTConfig: 'dropout' must satisfy 0 <= dropout < 1, got {p!r}")
        self.dropout = float(p)
        if self.dropout > 0 and self.n_layer > DROPOUT_LAYERS:
            raise ValueError(f"GPTConfig: dropout supports at most {DROPOUT_LAYERS} layers "
                             f"(n_layer {self.n_layer}): each layer's masks need their own "
                             "Philox offsets")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of 128 (wte rows, logits columns)."""
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """GPTConfig.preset("default" | "gpt2", n_layer=..., ...): a preset with overrides
        (None values are ignored, so CLI options can be passed straight through)."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig: unknown preset {name!r}; choose one of "
                             f"{', '.join(repr(k) for k in PRESETS)}")
        d = dict(PRESETS[name])
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"GPTConfig.preset: unknown field(s) {', '.join(unknown)}")
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "GPTConfig":
        """Inverse of to_dict. A 'padded_vocab_size' key is accepted if it agrees; any other
        unknown key is an error (a typo would otherwise silently build another model). A
        missing 'dropout' (dicts saved before it existed) means 0."""
        if not isinstance(d, Mapping):
            raise TypeError(f"GPTConfig.from_dict: expected a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in d if k not in names and k != "padded_vocab_size")
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown key(s) {', '.join(unknown)}; "
                             f"expected {', '.join(names)}")
        optional = {"dropout": 0.0}
        missing = [k for k in names if k not in d and k not in optional]
        if missing:
            raise ValueError(f"GPTConfig.from_dict: missing key(s) {', '.join(missing)}")
        cfg = cls(**{k: d.get(k, optional.get(k)) for k in names})
        if "padded_vocab_size" in d and d["padded_vocab_size"] != cfg.padded_vocab_size:
            raise ValueError(f"GPTConfig.from_dict: padded_vocab_size {d['padded_vocab_size']!r} "
                             f"does not match vocab_size {cfg.vocab_size} (expected "
                             f"{cfg.padded_vocab_size})")
        return cfg

    # -- parameter inventory (host only, so sizes and FLOPs are known without a GPU) --

    def param_shapes(self) -> dict:
        """{name: shape} of every parameter (reference.param_shapes)."""
        return param_shapes(self.n_layer, self.n_embd, self.block_size, self.padded_vocab_size)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. non_embedding=True leaves out the position embedding, as nanoGPT
        does (wte stays in: it is also the output head). wte counts its padded rows: they are
        stored and multiplied in the head, which is what the FLOP count is about."""
        n = sum(math.prod(s) for s in self.param_shapes().values())
        if non_embedding:
            n -= self.block_size * self.n_embd
        return n

    def flops_per_token(self, T: int | None = None) -> int:
        """Training FLOPs per token, nanoGPT/PaLM count: 6 N + 12 L H Q T with N =
        num_params(non_embedding=True), Q the head size and T the sequence length (default
        block_size)."""
        T = self.block_size if T is None else int(T)
        return 6 * self.num_params(True) + 12 * self.n_layer * self.n_head * self.head_dim * T


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def param_layout(config: GPTConfig):
    """({name: (offset, shape)}, n_decay, total) for the flat buffers: 2-D tensors (weights and
    embeddings, which get weight decay) first, then the 1-D ones, each at an aligned offset.
    Alignment gaps hold zeros forever (zero gradient, zero moment: AdamW leaves them at 0)."""
    shapes = config.param_shapes()
    layout, off = {}, 0
    for decayed in (True, False):
        for name, shape in shapes.items():
            if (len(shape) == 2) == decayed:
                layout[name] = (off, shape)
                off = _aligned(off + math.prod(shape))
        if decayed:
            n_decay = off
    return {name: layout[name] for name in shapes}, n_decay, off


def init_params(config: GPTConfig, seed: int = 0) -> dict:
    """GPT-2 / nanoGPT initial values as float32 NumPy arrays, {name: array}: weights and
    embeddings N(0, 0.02), the residual projections (attn.c_proj and mlp.c_proj weights)
    N(0, 0.02/sqrt(2 n_layer)), biases 0, layernorm weights 1, wte rows >= vocab_size 0.
    Drawn in param_shapes() order with rng.normal(0, std, shape) from
    np.random.default_rng(seed), exactly as reference.gpt_init does with that generator, so
    both start from the same numbers (up to float32 rounding)."""
    rng = np.random.default_rng(seed)
    std_proj = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in config.param_shapes().items():
        if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            a = np.ones(shape)
        elif name.endswith(".bias"):
            a = np.zeros(shape)
        elif name.endswith("c_proj.weight"):
            a = rng.normal(0.0, std_proj, shape)
        else:
            a = rng.normal(0.0, 0.02, shape)
        params[name] = a.astype(np.float32)
    params["wte"][config.vocab_size:] = 0.0
    return params


class _Dropout:
    """The dropout of one training micro-step: (p, seed, offset) per site. False (and no
    attention keywords) when nothing drops, so a p == 0 model launches nothing extra."""

    def __init__(self, p=0.0, seed=0, step=0, micro_step=0):
        self.p, self.seed, self.step, self.micro_step = p, seed, step, micro_step

    def __bool__(self):
        return self.p > 0

    def site(self, layer, site):
        """(p, seed, offset) for ops.dropout_forward / dropout_backward."""
        return self.p, self.seed, dropout_offset(self.step, self.micro_step, layer, site)

    def attention(self, layer):
        """Keyword arguments of ops.attention_forward / attention_backward."""
        if not self:
            return {}
        p, seed, offset = self.site(layer, DROP_ATTN)
        return {"dropout_p": p, "seed": seed, "offset": offset}


_NO_DROPOUT = _Dropout()


# ---- the model ---------------------------------------------------------------------------

class GPT:
    """GPT-2 on the GPU. See the module docstring for the memory layout and conventions.

    GPT(config, seed=0, use_graph=False)     seed: initial weights and the dropout masks
      forward(idx, targets=None, *, loss_scale=None, sync=True, dropout_step=None, micro_step=0)
      backward()
      zero_grad()
      loss(idx_np, targets_np) -> float;  logits_last(idx) -> np.ndarray (B, vocab_size)
      state_dict() / load_state_dict(d);  num_params(); flops_per_token(T)
    """

    def __init__(self, config: GPTConfig, seed: int = 0, use_graph: bool = False):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        config.validate()
        self.cp = cp = require_gpu("textgpt2.GPT")
        self.config = config
        self.use_graph = bool(use_graph)
        self.dropout_seed = int(seed)     # the Philox key of every dropout mask (0 <= seed < 2**64)

        layout, self.n_decay, n_total = param_layout(config)
        self.params = cp.zeros(n_total, dtype=np.float32)
        self.grads = cp.zeros(n_total, dtype=np.float32)
        self.param_views, self.grad_views = {}, {}
        for name, (off, shape) in layout.items():
            n = math.prod(shape)
            self.param_views[name] = self.params[off:off + n].reshape(shape)
            self.grad_views[name] = self.grads[off:off + n].reshape(shape)
        self._layout = layout

        host = np.zeros(n_total, dtype=np.float32)
        for name, a in init_params(config, seed).items():
            off, shape = layout[name]
            host[off:off + a.size] = a.reshape(-1)
        self.params.set(host)

        self._cap = 0           # rows (B*T) the activation buffers hold
        self._store = None      # flat activation storage (forward)
        self._gstore = None     # flat activation-gradient storage (backward), made lazily
        self._views = {}        # (B, T) -> SimpleNamespace of views into _store / _gstore
        self._pending = None    # (B, T, _Dropout) of a training forward awaiting its backward
        self._graphs = {}       # key -> cupy.cuda.Graph
        self._warm = set()      # keys run once eagerly on the capture stream
        self._capture_stream = None
        self._graph_pool = None

    # -- sizes --

    def num_params(self, non_embedding: bool = True) -> int:
        return self.config.num_params(non_embedding)

    def flops_per_token(self, T: int | None = None) -> int:
        return self.config.flops_per_token(T)

    def __repr__(self):
        c = self.config
        return (f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"block_size={c.block_size}, vocab_size={c.vocab_size}; "
                f"{self.num_params() / 1e6:.2f}M parameters)")

    # -- activation buffers --

    def _row_sizes(self):
        """Elements per token row of every forward buffer: (name, per-row, per-layer?, dtype)."""
        c = self.config
        C, H, Vp = c.n_embd, c.n_head, c.padded_vocab_size
        f32, i32 = np.float32, np.int32
        return [
            ("idx", 1, False, i32), ("targets", 1, False, i32),
            ("encoded", C, False, f32),
            # per block: what its backward reads
            ("ln1", C, True, f32), ("ln1_mean", 1, True, f32), ("ln1_rstd", 1, True, f32),
            ("qkv", 3 * C, True, f32), ("att", C, True, f32), ("att_lse", H, True, f32),
            ("res2", C, True, f32),            # x + attention branch
            ("ln2", C, True, f32), ("ln2_mean", 1, True, f32), ("ln2_rstd", 1, True, f32),
            ("fc", 4 * C, True, f32), ("fc_gelu", 4 * C, True, f32),
            ("res3", C, True, f32),            # res2 + MLP branch: the block's output
            ("lnf", C, False, f32), ("lnf_mean", 1, False, f32), ("lnf_rstd", 1, False, f32),
            ("logits", Vp, False, f32),        # dlogits overwrite these in a training forward
            ("losses", 1, False, f32),
        ]

    def _grad_row_sizes(self):
        C = self.config.n_embd
        # dres: the gradient flowing down the residual stream; dbuf: the gradient of a
        # layernorm output / attention output; dtmp: a layernorm's dx before it joins dres;
        # dbig: dqkv (3C) or d(fc) (4C), never live at the same time.
        return [("dres", C), ("dbuf", C), ("dtmp", C), ("dbig", 4 * C)]

    def _ensure_capacity(self, N):
        if N <= self._cap:
            return
        cp, L = self.cp, self.config.n_layer
        # Growing moves every buffer: drop the views and the graphs that captured addresses.
        self._views.clear()
        self._graphs.clear()
        self._warm.clear()
        self._store = self._gstore = None
        self.cp.get_default_memory_pool().free_all_blocks()
        self._store = {}
        for name, k, per_layer, dtype in self._row_sizes():
            # per-layer rows padded so every layer's slice starts 256-byte aligned (the
            # attention kernels move float4s; cuBLAS prefers aligned operands)
            shape = (L, _aligned(N * k)) if per_layer else (N * k,)
            self._store[name] = cp.empty(shape, dtype=dtype)
        self._loss = cp.zeros((), dtype=np.float32)     # mean loss of the last forward
        self._cap = N

    def _ensure_grad_storage(self):
        if self._gstore is None:
            cp = self.cp
            self._gstore = {name: cp.empty(self._cap * k, dtype=np.float32)
                            for name, k in self._grad_row_sizes()}

    def _acts(self, B, T):
        """Views for a (B, T) batch: row-major (B*T, ...) 2-D views for the row-wise ops and
        cuBLAS, (B, T, ...) views where the op wants the batch shape."""
        key = (B, T)
        v = self._views.get(key)
        if v is not None:
            return v
        self._ensure_capacity(B * T)
        c = self.config
        N, C, H = B * T, c.n_embd, c.n_head
        s = self._store

        def take(flat, *shape):
            return flat[:math.prod(shape)].reshape(shape)

        layers = []
        for l in range(c.n_layer):
            la = SimpleNamespace(
                ln1=take(s["ln1"][l], N, C), ln1_mean=take(s["ln1_mean"][l], N),
                ln1_rstd=take(s["ln1_rstd"][l], N),
                qkv=take(s["qkv"][l], N, 3 * C), att=take(s["att"][l], N, C),
                att_lse=take(s["att_lse"][l], B, H, T),
                res2=take(s["res2"][l], N, C),
                ln2=take(s["ln2"][l], N, C), ln2_mean=take(s["ln2_mean"][l], N),
                ln2_rstd=take(s["ln2_rstd"][l], N),
                fc=take(s["fc"][l], N, 4 * C), fc_gelu=take(s["fc_gelu"][l], N, 4 * C),
                res3=take(s["res3"][l], N, C))
            la.qkv3 = la.qkv.reshape(B, T, 3 * C)
            la.att3 = la.att.reshape(B, T, C)
            layers.append(la)
        v = SimpleNamespace(
            B=B, T=T, N=N,
            idx=take(s["idx"], B, T), targets=take(s["targets"], B, T),
            encoded=take(s["encoded"], N, C), layers=layers,
            lnf=take(s["lnf"], N, C), lnf_mean=take(s["lnf_mean"], N),
            lnf_rstd=take(s["lnf_rstd"], N),
            logits=take(s["logits"], N, c.padded_vocab_size),
            losses=take(s["losses"], N), loss=self._loss, grad=None, plan=None, planned=False)
        self._views[key] = v
        return v

    def _grad_bufs(self, v):
        if v.grad is None:
            self._ensure_grad_storage()
            g, N, C = self._gstore, v.N, self.config.n_embd
            v.grad = SimpleNamespace(
                dres=g["dres"][:N * C].reshape(N, C), dbuf=g["dbuf"][:N * C].reshape(N, C),
                dtmp=g["dtmp"][:N * C].reshape(N, C),
                dfc=g["dbig"][:N * 4 * C].reshape(N, 4 * C),
                dqkv=g["dbig"][:N * 3 * C].reshape(N, 3 * C))
            v.grad.dbuf3 = v.grad.dbuf.reshape(v.B, v.T, C)
            v.grad.dqkv3 = v.grad.dqkv.reshape(v.B, v.T, 3 * C)
        return v.grad

    # -- inputs --

    def _tokens(self, a, name, shape=None):
        """Check token ids / targets: a 2-D integer NumPy or CuPy array. NumPy inputs are
        range-checked on the host (a bad id would otherwise become a NaN loss); CuPy inputs
        are not (that would need a sync), and the kernels turn a bad id into NaN."""
        cp, c = self.cp, self.config
        if not isinstance(a, (np.ndarray, cp.ndarray)):
            raise TypeError(f"GPT: '{name}' must be a NumPy or CuPy integer array, got "
                            f"{type(a).__name__}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"GPT: '{name}' must hold integers, got dtype {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"GPT: '{name}' must have shape (B, T), got {a.shape}")
        B, T = a.shape
        if B < 1 or T < 1:
            raise ValueError(f"GPT: '{name}' is empty (shape {a.shape})")
        if T > c.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds the model's context "
                             f"(block_size {c.block_size})")
        if shape is not None and a.shape != shape:
            raise ValueError(f"GPT: '{name}' has shape {a.shape}, expected {shape} (as idx)")
        if isinstance(a, np.ndarray) and a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"GPT: '{name}' must lie in [0, {c.vocab_size}), got values "
                                 f"in [{lo}, {hi}]")
        return a

    def _load_tokens(self, dst, a):
        if isinstance(a, np.ndarray):
            # an async copy on the current stream (from pageable memory it returns once the
            # host data is staged), so it is ordered after the work still reading dst
            dst.set(np.ascontiguousarray(a, dtype=np.int32),
                    stream=self.cp.cuda.get_current_stream())
        else:
            self.cp.copyto(dst, a, casting="unsafe")

    def _plan_ids(self, v, idx):
        """Group the ids of a batch that may be backpropagated for encoder_backward, on the host
        (as llm.c does; 0.15-0.3 ms of CPU for 16 x 1024 ids), so that its backward is one kernel
        that never waits for a grouping. Called once the forward is queued, so the host works
        while the GPU runs the forward; the copy is queued behind it (from pageable memory it
        may wait for the stream to get there, as the loss read does anyway). Ids already on
        the GPU are grouped there by the backward itself (bringing them back would cost a sync);
        both give the same bits."""
        v.planned = isinstance(idx, np.ndarray)
        if v.planned:
            v.plan = ops.encoder_backward_plan(idx, self.config.n_embd,
                                               self.config.padded_vocab_size, out=v.plan,
                                               stream=self.cp.cuda.get_current_stream())

    # -- forward --

    def forward(self, idx, targets=None, *, loss_scale=None, sync=True, dropout_step=None,
                micro_step=0):
        """Run the model on idx (B, T) token ids (NumPy or CuPy integers, T <= block_size).

        Without targets: returns the logits, a (B, T, Vp) CuPy view of an internal buffer that
        the next forward overwrites (columns >= vocab_size are padding).
        With targets (B, T): computes the per-position cross-entropy and, in the same kernel,
        dlogits = loss_scale * d(sum of losses)/dlogits (loss_scale default 1/(B*T), i.e. the
        gradient of the mean; pass 1/(B*T*accum) for gradient accumulation) over the logits,
        ready for backward(). Returns the mean loss: a Python float if sync (waits for the
        GPU), else a 0-d float32 CuPy array (overwritten by the next forward).

        Training vs evaluation: with targets AND dropout_step (the optimizer step, an int >= 0)
        this is a training forward, which applies config.dropout with the masks of
        (dropout_seed, dropout_step, micro_step) (micro_step: the micro-batch within the step,
        0 <= micro_step < 1024); backward() reuses them. Without dropout_step nothing drops."""
        idx = self._tokens(idx, "idx")
        B, T = idx.shape
        drop = _NO_DROPOUT
        if dropout_step is not None:
            if targets is None:
                raise ValueError("GPT.forward: dropout_step is for training forwards; give "
                                 "targets too (a forward without targets never drops)")
            step = _index("GPT.forward", "dropout_step", dropout_step, DROPOUT_MAX_STEP)
            micro = _index("GPT.forward", "micro_step", micro_step, DROPOUT_MICRO_STEPS)
            if self.config.dropout > 0:
                drop = _Dropout(self.config.dropout, self.dropout_seed, step, micro)
        if targets is not None:
            targets = self._tokens(targets, "targets", shape=(B, T))
            scale = 1.0 / (B * T) if loss_scale is None else ops._real(
                "GPT.forward", "loss_scale", loss_scale, low=0.0, low_open=True)
        v = self._acts(B, T)
        self._load_tokens(v.idx, idx)
        if targets is not None:
            self._load_tokens(v.targets, targets)
            # a training pass with dropout runs eagerly: its offsets change every step
            self._run(("forward", B, T, scale), lambda: self._forward(v, scale, drop),
                      graph=not drop)
            self._plan_ids(v, idx)      # on the host while the GPU runs the forward
            self._pending = (B, T, drop)
            return float(v.loss.get()) if sync else v.loss
        self._run(("forward", B, T, None), lambda: self._forward(v, None, _NO_DROPOUT))
        self._pending = None        # the activations now belong to an inference pass
        return v.logits.reshape(B, T, self.config.padded_vocab_size)

    def _forward(self, v, dloss_scale, drop):
        c, p = self.config, self.param_views
        H, V = c.n_head, c.vocab_size
        ops.encoder_forward(v.idx, p["wte"], p["wpe"], out=v.encoded.reshape(v.B, v.T, -1))
        if drop:                                        # x = dropout(wte[idx] + wpe[:T])
            ops.dropout_forward(v.encoded, *drop.site(0, DROP_EMBD), out=v.encoded)
        x = v.encoded                                   # the residual stream, (N, C)
        for l, a in enumerate(v.layers):
            h = f"h.{l}."
            # attention branch: x + dropout(c_proj(attention(c_attn(ln_1(x)))))
            ops.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"],
                                  out=a.ln1, mean=a.ln1_mean, rstd=a.ln1_rstd)
            gemm.matmul_forward(a.ln1, p[h + "attn.c_attn.weight"], out=a.qkv)
            ops.bias_forward(a.qkv, p[h + "attn.c_attn.bias"], out=a.qkv)
            ops.attention_forward(a.qkv3, H, out=a.att3, lse=a.att_lse,
                                  **drop.attention(l))   # dropout on the probabilities
            gemm.matmul_forward(a.att, p[h + "attn.c_proj.weight"], out=a.res2)
            ops.bias_forward(a.res2, p[h + "attn.c_proj.bias"], out=a.res2)
            if drop:
                ops.dropout_forward(a.res2, *drop.site(l, DROP_ATTN_PROJ), out=a.res2)
            ops.residual_forward(a.res2, x, out=a.res2)
            # MLP branch: res2 + dropout(mlp.c_proj(gelu(mlp.c_fc(ln_2(res2)))))
            ops.layernorm_forward(a.res2, p[h + "ln_2.weight"], p[h + "ln_2.bias"],
                                  out=a.ln2, mean=a.ln2_mean, rstd=a.ln2_rstd)
            gemm.matmul_forward(a.ln2, p[h + "mlp.c_fc.weight"], out=a.fc)
            ops.bias_forward(a.fc, p[h + "mlp.c_fc.bias"], out=a.fc)
            ops.gelu_forward(a.fc, out=a.fc_gelu)
            gemm.matmul_forward(a.fc_gelu, p[h + "mlp.c_proj.weight"], out=a.res3)
            ops.bias_forward(a.res3, p[h + "mlp.c_proj.bias"], out=a.res3)
            if drop:
                ops.dropout_forward(a.res3, *drop.site(l, DROP_MLP), out=a.res3)
            ops.residual_forward(a.res3, a.res2, out=a.res3)
            x = a.res3
        ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"],
                              out=v.lnf, mean=v.lnf_mean, rstd=v.lnf_rstd)
        gemm.matmul_forward(v.lnf, p["wte"], out=v.logits)     # tied head: (N, Vp)
        if dloss_scale is not None:
            ops.cross_entropy_forward_backward(v.logits, v.targets.reshape(-1), V,
                                               losses=v.losses, dlogits=v.logits,
                                               dloss_scale=dloss_scale)
            self.cp.mean(v.losses, out=v.loss)

    # -- backward --

    def backward(self):
        """Backpropagate the last training forward (the one given targets) and ADD the
        parameter gradients into `grads`. Each forward with targets allows one backward."""
        if self._pending is None:
            raise RuntimeError("GPT.backward: no training forward to backpropagate; call "
                               "forward(idx, targets) first (once per backward)")
        B, T, drop = self._pending
        v = self._acts(B, T)
        self._grad_bufs(v)
        self._run(("backward", B, T, v.planned), lambda: self._backward(v, drop),
                  graph=not drop)
        self._pending = None

    def _backward(self, v, drop):
        c, p, g, d = self.config, self.param_views, self.grad_views, v.grad
        H = c.n_head
        # lm head (tied): logits = lnf @ wte.T; v.logits holds dlogits now
        gemm.matmul_backward_input(v.logits, p["wte"], dx=d.dbuf)
        gemm.matmul_backward_weight(v.logits, v.lnf, g["wte"])
        x_last = v.layers[-1].res3 if v.layers else v.encoded
        ops.layernorm_backward(d.dbuf, x_last, p["ln_f.weight"], v.lnf_mean, v.lnf_rstd,
                               dx=d.dres, dweight=g["ln_f.weight"], dbias=g["ln_f.bias"])
        # d.dres is now dL/dx at the top of the residual stream; walk the blocks down.
        for l in reversed(range(c.n_layer)):
            a, h = v.layers[l], f"h.{l}."
            x_in = v.layers[l - 1].res3 if l > 0 else v.encoded
            # MLP branch: res3 = res2 + dropout(c_proj(gelu(c_fc(ln_2(res2))))); d.dres
            # passes unchanged to res2 and, through the dropout's mask, into the branch (dy).
            dy = d.dres
            if drop:
                dy = ops.dropout_backward(d.dres, *drop.site(l, DROP_MLP), dx=d.dtmp)
            ops.bias_backward(dy, g[h + "mlp.c_proj.bias"])
            gemm.matmul_backward_weight(dy, a.fc_gelu, g[h + "mlp.c_proj.weight"])
            gemm.matmul_backward_input(dy, p[h + "mlp.c_proj.weight"], dx=d.dfc)
            ops.gelu_backward(d.dfc, a.fc, dx=d.dfc)
            ops.bias_backward(d.dfc, g[h + "mlp.c_fc.bias"])
            gemm.matmul_backward_weight(d.dfc, a.ln2, g[h + "mlp.c_fc.weight"])
            gemm.matmul_backward_input(d.dfc, p[h + "mlp.c_fc.weight"], dx=d.dbuf)
            ops.layernorm_backward(d.dbuf, a.res2, p[h + "ln_2.weight"], a.ln2_mean,
                                   a.ln2_rstd, dx=d.dtmp, dweight=g[h + "ln_2.weight"],
                                   dbias=g[h + "ln_2.bias"])
            ops.residual_forward(d.dres, d.dtmp, out=d.dres)        # d.dres = dL/d res2
            # attention branch: res2 = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
            dy = d.dres
            if drop:
                dy = ops.dropout_backward(d.dres, *drop.site(l, DROP_ATTN_PROJ), dx=d.dtmp)
            ops.bias_backward(dy, g[h + "attn.c_proj.bias"])
            gemm.matmul_backward_weight(dy, a.att, g[h + "attn.c_proj.weight"])
            gemm.matmul_backward_input(dy, p[h + "attn.c_proj.weight"], dx=d.dbuf)
            ops.attention_backward(d.dbuf3, a.qkv3, a.att3, a.att_lse, H, dqkv=d.dqkv3,
                                   **drop.attention(l))  # the same probability masks
            ops.bias_backward(d.dqkv, g[h + "attn.c_attn.bias"])
            gemm.matmul_backward_weight(d.dqkv, a.ln1, g[h + "attn.c_attn.weight"])
            gemm.matmul_backward_input(d.dqkv, p[h + "attn.c_attn.weight"], dx=d.dbuf)
            ops.layernorm_backward(d.dbuf, x_in, p[h + "ln_1.weight"], a.ln1_mean, a.ln1_rstd,
                                   dx=d.dtmp, dweight=g[h + "ln_1.weight"],
                                   dbias=g[h + "ln_1.bias"])
            ops.residual_forward(d.dres, d.dtmp, out=d.dres)        # d.dres = dL/d x_in
        if drop:                        # x = dropout(wte[idx] + wpe[:T])
            ops.dropout_backward(d.dres, *drop.site(0, DROP_EMBD), dx=d.dres)
        plan = v.plan if v.planned else None    # the ids grouped on the host (_plan_ids)
        idx = plan.idx if plan else v.idx
        ops.encoder_backward(d.dres.reshape(v.B, v.T, -1), idx, g["wte"], g["wpe"], plan=plan)

    def zero_grad(self):
        self.grads.fill(0)

    # -- CUDA graphs --

    def _run(self, key, fn, graph=True):
        """fn() eagerly, or (use_graph, and graph) through a CUDA graph captured for this key.

        Per key: the first call runs fn eagerly on the capture stream with a private memory
        pool (compiling CuPy kernels, creating cuBLAS state and filling the pool with the
        scratch blocks the ops allocate); the second captures fn and replays the graph; later
        calls only replay. Scratch allocated during capture comes from the private pool, which
        nothing outside the captures allocates from, so the addresses baked into a graph are
        never handed to other arrays. Graphs replay on the current stream, so they are ordered
        with the input copies before them and the optimizer after them."""
        if not (self.use_graph and graph):
            fn()
            return
        cp = self.cp
        cur = cp.cuda.get_current_stream()
        key = key + (gemm.get_math(),)          # the matmul precision is baked into a graph
        graph = self._graphs.get(key)
        if graph is None:
            if self._capture_stream is None:
                self._capture_stream = cp.cuda.Stream(non_blocking=True)
                self._graph_pool = cp.cuda.MemoryPool()
            side = self._capture_stream
            side.wait_event(cur.record())
            with cp.cuda.using_allocator(self._graph_pool.malloc), side:
                if key not in self._warm:
                    fn()
                    self._warm.add(key)
                else:
                    side.begin_capture()
                    try:
                        fn()
                    except BaseException as e:
                        try:
                            side.end_capture()
                        except Exception:
                            pass
                        raise RuntimeError(f"GPT: capturing the CUDA graph for {key} failed "
                                           f"({type(e).__name__}: {e}); use_graph=False runs "
                                           "the same work eagerly") from e
                    graph = side.end_capture()
            if graph is None:                   # warm-up ran the work itself
                cur.wait_event(side.record())
                return
            self._graphs[key] = graph
        graph.launch(stream=cur)

    def reset_graphs(self):
        """Forget the captured graphs (they hold no memory of their own beyond the pool)."""
        self._graphs.clear()
        self._warm.clear()

    # -- conveniences for scripts and generation --

    def loss(self, idx, targets) -> float:
        """Mean cross-entropy of targets given idx (NumPy int arrays (B, T)), as a float.
        Does not touch the gradients (the dlogits it computes are simply not used)."""
        loss = self.forward(idx, targets)
        self._pending = None
        return loss

    def logits_last(self, idx):
        """Logits at the last position of each row: a float32 NumPy array (B, vocab_size).
        idx: (B, T) or (T,) token ids (NumPy or CuPy), T <= block_size."""
        if getattr(idx, "ndim", None) == 1:
            idx = idx.reshape(1, -1)
        logits = self.forward(idx)
        return logits[:, -1, :self.config.vocab_size].copy().get()   # copy: contiguous

    # -- weights --

    def state_dict(self) -> dict:
        """{name: float32 NumPy array} with the internal names and shapes (wte keeps its
        padded rows; Linear weights are (out_features, in_features))."""
        return {name: view.get() for name, view in self.param_views.items()}

    def load_state_dict(self, state: Mapping):
        """Copy weights in. Every name of state_dict() must be present with its shape (wte
        may also come unpadded, (vocab_size, C): the padded rows are then zeroed) and no other
        name; everything is checked before anything is written."""
        if not isinstance(state, Mapping):
            raise TypeError(f"GPT.load_state_dict: expected a dict, got {type(state).__name__}")
        c = self.config
        missing = [k for k in self.param_views if k not in state]
        unexpected = [str(k) for k in state if k not in self.param_views]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:5])}" + (", ..." if len(missing) > 5 else ""))
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:5])}"
                             + (", ..." if len(unexpected) > 5 else ""))
            raise ValueError(f"GPT.load_state_dict: keys do not match the model ({'; '.join(parts)})")
        arrays = {}
        for name, view in self.param_views.items():
            a = state[name]
            if not isinstance(a, np.ndarray) and hasattr(a, "get"):
                a = a.get()
            a = np.asarray(a)
            if a.dtype.kind != "f":
                raise TypeError(f"GPT.load_state_dict: '{name}' must be floating point, got "
                                f"dtype {a.dtype}")
            if name == "wte" and a.shape == (c.vocab_size, c.n_embd):
                a = np.concatenate([a, np.zeros((c.padded_vocab_size - c.vocab_size, c.n_embd),
                                                a.dtype)])
            if a.shape != view.shape:
                raise ValueError(f"GPT.load_state_dict: '{name}' has shape {a.shape}, expected "
                                 f"{view.shape}")
            arrays[name] = np.ascontiguousarray(a, dtype=np.float32)
        for name, a in arrays.items():
            self.param_views[name].set(a)

    @classmethod
    def load(cls, path, use_graph: bool = False) -> "GPT":
        """The model saved in a checkpoint directory (textgpt2.checkpoint reads and checks it
        on the host first, so a bad directory fails before the GPU is touched)."""
        from textgpt2 import checkpoint
        ckpt = checkpoint.load(path, training_state=False)
        model = cls(GPTConfig.from_dict(ckpt.model_config), use_graph=use_graph)
        model.load_state_dict(ckpt.params)
        return model
