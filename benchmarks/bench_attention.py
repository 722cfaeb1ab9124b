"""Causal attention (csrc/attention.cu) beside PyTorch's scaled_dot_product_attention, fp32.

Times, at B=16, H=12, T=1024, d=64 by default: our forward, our backward alone and our forward +
backward, and torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) forward
and forward + backward on fp32 tensors in the same run (when torch imports), and prints ms,
TFLOP/s and our time / torch's time (< 1: we are faster). It also prints how far our outputs and
gradients are from torch's, as a sanity check of the numbers being compared.

FLOP counts (causal, half the T x T scores): forward 4*B*H*T*T*d/2 (two matmuls of
2*B*H*T*T*d/2 each), forward + backward 3.5x that (the backward's five matmuls, as FlashAttention
counts them; our backward actually does seven, recomputing S and dP for dq instead of using
atomics). Method: CUDA events around each call after warm-up, the median of --reps repetitions,
with the L2 cache flushed (a 256 MiB buffer rewritten) before each repetition.

    python benchmarks/bench_attention.py [--B 16 --H 12 --T 1024 --d 64] [--reps 30] [--json out.json]
"""
import argparse
import json
import sys

import numpy as np

from bench_kernels import Timer  # the same method: L2 flushed, CUDA events, median


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--H", type=int, default=12)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--d", type=int, default=64, help="head dimension (32, 64 or 128)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    return p.parse_args()


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def main():
    args = parse()
    from textgpt2.device import require_gpu
    cp = require_gpu("bench_attention")
    from textgpt2 import ops

    torch = F = None
    if not args.no_torch:
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:
            torch = None

    B, H, T, d = args.B, args.H, args.T, args.d
    C = H * d
    rng = np.random.default_rng(0)
    qkv = cp.asarray(rng.standard_normal((B, T, 3 * C)).astype(np.float32))
    dout = cp.asarray(rng.standard_normal((B, T, C)).astype(np.float32))
    out = cp.empty((B, T, C), np.float32)
    lse = cp.empty((B, H, T), np.float32)
    dqkv = cp.empty((B, T, 3 * C), np.float32)
    timer = Timer(cp, args.reps, args.warmup)

    fwd_flops = 4 * B * H * T * T * d / 2
    fb_flops = 3.5 * fwd_flops
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"GPU: {name}  B={B} H={H} T={T} d={d} fp32 (TF32 tensor cores)  "
          f"torch: {torch.__version__ if torch else 'not used'}")

    def fwd():
        ops.attention_forward(qkv, H, out=out, lse=lse)

    def bwd():
        ops.attention_backward(dout, qkv, out, lse, H, dqkv=dqkv)

    def fwd_bwd():
        fwd()
        bwd()

    ours = {"forward": timer(fwd), "backward": timer(bwd), "forward+backward": timer(fwd_bwd)}

    theirs = {}
    check = {}
    if torch is not None:
        tq = torch.as_tensor(qkv, device="cuda").view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        q, k, v = (tq[i].contiguous().requires_grad_(True) for i in range(3))
        tdo = torch.as_tensor(dout, device="cuda").view(B, T, H, d).transpose(1, 2).contiguous()

        def t_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def t_clear():
            q.grad = k.grad = v.grad = None

        def t_fwd_bwd():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(tdo)

        theirs["forward"] = timer(t_fwd)
        theirs["forward+backward"] = timer(t_fwd_bwd, setup=t_clear)
        # sanity: how far apart are the two implementations on these inputs
        t_clear()
        to = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        to.backward(tdo)
        torch.cuda.synchronize()
        fwd()
        bwd()
        cp.cuda.Device().synchronize()
        tout = to.detach().transpose(1, 2).reshape(B, T, C).cpu().numpy()
        grads = [g.transpose(1, 2).reshape(B, T, C).cpu().numpy() for g in (q.grad, k.grad, v.grad)]
        dq_ours = dqkv.get()
        check = {"out_rel_err_vs_torch": rel(out.get(), tout)}
        for i, part in enumerate(("dq", "dk", "dv")):
            check[f"{part}_rel_err_vs_torch"] = rel(dq_ours[..., i * C:(i + 1) * C], grads[i])
        flags = {f: getattr(torch.backends.cuda, f)() for f in
                 ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled")
                 if hasattr(torch.backends.cuda, f)}
        check["torch_sdp_flags"] = flags
        check["torch_matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)

    rows = []
    print(f"{'':18s} {'ours ms':>9s} {'TFLOP/s':>8s} {'torch ms':>9s} {'TFLOP/s':>8s} {'ratio':>6s}")
    for op, flops in (("forward", fwd_flops), ("backward", fb_flops - fwd_flops),
                      ("forward+backward", fb_flops)):
        row = {"op": op, "ms": ours[op], "TFLOP/s": flops / ours[op] / 1e9}
        line = f"{op:18s} {ours[op]:9.3f} {row['TFLOP/s']:8.1f}"
        if op in theirs:
            row["torch_ms"] = theirs[op]
            row["torch_TFLOP/s"] = flops / theirs[op] / 1e9
            row["ratio"] = ours[op] / theirs[op]
            line += f" {theirs[op]:9.3f} {row['torch_TFLOP/s']:8.1f} {row['ratio']:6.2f}"
        rows.append(row)
        print(line)
    print("targets (H100, DESIGN.md): torch fp32 SDPA 0.90 ms forward, 3.33 ms forward+backward; "
          "stretch: half of that")
    if check:
        print("vs torch: " + ", ".join(f"{k} {v:.2e}" for k, v in check.items() if isinstance(v, float))
              + f"; torch sdp {check.get('torch_sdp_flags')}, matmul.allow_tf32 "
              f"{check.get('torch_matmul_allow_tf32')}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "B": B, "H": H, "T": T, "d": d, "dtype": "float32",
                       "reps": args.reps, "flops_forward": fwd_flops,
                       "flops_forward_backward": fb_flops, "rows": rows, "check": check}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
