"""Times every textgpt2 kernel at GPT-2 124M shapes beside its PyTorch equivalent (same GPU,
same run, when torch imports) and prints ms, GB/s or TFLOP/s, and the ratio.

Method: CUDA events around each call, after warm-up, median of --reps repetitions, with the L2
cache flushed (a 256 MiB buffer rewritten) before every repetition so each run reads from device
memory. Everything, PyTorch included, runs on one non-blocking stream, as the model's CUDA graphs
do: the legacy default stream serializes kernels and so disables programmatic dependent launch
(encoder_backward's kernels overlap through it; its row on the default stream is printed too). GB/s counts the fewest bytes the op must move (each input read once, each output
written once); the device-to-device copy measured first is the practical ceiling.

    python benchmarks/bench_kernels.py [--B 16 --T 1024 --C 768 --V 50304] [--json out.json]
"""
import argparse
import json
import sys

import numpy as np


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--C", type=int, default=768)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--V", type=int, default=50304, help="vocabulary rows (padded size)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--ops", default="all", help="comma-separated subset of op names to run")
    p.add_argument("--ids", default="uniform", choices=["uniform", "zipf", "bytes"],
                   help="encoder token ids: uniform over GPT-2's 50257, zipf (text-like skew: "
                        "frequent ids repeat hundreds of times), or bytes (256 ids, every one "
                        "repeated ~B*T/256 times)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    return p.parse_args()


class Timer:
    """Median CUDA-event time of fn() in ms, after `warmup` calls; setup() runs before each call,
    outside the timing. The events go on CuPy's current stream. Also used by bench_attention.py."""

    def __init__(self, cp, reps, warmup=3):
        self.cp, self.reps, self.warmup = cp, reps, warmup
        self.flush_buf = cp.empty(64 * 1024 * 1024, dtype=cp.float32)  # 256 MiB > 50 MB L2

    def __call__(self, fn, setup=None):
        cp = self.cp
        for _ in range(self.warmup):  # module load, handle creation, allocator
            if setup:
                setup()
            fn()
        cp.cuda.Device().synchronize()
        times = []
        start, end = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(self.reps):
            if setup:
                setup()
            self.flush_buf.fill(1.0)  # also keeps the GPU busy while the host queues fn()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return float(np.median(times))


def host_median(fn, reps):
    """Median wall time of fn() in ms (host work only), after one warm-up call."""
    import time
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main():
    args = parse()
    from textgpt2.device import require_gpu
    cp = require_gpu("bench_kernels")
    stream = cp.cuda.Stream(non_blocking=True)
    try:
        import torch
    except ImportError:
        torch = None
    with stream:
        if torch is None:
            return run(args, cp)
        with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
            return run(args, cp)


def run(args, cp):
    from textgpt2 import gemm, ops
    try:
        import torch
        import torch.nn.functional as F
        torch.backends.cuda.matmul.allow_tf32 = False
    except ImportError:
        torch = None
    timer = Timer(cp, args.reps)
    B, T, C, H, Vp = args.B, args.T, args.C, args.H, args.V
    N = B * T
    rng = np.random.default_rng(0)
    f32 = np.float32
    rows = []
    wanted = None if args.ops == "all" else set(args.ops.split(","))

    def randn(*shape, scale=1.0):
        return cp.asarray((rng.standard_normal(shape) * scale).astype(f32))

    def tt(a):  # CuPy -> torch view of the same memory
        return torch.as_tensor(a, device="cuda")

    def record(name, ms, nbytes=None, flops=None, torch_ms=None, note=""):
        row = {"op": name, "ms": ms}
        if nbytes is not None:
            row["GB/s"] = nbytes / ms / 1e6
        if flops is not None:
            row["TFLOP/s"] = flops / ms / 1e9
        if torch_ms is not None:
            row["torch_ms"] = torch_ms
            row["ratio"] = ms / torch_ms  # < 1: we are faster
        row["note"] = note
        rows.append(row)
        print(fmt(row), flush=True)

    def want(name):
        return wanted is None or name in wanted

    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}  B={B} T={T} C={C} H={H} V={Vp}"
          f"  torch: {torch.__version__ if torch else 'not importable'}")
    print(f"{'op':34s} {'ms':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} {'torch ms':>9s} {'ratio':>6s}  note")

    # ---- the ceiling: a plain device-to-device copy of 16384 x 3072 floats
    src = randn(N, 4 * C)
    dst = cp.empty_like(src)
    copy_ms = timer(lambda: dst.__setitem__(Ellipsis, src))
    record("copy (device to device)", copy_ms, nbytes=2 * src.nbytes, note="bandwidth ceiling")
    copy_bw = 2 * src.nbytes / copy_ms / 1e6
    del src, dst

    def pct_of_copy(nbytes, ms):
        return f"{100 * nbytes / ms / 1e6 / copy_bw:.0f}% of copy"

    x = randn(B, T, C)
    if want("residual"):
        y = randn(B, T, C)
        out = cp.empty_like(x)
        ms = timer(lambda: ops.residual_forward(x, y, out=out))
        tms = timer(lambda: torch.add(tt(x), tt(y), out=tt(out))) if torch else None
        nb = 3 * x.nbytes
        record("residual_forward", ms, nbytes=nb, torch_ms=tms, note=pct_of_copy(nb, ms))

    if want("encoder"):
        if args.ids == "zipf":
            ids = np.minimum(rng.zipf(1.1, size=(B, T)) - 1, 50256)
        else:
            ids = rng.integers(0, 256 if args.ids == "bytes" else 50257, size=(B, T))
        idx = cp.asarray(ids.astype(np.int32))
        wte, wpe = randn(Vp, C, scale=0.02), randn(T, C, scale=0.02)
        out = cp.empty((B, T, C), f32)
        ms = timer(lambda: ops.encoder_forward(idx, wte, wpe, out=out))
        tms = None
        if torch:
            ti, tw, tp, to = tt(idx).long(), tt(wte), tt(wpe), tt(out)
            tms = timer(lambda: torch.add(F.embedding(ti, tw), tp, out=to))
        nb = 2 * out.nbytes + wpe.nbytes + idx.nbytes
        record("encoder_forward", ms, nbytes=nb, torch_ms=tms, note=pct_of_copy(nb, ms))
        dwte, dwpe = cp.zeros_like(wte), cp.zeros_like(wpe)
        dout = randn(B, T, C)
        ms = timer(lambda: ops.encoder_backward(dout, idx, dwte, dwpe))
        tms = None
        if torch:
            tdw, tdp, tdo = tt(dwte), tt(dwpe), tt(dout)
            def torch_enc_bwd():
                tdw.index_add_(0, ti.view(-1), tdo.view(-1, C))
                tdp.add_(tdo.sum(0))
            tms = timer(torch_enc_bwd)
        ntouched = len(np.unique(idx.get()))
        nb = dout.nbytes + 2 * ntouched * C * 4 + 2 * dwpe.nbytes + idx.nbytes
        record("encoder_backward", ms, nbytes=nb, torch_ms=tms,
               note=pct_of_copy(nb, ms) + f"; {args.ids} ids; torch: index_add_ (atomics)")
        # The ids grouped on the host instead (what the model does for a NumPy batch): the
        # op is then one kernel. The plan's own costs are printed beside it, not hidden.
        ids32 = ids.astype(np.int32)
        host_ms = host_median(lambda: ops.encoder_backward_plan_host(ids32, C, Vp), args.reps)
        plan = ops.encoder_backward_plan(ids32, C, Vp)
        ms = timer(lambda: ops.encoder_backward(dout, plan.idx, dwte, dwpe, plan=plan))
        record("encoder_backward (host plan)", ms, nbytes=nb, torch_ms=tms,
               note=pct_of_copy(nb, ms) + f"; {args.ids} ids grouped on the host, below")
        up_ms = timer(lambda: ops.encoder_backward_plan(ids32, C, Vp, out=plan))
        record("encoder_backward_plan", up_ms,
               note=f"host: {host_ms:.3f} ms of CPU to group (median), then "
                    f"{plan.array.nbytes / 1e6:.2f} MB copied; event time of both")
        with cp.cuda.Stream.null:
            ms = timer(lambda: ops.encoder_backward(dout, idx, dwte, dwpe))
        record("encoder_backward (default stream)", ms, nbytes=nb,
               note=pct_of_copy(nb, ms) + "; legacy default stream: no dependent launch")

    if want("layernorm"):
        w, b = randn(C), randn(C)
        out = cp.empty_like(x)
        mean, rstd = cp.empty((B, T), f32), cp.empty((B, T), f32)
        ms = timer(lambda: ops.layernorm_forward(x, w, b, out=out, mean=mean, rstd=rstd))
        tms = None
        if torch:
            tx, tw, tb = tt(x), tt(w), tt(b)
            tms = timer(lambda: F.layer_norm(tx, (C,), tw, tb, 1e-5))
        nb = 2 * x.nbytes + 2 * w.nbytes + 2 * mean.nbytes
        record("layernorm_forward", ms, nbytes=nb, torch_ms=tms, note="target >= 2500 GB/s")
        dout = randn(B, T, C)
        dw, db, dx = cp.zeros_like(w), cp.zeros_like(b), cp.empty_like(x)
        def ln_fb():
            ops.layernorm_forward(x, w, b, out=out, mean=mean, rstd=rstd)
            ops.layernorm_backward(dout, x, w, mean, rstd, dw, db, dx=dx)
        ms = timer(ln_fb)
        tms = None
        if torch:
            txg = tt(x).clone().requires_grad_(True)
            twg, tbg = tt(w).clone().requires_grad_(True), tt(b).clone().requires_grad_(True)
            tdo = tt(dout)
            def torch_ln_fb():
                y = F.layer_norm(txg, (C,), twg, tbg, 1e-5)
                y.backward(tdo)
            tms = timer(torch_ln_fb)
        nb = 2 * x.nbytes + 3 * x.nbytes + 2 * mean.nbytes * 2
        record("layernorm fwd+bwd", ms, nbytes=nb, torch_ms=tms, note="target ratio <= 0.8")

    if want("gelu"):
        h = randn(N, 4 * C)
        out, dh = cp.empty_like(h), cp.empty_like(h)
        dout = randn(N, 4 * C)
        def gelu_fb():
            ops.gelu_forward(h, out=out)
            ops.gelu_backward(dout, h, dx=dh)
        ms = timer(gelu_fb)
        tms = None
        if torch:
            thg, tdo = tt(h).clone().requires_grad_(True), tt(dout)
            def torch_gelu_fb():
                F.gelu(thg, approximate="tanh").backward(tdo)
            tms = timer(torch_gelu_fb)
        nb = 5 * h.nbytes
        record("gelu fwd+bwd", ms, nbytes=nb, torch_ms=tms, note=pct_of_copy(nb, ms))
        bias = randn(4 * C)
        dbias = cp.zeros_like(bias)
        ms = timer(lambda: ops.bias_backward(dout, dbias))
        tms = timer(lambda: tt(dout).sum(0)) if torch else None
        record("bias_backward", ms, nbytes=dout.nbytes, torch_ms=tms, note=pct_of_copy(dout.nbytes, ms))
        del h, out, dh, dout

    if want("dropout"):
        out, dx = cp.empty_like(x), cp.empty_like(x)
        def drop_fb():
            ops.dropout_forward(x, 0.1, seed=1234, offset=7, out=out)
            ops.dropout_backward(out, 0.1, seed=1234, offset=7, dx=dx)
        ms = timer(drop_fb)
        tms = None
        if torch:
            txg = tt(x).clone().requires_grad_(True)
            tdo = tt(out)
            def torch_drop_fb():
                F.dropout(txg, 0.1, training=True).backward(tdo)
            tms = timer(torch_drop_fb)
        nb = 4 * x.nbytes
        record("dropout fwd+bwd (p=0.1)", ms, nbytes=nb, torch_ms=tms,
               note=pct_of_copy(nb, ms) + "; torch stores a mask")

    if want("matmul"):
        a, wfc = randn(N, C), randn(4 * C, C, scale=0.02)
        out = cp.empty((N, 4 * C), f32)
        for math_mode in ("tf32", "fp32"):
            gemm.set_math(math_mode)
            ms = timer(lambda: gemm.matmul_forward(a, wfc, out=out))
            record(f"matmul_forward {math_mode} {N}x{C}x{4*C}", ms, flops=2 * N * C * 4 * C)
        gemm.set_math("tf32")
        del a, wfc, out

    if want("cross_entropy"):
        V = 50257
        logits = randn(N, Vp, scale=2.0)
        targets = cp.asarray(rng.integers(0, V, size=N).astype(np.int32))
        losses = cp.empty(N, f32)
        dlogits = cp.empty_like(logits)
        ms = timer(lambda: ops.cross_entropy_forward_backward(logits, targets, V, losses=losses, dlogits=dlogits))
        tms = None
        if torch:
            tl = tt(logits)[:, :V]
            ttg = tt(targets).long()
            def torch_ce():
                lg = tl.detach().requires_grad_(True)
                F.cross_entropy(lg, ttg).backward()
            tms = timer(torch_ce)
        nb = 2 * logits.nbytes
        record("cross_entropy fwd+bwd", ms, nbytes=nb, torch_ms=tms, note="target <= 3.0 ms")
        del logits, dlogits

    if want("attention"):
        d = C // H
        qkv = randn(B, T, 3 * C)
        out, lse = ops.attention_forward(qkv, H)
        dout = randn(B, T, C)
        dqkv = cp.empty_like(qkv)
        flops = 4 * B * H * T * T * d / 2
        ms = timer(lambda: ops.attention_forward(qkv, H, out=out, lse=lse))
        tms = tms_fb = None
        if torch:
            tq = tt(qkv).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
            q, k, v = (t.contiguous() for t in tq)
            tms = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            tdo = torch.randn_like(q)
            def torch_att_fb():
                F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(tdo)
            tms_fb = timer(torch_att_fb)
        record("attention_forward", ms, flops=flops, torch_ms=tms, note="torch: SDPA fp32")
        def att_fb():
            ops.attention_forward(qkv, H, out=out, lse=lse)
            ops.attention_backward(dout, qkv, out, lse, H, dqkv=dqkv)
        ms = timer(att_fb)
        record("attention fwd+bwd", ms, flops=3.5 * flops, torch_ms=tms_fb, note="torch: SDPA fp32")
        def att_fb_drop():
            ops.attention_forward(qkv, H, out=out, lse=lse, dropout_p=0.1, seed=1, offset=2)
            ops.attention_backward(dout, qkv, out, lse, H, dqkv=dqkv, dropout_p=0.1, seed=1, offset=2)
        ms = timer(att_fb_drop)
        tms = None
        if torch:
            def torch_att_fb_drop():
                F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, dropout_p=0.1).backward(tdo)
            tms = timer(torch_att_fb_drop)
        record("attention fwd+bwd dropout 0.1", ms, flops=3.5 * flops, torch_ms=tms,
               note="torch: SDPA fp32 dropout")
        del qkv, dqkv

    if want("adamw"):
        n = 124_475_904  # GPT-2 124M with V padded to 50304
        n_decay = n - 100_000
        p, g = randn(n, scale=0.02), randn(n, scale=1e-3)
        m, v = cp.zeros(n, f32), cp.zeros(n, f32)
        norm = cp.empty(1, f32)
        ms = timer(lambda: ops.global_norm_squared(g, out=norm))
        tms = timer(lambda: torch.linalg.vector_norm(tt(g))) if torch else None
        record("global_norm_squared (124M)", ms, nbytes=g.nbytes, torch_ms=tms, note=pct_of_copy(g.nbytes, ms))
        ms = timer(lambda: ops.adamw_update(p, g, m, v, lr=1e-4, step=1, weight_decay=0.1,
                                            n_decay=n_decay, norm_sq=norm, max_norm=1.0))
        tms = None
        if torch:
            tp, tg, tm, tv = tt(p), tt(g), tt(m), tt(v)
            tstep = torch.tensor(1.0, device="cuda")
            def torch_adamw():
                torch._fused_adamw_([tp], [tg], [tm], [tv], [], [tstep], lr=1e-4, beta1=0.9,
                                    beta2=0.95, weight_decay=0.1, eps=1e-8, amsgrad=False,
                                    maximize=False)
            try:
                tms = timer(torch_adamw)
            except Exception as e:  # private API; report rather than guess
                print(f"  (torch fused AdamW unavailable: {e})")
        nb = 7 * p.nbytes
        record("adamw_update (124M)", ms, nbytes=nb, torch_ms=tms,
               note=pct_of_copy(nb, ms) + "; torch: fused AdamW")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"B": B, "T": T, "C": C, "H": H, "V": Vp, "copy_GBps": copy_bw, "rows": rows}, f, indent=1)


def fmt(r):
    g = f"{r['GB/s']:8.0f}" if "GB/s" in r else " " * 8
    t = f"{r['TFLOP/s']:8.1f}" if "TFLOP/s" in r else " " * 8
    tm = f"{r['torch_ms']:9.3f}" if "torch_ms" in r else " " * 9
    ra = f"{r['ratio']:6.2f}" if "ratio" in r else " " * 6
    return f"{r['op']:34s} {r['ms']:9.3f} {g} {t} {tm} {ra}  {r['note']}"


if __name__ == "__main__":
    sys.exit(main())
