"""Training quality on a small corpus: textgpt2 beside a PyTorch twin of the same model, trained
with the same recipe on the same batches in one run on one GPU (issue 6).

The recipe is nanoGPT's shakespeare_char (textgpt2.train --model small-corpus): 6 layers,
6 heads, 384 wide, context 256, byte tokens (vocabulary 256), batch 64, 5000 steps, lr 1e-3
with 100 warmup steps and cosine decay to 1e-4 (textgpt2.optim.lr_schedule for both), AdamW
betas 0.9/0.99, eps 1e-8, weight decay 0.1 on 2-D weights and embeddings only, gradient norm
clipped to 1.0, dropout 0.2 on the embedding sum, the attention probabilities and the attention
and MLP outputs before each residual add. Matmuls in TF32 on both sides.

Corpus: ../shared/data/eltec_sample.txt (2.5 MB of English novels) as bytes; the last 10% is
validation. Batches: the training windows' start indices are drawn once, for every step, from
one NumPy generator (seed --seed) and fed to both models, nanoGPT-style (x = data[i:i+T],
y = data[i+1:i+1+T]); evaluation averages the loss over --eval-iters fixed validation batches
(the same ones at every evaluation and for both models), with dropout off.

The twin: torch.nn modules of the same architecture (tied, unpadded 256-row embedding head,
pre-LN blocks, tanh GELU), starting from textgpt2's initial weights (GPT-2 init, c_proj
weights N(0, 0.02/sqrt(2 n_layer))), torch.nn.Dropout at the three dropout sites and
F.scaled_dot_product_attention(dropout_p, is_causal=True), torch.optim.AdamW (fused where
available, as nanoGPT) with the same decay groups, clip_grad_norm_(1.0); eager unless
--torch-compile. Its dropout masks are torch's own (other random numbers than ours, the same
distribution).

Timing: wall-clock seconds of training only. The clock stops (after a device synchronization)
for every evaluation and restarts after it; the first --warmup-steps steps of a throwaway model
run before (kernel compilation, cuBLAS/cuDNN setup) and are not counted. Per evaluation:
step, validation loss, the last training loss, elapsed training seconds.

Summary: each one's best validation loss and the training seconds to reach it (the evaluation
at which it was first reached), the difference, and the target of issue 6: textgpt2's best
within 0.02 of the twin's, reached in less training time.

    python benchmarks/bench_quality.py                          # full: 5000 steps, ~10 min
    python benchmarks/bench_quality.py --steps 1000 --eval-iters 50 --json q.json   # quick
"""
import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from torch_twin import adamw_groups, build_torch_gpt, load_our_weights  # beside this script

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "eltec_sample.txt"
TARGET_GAP = 0.02


def parse():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="corpus (read as bytes; last --val-fraction is validation)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=200,
                   help="validation batches per evaluation (fewer is faster, noisier)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="untimed steps of a throwaway model first, per side")
    p.add_argument("--only", choices=("both", "ours", "torch"), default="both")
    p.add_argument("--graph", action="store_true",
                   help="textgpt2 with use_graph=True (evaluation passes replay CUDA graphs; "
                        "training passes with dropout always run eagerly)")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the twin")
    p.add_argument("--json", default=None, help="write curves and summary to this file")
    return p.parse_args()


# ---- data ----------------------------------------------------------------------------------

def load_data(args):
    path = Path(args.data)
    if not path.is_file():
        return None
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int32)
    n_train = int(len(raw) * (1.0 - args.val_fraction))
    return raw[:n_train], raw[n_train:]


def draw_indices(args, train, val):
    """Start indices of every training window of every step, and of the validation batches,
    from one generator: both models see exactly these."""
    rng = np.random.default_rng(args.seed)
    B, T = args.batch_size, args.block_size
    train_ix = rng.integers(0, len(train) - T, size=(args.steps, B))
    val_ix = rng.integers(0, len(val) - T, size=(args.eval_iters, B))
    return train_ix, val_ix


def eval_points(args):
    """Steps after which to evaluate: 0 (the initial weights), every --eval-every, the last."""
    pts = [0]
    if args.eval_every > 0:
        pts += list(range(args.eval_every, args.steps + 1, args.eval_every))
    if pts[-1] != args.steps:
        pts.append(args.steps)
    return pts


class Curve:
    """Evaluations and the training clock (stopped during evaluations)."""

    def __init__(self, name, sync):
        self.name, self.sync = name, sync
        self.rows = []
        self.train_s = 0.0
        self._t0 = None

    def start(self):
        self.sync()
        self._t0 = time.perf_counter()

    def stop(self):
        self.sync()
        self.train_s += time.perf_counter() - self._t0
        self._t0 = None

    def record(self, step, val_loss, train_loss):
        self.rows.append({"step": step, "val_loss": val_loss, "train_loss": train_loss,
                          "train_s": self.train_s})
        tl = "       -" if train_loss is None else f"{train_loss:8.4f}"
        print(f"  {self.name:9s} step {step:5d}  val {val_loss:.4f}  train {tl}  "
              f"{self.train_s:8.1f} s", flush=True)

    def summary(self):
        best = min(self.rows, key=lambda r: (r["val_loss"], r["step"]))
        steps = self.rows[-1]["step"]
        return {"best_val_loss": best["val_loss"], "best_step": best["step"],
                "train_s_to_best": best["train_s"], "train_s_total": self.train_s,
                "final_val_loss": self.rows[-1]["val_loss"],
                "ms_per_step": 1e3 * self.train_s / steps if steps else None}

    def seconds_to(self, level):
        """Training seconds at the first evaluation with val loss <= level (None: never)."""
        for r in self.rows:
            if r["val_loss"] <= level:
                return r["train_s"]
        return None


# ---- ours ----------------------------------------------------------------------------------

def run_ours(args, cfg, train, val, train_ix, val_ix, init_state):
    from textgpt2 import gemm
    from textgpt2.device import require_gpu
    from textgpt2.model import GPT
    from textgpt2.optim import AdamW, lr_schedule
    cp = require_gpu("bench_quality")
    gemm.set_math("tf32")
    T = args.block_size
    dtrain, dval = cp.asarray(train), cp.asarray(val)
    offs = cp.arange(T, dtype=cp.int64)
    dtrain_ix, dval_ix = cp.asarray(train_ix), cp.asarray(val_ix)

    def batch(data, ix):
        pos = ix[:, None] + offs[None, :]
        return data[pos], data[pos + 1]

    def make():
        model = GPT(cfg, seed=args.seed, use_graph=args.graph)
        model.load_state_dict(init_state)
        opt = AdamW(model, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8,
                    weight_decay=args.weight_decay, max_norm=args.grad_clip)
        return model, opt

    def train_step(model, opt, step):
        x, y = batch(dtrain, dtrain_ix[step])
        model.zero_grad()
        loss = model.forward(x, y, sync=False, dropout_step=step)
        model.backward()
        opt.step(lr_schedule(step, args.steps, args.lr, args.min_lr, args.warmup))
        return loss

    def evaluate(model):
        total = cp.zeros((), dtype=cp.float64)
        for i in range(args.eval_iters):
            x, y = batch(dval, dval_ix[i])
            total += model.forward(x, y, sync=False)     # no dropout_step: no dropout
        return float(total.get()) / args.eval_iters

    if args.warmup_steps:
        model, opt = make()
        for s in range(args.warmup_steps):
            train_step(model, opt, s)
        evaluate(model)
        cp.cuda.Device().synchronize()
        del model, opt
        gc.collect()

    model, opt = make()
    curve = Curve("textgpt2", lambda: cp.cuda.Device().synchronize())
    points = set(eval_points(args))
    curve.record(0, evaluate(model), None)
    loss = None
    curve.start()
    for step in range(args.steps):
        loss = train_step(model, opt, step)
        if step + 1 in points:
            curve.stop()
            train_loss = float(loss.get())
            curve.record(step + 1, evaluate(model), train_loss)
            if not math.isfinite(train_loss):
                print("  textgpt2: the loss diverged; stopping")
                break
            curve.start()
    if curve._t0 is not None:
        curve.stop()
    del model, opt
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    return curve


# ---- the PyTorch twin ----------------------------------------------------------------------

def run_torch(args, cfg, train, val, train_ix, val_ix, init_state):
    try:
        import torch
    except ImportError as e:
        print(f"torch: not importable ({e}); no twin")
        return None
    from textgpt2.optim import lr_schedule
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    dev = torch.device("cuda")
    T = args.block_size
    dtrain = torch.from_numpy(train.astype(np.int64)).to(dev)
    dval = torch.from_numpy(val.astype(np.int64)).to(dev)
    offs = torch.arange(T, device=dev)
    dtrain_ix = torch.from_numpy(train_ix.astype(np.int64)).to(dev)
    dval_ix = torch.from_numpy(val_ix.astype(np.int64)).to(dev)

    def batch(data, ix):
        pos = ix[:, None] + offs[None, :]
        return data[pos], data[pos + 1]

    def make():
        model = build_torch_gpt(torch, cfg, args.dropout).to(dev)
        load_our_weights(torch, model, init_state)
        groups = adamw_groups(model, args.weight_decay)
        try:
            opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                                    eps=1e-8, fused=True)
        except (TypeError, RuntimeError):
            opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)
        fwd = torch.compile(model) if args.torch_compile else model
        return model, fwd, opt

    def train_step(model, fwd, opt, step):
        x, y = batch(dtrain, dtrain_ix[step])
        lr = lr_schedule(step, args.steps, args.lr, args.min_lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = fwd(x, y, real_vocab_only=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    @torch.no_grad()
    def evaluate(model, fwd):
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(args.eval_iters):
            x, y = batch(dval, dval_ix[i])
            total += fwd(x, y, real_vocab_only=True)
        model.train()
        return float(total.item()) / args.eval_iters

    if args.warmup_steps:
        model, fwd, opt = make()
        for s in range(args.warmup_steps):
            train_step(model, fwd, opt, s)
        evaluate(model, fwd)
        torch.cuda.synchronize()
        del model, fwd, opt
        gc.collect()

    model, fwd, opt = make()
    model.train()
    curve = Curve("torch", torch.cuda.synchronize)
    points = set(eval_points(args))
    curve.record(0, evaluate(model, fwd), None)
    curve.start()
    for step in range(args.steps):
        loss = train_step(model, fwd, opt, step)
        if step + 1 in points:
            curve.stop()
            train_loss = float(loss.item())
            curve.record(step + 1, evaluate(model, fwd), train_loss)
            if not math.isfinite(train_loss):
                print("  torch: the loss diverged; stopping")
                break
            curve.start()
    if curve._t0 is not None:
        curve.stop()
    out_version = torch.__version__
    del model, fwd, opt
    gc.collect()
    torch.cuda.empty_cache()
    curve.torch_version = out_version
    return curve


# ---- main ----------------------------------------------------------------------------------

def main():
    args = parse()
    data = load_data(args)
    if data is None:
        print(f"bench_quality: corpus {args.data} not found (the project's shared data folder, "
              "../shared/data/eltec_sample.txt, or give --data PATH); skipped")
        return 0
    train, val = data
    if args.steps < 1 or args.eval_iters < 1 or args.eval_every < 0:
        sys.exit("bench_quality: --steps and --eval-iters must be >= 1, --eval-every >= 0")
    if args.warmup > args.steps:
        args.warmup = args.steps // 10
        print(f"note: --warmup is longer than the run; using {args.warmup} steps")
    from textgpt2.device import NoGPUError, gpu_status, require_gpu
    from textgpt2.model import GPTConfig, init_params
    try:
        require_gpu("bench_quality")
    except NoGPUError as e:
        sys.exit(str(e))
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                    block_size=args.block_size, vocab_size=256, dropout=args.dropout)
    if len(val) <= args.block_size or len(train) <= args.block_size:
        sys.exit(f"bench_quality: {args.data} is too small for windows of {args.block_size}")
    device = gpu_status()[1]
    print(f"device: {device}")
    print(f"corpus: {args.data}: {len(train) + len(val):,} bytes, train {len(train):,}, "
          f"val {len(val):,}")
    print(f"model: {cfg.to_dict()}, {cfg.num_params() / 1e6:.2f}M parameters (non-embedding)")
    print(f"recipe: {args.steps} steps, batch {args.batch_size} x {args.block_size}, lr "
          f"{args.lr:g} -> {args.min_lr:g} (warmup {args.warmup}, cosine), betas "
          f"{args.beta1}/{args.beta2}, weight decay {args.weight_decay}, clip {args.grad_clip}, "
          f"dropout {args.dropout}; eval every {args.eval_every} steps over {args.eval_iters} "
          f"validation batches; TF32 matmuls", flush=True)

    train_ix, val_ix = draw_indices(args, train, val)
    init_state = init_params(cfg, args.seed)       # GPT-2 init; both models start from it
    result = {"device": device, "config": cfg.to_dict(), "args": vars(args)}
    curves = {}
    if args.only in ("both", "ours"):
        print("textgpt2:", flush=True)
        curves["textgpt2"] = run_ours(args, cfg, train, val, train_ix, val_ix, init_state)
    if args.only in ("both", "torch"):
        print("torch twin:", flush=True)
        c = run_torch(args, cfg, train, val, train_ix, val_ix, init_state)
        if c is not None:
            curves["torch"] = c
            result["torch_version"] = c.torch_version

    print(f"\n{'':10s} {'best val':>9s} {'at step':>8s} {'train s to best':>16s} "
          f"{'total train s':>14s} {'ms/step':>8s} {'final val':>10s}")
    for name, c in curves.items():
        s = c.summary()
        result[name] = {"curve": c.rows, **s}
        print(f"{name:10s} {s['best_val_loss']:9.4f} {s['best_step']:8d} "
              f"{s['train_s_to_best']:16.1f} {s['train_s_total']:14.1f} "
              f"{s['ms_per_step'] or float('nan'):8.2f} {s['final_val_loss']:10.4f}")
    if len(curves) == 2:
        o, t = result["textgpt2"], result["torch"]
        gap = o["best_val_loss"] - t["best_val_loss"]
        level = max(o["best_val_loss"], t["best_val_loss"])
        to_level = {n: c.seconds_to(level) for n, c in curves.items()}
        ok_loss = gap <= TARGET_GAP
        ok_time = o["train_s_to_best"] < t["train_s_to_best"]
        result["comparison"] = {
            "best_val_loss_diff": gap,
            "train_s_to_best_diff": o["train_s_to_best"] - t["train_s_to_best"],
            "train_s_to_best_ratio": (o["train_s_to_best"] / t["train_s_to_best"]
                                      if t["train_s_to_best"] else None),
            "common_level": level, "train_s_to_common_level": to_level,
            "target_loss_within_0.02": ok_loss, "target_less_time": ok_time,
            "target_met": ok_loss and ok_time}
        print(f"\nbest val loss: textgpt2 - torch = {gap:+.4f} (target <= +{TARGET_GAP}: "
              f"{'met' if ok_loss else 'NOT met'})")
        print(f"training seconds to the best: textgpt2 {o['train_s_to_best']:.1f} s, torch "
              f"{t['train_s_to_best']:.1f} s, difference "
              f"{o['train_s_to_best'] - t['train_s_to_best']:+.1f} s (target: less: "
              f"{'met' if ok_time else 'NOT met'})")
        print(f"training seconds to val loss {level:.4f} (the worse of the two bests): "
              + ", ".join(f"{n} {'-' if s is None else f'{s:.1f} s'}"
                          for n, s in to_level.items()))
        print(f"issue 6 target: {'MET' if ok_loss and ok_time else 'NOT MET'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
