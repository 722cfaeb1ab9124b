"""Training throughput of textgpt2's GPT beside a PyTorch eager twin of the same model, in one
run on one GPU: ms per step, tokens/s, MFU, and the ratio.

A step is what the trainer does: zero_grad, forward (loss), backward, AdamW step with gradient
clipping at 1.0. Each step is timed with CUDA events around it and synchronized (so steps do
not overlap), after warm-up steps; the median over --steps steps is reported.
MFU uses nanoGPT's count, flops/token = 6 N + 12 L H Q T (N = parameters without wpe,
counting wte's padded rows), against --peak-tflops (H100 SXM dense TF32: 494.7).

PyTorch twin (where torch imports): the same architecture and sizes (padded vocabulary
embedding tied to the head, pre-LN blocks, tanh GELU), fp32 weights with TF32 matmuls
(torch.backends.cuda.matmul.allow_tf32 = True), F.scaled_dot_product_attention(is_causal=True),
torch.optim.AdamW (PyTorch's default implementation) with nanoGPT's decay groups,
clip_grad_norm_(1.0). It starts from our initial weights; before timing, both models' loss
and gradient norm on the same batch are printed (the twin's loss over the real vocabulary
columns, as ours) as an end-to-end check at full size. In the timed steps the twin's
cross-entropy runs over all Vp columns, as nanoGPT does (slicing the logits would add a copy).

    python benchmarks/bench_train.py [--model gpt2] [--batch-size 16] [--seq-len 1024]
        [--steps 20] [--warmup 5] [--graph both|on|off] [--ids host|device|both]
        [--no-torch] [--breakdown] [--json out.json]

--ids: where ours gets each batch's token ids. host (the default, as the trainer does): NumPy
batches, copied in by the forward, and encoder_backward's grouping of the ids made on the host
(encoder_backward_plan) while the GPU runs the forward; device: CuPy batches already on the GPU,
grouped there by encoder_backward itself. Rows for device ids end in "_device_ids".
"""
import argparse
import gc
import json
import statistics
import sys
import time

import numpy as np

from torch_twin import adamw_groups, build_torch_gpt, load_our_weights  # beside this script

TORCH_DEVICE = "cuda"


def parse():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", help="GPTConfig preset: gpt2 or default")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--batch-size", "-B", type=int, default=16)
    p.add_argument("--seq-len", "-T", type=int, default=None,
                   help="sequence length (default: the preset's context, 1024 for gpt2)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--graph", choices=("off", "on", "both"), default="both",
                   help="time ours eagerly, through CUDA graphs, or both (default)")
    p.add_argument("--math", choices=("tf32", "fp32"), default="tf32",
                   help="matmul precision for both models (default tf32)")
    p.add_argument("--ids", choices=("host", "device", "both"), default="host",
                   help="our batches as NumPy arrays (host, as the trainer; the ids are grouped "
                        "for encoder_backward on the host), CuPy arrays (device), or both")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin")
    p.add_argument("--breakdown", action="store_true",
                   help="also time every op of our eager step (CUDA events around each call)")
    p.add_argument("--peak-tflops", type=float, default=494.7,
                   help="dense peak for MFU (H100 SXM TF32: 494.7)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this file")
    return p.parse_args()


def summarize(times_ms, tokens, flops_per_token, peak_tflops):
    med = statistics.median(times_ms)
    tok_s = tokens / (med / 1e3)
    return {"ms_per_step": med, "ms_min": min(times_ms), "ms_max": max(times_ms),
            "tok_per_s": tok_s, "mfu": flops_per_token * tok_s / (peak_tflops * 1e12),
            "steps_timed": len(times_ms)}


def time_steps(cp_or_torch_events, step, warmup, steps, sync):
    """Run warmup untimed steps, then `steps` steps each between two CUDA events; returns the
    per-step milliseconds. `cp_or_torch_events()` makes a (start, end, elapsed) triple."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start, end, elapsed = cp_or_torch_events()
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return times


# ---- ours --------------------------------------------------------------------------------

class OpTimer:
    """Wraps every function of textgpt2.ops and textgpt2.gemm (and the model's zero_grad) with
    CUDA events, keyed by (phase, op); the model calls them through module attributes, so the
    wrappers see every call. Eager mode only (event records cannot go into a graph)."""

    def __init__(self, cp, model):
        from textgpt2 import gemm, ops
        self.cp, self.model = cp, model
        self.records = []            # (phase, name, start, end)
        self.phase = "other"
        self.saved = []
        for mod in (ops, gemm):
            for name in dir(mod):
                fn = getattr(mod, name)
                if name.startswith("_") or not callable(fn) or isinstance(fn, type):
                    continue
                if getattr(fn, "__module__", None) != mod.__name__:
                    continue
                if name.endswith("scratch_size") or name in ("set_math", "get_math"):
                    continue
                self.saved.append((mod, name, fn))
                setattr(mod, name, self._wrap(name, fn))
        for meth in ("_forward", "_backward"):
            orig = getattr(model, meth)
            self.saved.append((model, meth, None))
            setattr(model, meth, self._phase(meth.strip("_"), orig))
        zg = model.zero_grad
        self.saved.append((model, "zero_grad", None))
        setattr(model, "zero_grad", self._wrap("zero_grad", zg, phase="step"))

    def _wrap(self, name, fn, phase=None):
        cp = self.cp

        def wrapper(*a, **k):
            s, e = cp.cuda.Event(), cp.cuda.Event()
            s.record()
            r = fn(*a, **k)
            e.record()
            self.records.append((phase or self.phase, name, s, e))
            return r
        return wrapper

    def _phase(self, phase, fn):
        def wrapper(*a, **k):
            self.phase = phase
            try:
                return fn(*a, **k)
            finally:
                self.phase = "optimizer"
        return wrapper

    def restore(self):
        for obj, name, fn in reversed(self.saved):
            if fn is None:
                delattr(obj, name)           # back to the class's method
            else:
                setattr(obj, name, fn)

    def table(self, n_steps):
        self.cp.cuda.Device().synchronize()
        acc = {}
        for phase, name, s, e in self.records:
            key = (phase, name)
            t, n = acc.get(key, (0.0, 0))
            acc[key] = (t + self.cp.cuda.get_elapsed_time(s, e), n + 1)
        return sorted(((p, n, t / n_steps, c / n_steps) for (p, n), (t, c) in acc.items()),
                      key=lambda r: -r[2])


def bench_ours(args, cfg, T, batches, host_batch):
    from textgpt2.device import require_gpu
    cp = require_gpu("bench_train")
    from textgpt2 import gemm
    from textgpt2.model import GPT
    from textgpt2.optim import AdamW

    gemm.set_math(args.math)
    B = args.batch_size
    t0 = time.perf_counter()
    model = GPT(cfg, seed=args.seed)
    init_s = time.perf_counter() - t0
    init_state = model.state_dict()
    opt = AdamW(model, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, max_norm=1.0)
    on_device = {"host": [False], "device": [True], "both": [False, True]}[args.ids]
    device_batches = [(cp.asarray(x), cp.asarray(y)) for x, y in batches]
    xs, ys = [], []       # the batches the timed steps use: set per mode below
    out = {"init_s": init_s}

    # end-to-end check: loss and gradient norm at init on the first batch
    model.zero_grad()
    loss0 = model.forward(host_batch[0], host_batch[1])
    model.backward()
    gn0 = float(cp.sqrt(cp.sum(model.grads.astype(cp.float64) ** 2)))
    model.zero_grad()
    out["check"] = {"loss": loss0, "grad_norm": gn0}
    print(f"ours  init loss {loss0:.6f}  grad norm {gn0:.6f}  (model built in {init_s:.1f} s)")

    i = [0]

    def step():
        k = i[0] % len(xs)
        i[0] += 1
        model.zero_grad()
        model.forward(xs[k], ys[k], sync=False)
        model.backward()
        opt.step(args.lr)

    def events():
        return cp.cuda.Event(), cp.cuda.Event(), cp.cuda.get_elapsed_time

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.graph]
    flops = cfg.flops_per_token(T)
    for ids_on_device, use_graph in ((d, g) for d in on_device for g in modes):
        name = ("ours_graph" if use_graph else "ours_eager") + ("_device_ids" if ids_on_device
                                                                else "")
        xs[:], ys[:] = zip(*(device_batches if ids_on_device else batches))
        model.use_graph = use_graph
        try:
            cpu0 = time.perf_counter()
            times = time_steps(events, step, args.warmup, args.steps,
                               lambda: cp.cuda.Device().synchronize())
            host_s = time.perf_counter() - cpu0
        except Exception as e:  # report, keep going (the other mode, torch)
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        r = summarize(times, B * T, flops, args.peak_tflops)
        r["wall_s"] = host_s
        r["loss_after"] = model.loss(xs[0], ys[0])
        out[name] = r
        print(f"{name}: {r['ms_per_step']:.2f} ms/step (min {r['ms_min']:.2f}, max "
              f"{r['ms_max']:.2f}), {r['tok_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
              f"loss after {r['loss_after']:.4f}")
    model.use_graph = False

    if args.breakdown:
        timer = OpTimer(cp, model)
        n = 3
        try:
            for _ in range(n):
                step()
            rows = timer.table(n)
        finally:
            timer.restore()
        total = sum(r[2] for r in rows)
        print(f"\nper-op breakdown (eager, mean of {n} steps; event-bracketed, so launch gaps "
              f"are excluded): {total:.2f} ms in ops")
        print(f"  {'phase':9s} {'op':32s} {'calls':>5s} {'ms':>8s} {'%':>6s}")
        for phase, nm, ms, calls in rows:
            print(f"  {phase:9s} {nm:32s} {calls:5g} {ms:8.3f} {100 * ms / total:6.1f}")
        out["breakdown"] = [{"phase": p, "op": nm, "calls": c, "ms": ms} for p, nm, ms, c in rows]

    pool = cp.get_default_memory_pool()
    out["gpu_mem_gib"] = pool.total_bytes() / 2**30
    print(f"ours: CuPy pool holds {out['gpu_mem_gib']:.1f} GiB")
    model = opt = xs = ys = step = None      # drop every reference before freeing the pool
    gc.collect()
    pool.free_all_blocks()
    return out, init_state


# ---- the PyTorch twin --------------------------------------------------------------------

def bench_torch(args, cfg, T, batches, init_state):
    try:
        import torch
    except ImportError as e:
        print(f"torch: not importable ({e}); no comparison")
        return None
    torch.backends.cuda.matmul.allow_tf32 = args.math == "tf32"
    torch.backends.cudnn.allow_tf32 = args.math == "tf32"
    dev = torch.device(TORCH_DEVICE)
    model = build_torch_gpt(torch, cfg).to(dev)
    load_our_weights(torch, model, init_state)
    opt = torch.optim.AdamW(adamw_groups(model, 0.1), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    xs = [torch.from_numpy(x.astype(np.int64)).to(dev) for x, _ in batches]
    ys = [torch.from_numpy(y.astype(np.int64)).to(dev) for _, y in batches]
    out = {"torch_version": torch.__version__}

    loss0 = model(xs[0], ys[0], real_vocab_only=True)
    loss0.backward()
    gn0 = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters())))
    opt.zero_grad(set_to_none=True)
    out["check"] = {"loss": loss0.item(), "grad_norm": gn0}
    print(f"torch init loss {loss0.item():.6f}  grad norm {gn0:.6f}")
    del loss0

    i = [0]

    def step():
        k = i[0] % len(xs)
        i[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = model(xs[k], ys[k])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def events():
        return (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                lambda s, e: s.elapsed_time(e))

    torch.cuda.reset_peak_memory_stats()
    times = time_steps(events, step, args.warmup, args.steps, torch.cuda.synchronize)
    r = summarize(times, args.batch_size * T, cfg.flops_per_token(T), args.peak_tflops)
    r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out.update(r)
    print(f"torch eager: {r['ms_per_step']:.2f} ms/step (min {r['ms_min']:.2f}, max "
          f"{r['ms_max']:.2f}), {r['tok_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}%, "
          f"peak memory {r['peak_mem_gib']:.1f} GiB")
    model = opt = xs = ys = step = None
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    args = parse()
    from textgpt2.device import gpu_status, require_gpu
    from textgpt2.model import GPTConfig
    require_gpu("bench_train")
    cfg = GPTConfig.preset(args.model, n_layer=args.n_layer, n_head=args.n_head,
                           n_embd=args.n_embd)
    T = args.seq_len or cfg.block_size
    if T > cfg.block_size:
        sys.exit(f"--seq-len {T} exceeds the model's context {cfg.block_size}")
    B = args.batch_size
    flops = cfg.flops_per_token(T)
    device = gpu_status()[1]
    print(f"device: {device}")
    print(f"model: {args.model} {cfg.to_dict()}, {cfg.num_params() / 1e6:.2f}M params "
          f"(non-embedding, padded vocab {cfg.padded_vocab_size}); B={B} T={T}; "
          f"{flops / 1e6:.1f} MFLOP/token; matmuls {args.math}; peak {args.peak_tflops} TFLOP/s")

    rng = np.random.default_rng(args.seed)
    batches = [(rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32),
                rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)) for _ in range(4)]

    result = {"device": device, "config": cfg.to_dict(), "B": B, "T": T, "math": args.math,
              "flops_per_token": flops, "peak_tflops": args.peak_tflops,
              "warmup": args.warmup, "steps": args.steps}
    ours, init_state = bench_ours(args, cfg, T, batches, batches[0])
    result.update(ours)
    tw = None if args.no_torch else bench_torch(args, cfg, T, batches, init_state)
    if tw is not None:
        result["torch"] = tw
        lo, lt = ours["check"]["loss"], tw["check"]["loss"]
        go, gt = ours["check"]["grad_norm"], tw["check"]["grad_norm"]
        result["check_rel_diff"] = {"loss": abs(lo - lt) / abs(lt), "grad_norm": abs(go - gt) / gt}
        print(f"check: init loss rel diff {result['check_rel_diff']['loss']:.2e}, grad norm rel "
              f"diff {result['check_rel_diff']['grad_norm']:.2e} (TF32: expect ~1e-4 / ~1e-3)")

    print(f"\n{'':21s} {'ms/step':>9s} {'tok/s':>11s} {'MFU':>7s} {'vs torch':>9s}")
    rows = [(k, result[k]) for k in ("ours_eager", "ours_graph", "ours_eager_device_ids",
                                     "ours_graph_device_ids") if k in result]
    if tw is not None:
        rows.append(("torch_eager", tw))
    for k, r in rows:
        if "error" in r:
            print(f"{k:21s} {'failed':>9s}")
            continue
        ratio = f"{r['tok_per_s'] / tw['tok_per_s']:8.2f}x" if tw is not None else "       -"
        if k.startswith("ours") and tw is not None:
            result[k]["speedup_vs_torch"] = r["tok_per_s"] / tw["tok_per_s"]
        print(f"{k:21s} {r['ms_per_step']:9.2f} {r['tok_per_s']:11,.0f} {100 * r['mfu']:6.1f}% "
              f"{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
