"""How fast can encoder_backward's memory traffic go on this GPU when nothing orders it?

encoder_backward reads dout once, reads and writes every touched dwte row once, and reads and
writes dwpe. This script times a throwaway kernel that does exactly that traffic with no
dependencies at all: one block per position t (and 256-channel slice), 16 dout rows loaded, the
row's dwte slice read, added to, written. Ids with a repeat are written by their first position
only, so each touched row is read and written once, as in the real op. No grouping, no ordering,
no dwpe: not a correct backward, only the ceiling for its access pattern. It prints that time
beside the real op's, both as a share of a device-to-device copy, measured the same way as
bench_kernels (CUDA events, L2 flushed before every repetition, median). The yardstick is
bench_kernels' copy (16384 x 3072 floats, 201 MB each way); for reference it also prints a copy
that moves the op's own byte count and an empty kernel, since every timed call pays a fixed cost
that weighs more on a smaller op.

    python benchmarks/bench_encoder_ceiling.py [--B 16 --T 1024 --C 768 --V 50304] [--ids zipf]
"""
import argparse
import json

import numpy as np

from bench_kernels import Timer  # the same method: L2 flushed, CUDA events, median

PATTERN = r"""
extern "C" __global__ void pattern(const float4* __restrict__ dout, float4* __restrict__ dwte,
                                   const int* __restrict__ ids, int B, int T, int C4) {
    // blockIdx.x: position t; blockIdx.y: slice of blockDim.x float4; threadIdx.y: 4 rows each
    const int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C4) return;
    float4 g[4], w[4];
    int id[4];
#pragma unroll
    for (int u = 0; u < 4; u++) {
        const int b = threadIdx.y * 4 + u;
        id[u] = -1;
        if (b < B) {
            const long long row = (long long)b * T + t;
            id[u] = ids[row];
            g[u] = dout[row * C4 + c];
        }
    }
#pragma unroll
    for (int u = 0; u < 4; u++)
        if (id[u] >= 0) w[u] = dwte[(long long)id[u] * C4 + c];
#pragma unroll
    for (int u = 0; u < 4; u++)
        if (id[u] >= 0) {
            w[u].x += g[u].x; w[u].y += g[u].y; w[u].z += g[u].z; w[u].w += g[u].w;
            dwte[(long long)id[u] * C4 + c] = w[u];
        }
}
"""


def parse():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=16, help="sequences (at most 16)")
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--C", type=int, default=768, help="channels (a multiple of 4)")
    p.add_argument("--V", type=int, default=50304, help="vocabulary rows (padded size)")
    p.add_argument("--ids", default="uniform", choices=["uniform", "zipf", "bytes"],
                   help="token ids, as in bench_kernels.py")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None, help="write the numbers to this file")
    args = p.parse_args()
    if not 1 <= args.B <= 16 or args.C % 4:
        p.error(f"--B must be 1..16 and --C a multiple of 4 (got B={args.B}, C={args.C})")
    return args


def copy_bandwidth(cp, timer, shape):
    """GB/s (read + write) of a device-to-device copy of a float32 array of `shape`."""
    src = cp.ones(shape, np.float32)
    dst = cp.empty_like(src)
    return 2 * src.nbytes / timer(lambda: dst.__setitem__(Ellipsis, src)) / 1e6


def main():
    args = parse()
    from textgpt2 import ops
    from textgpt2.device import require_gpu
    cp = require_gpu("bench_encoder_ceiling")
    B, T, C, V = args.B, args.T, args.C, args.V
    rng = np.random.default_rng(0)
    if args.ids == "zipf":
        ids = np.minimum(rng.zipf(1.1, size=(B, T)) - 1, 50256)
    else:
        ids = rng.integers(0, 256 if args.ids == "bytes" else min(V, 50257), size=(B, T))
    ids = ids.astype(np.int32)
    flat = ids.ravel()
    first = np.zeros(flat.size, bool)
    first[np.unique(flat, return_index=True)[1]] = True
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        timer = Timer(cp, args.reps)
        copy_bw = copy_bandwidth(cp, timer, (B * T, 4 * C))
        dout = cp.asarray(rng.standard_normal((B, T, C)).astype(np.float32))
        dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
        idx = cp.asarray(ids)
        once = cp.asarray(np.where(first, flat, -1).astype(np.int32))
        kernel = cp.RawKernel(PATTERN, "pattern")
        threads = min(64, C // 4)
        grid = (T, (C // 4 + threads - 1) // threads)
        ms_pattern = timer(lambda: kernel(grid, (threads, 4), (dout, dwte, once, np.int32(B),
                                                              np.int32(T), np.int32(C // 4))))
        ms_op = timer(lambda: ops.encoder_backward(dout, idx, dwte, dwpe))
        touched = int(first.sum())
        nb_pattern = dout.nbytes + 2 * touched * C * 4 + idx.nbytes
        nb_op = nb_pattern + 2 * dwpe.nbytes
        same = cp.ones(nb_op // 8, np.float32)  # read + written: the op's byte count
        same_out = cp.empty_like(same)
        ms_same = timer(lambda: same_out.__setitem__(Ellipsis, same))
        empty = cp.RawKernel('extern "C" __global__ void empty() {}', "empty")
        ms_empty = timer(lambda: empty((1,), (32,), ()))
    print(f"GPU: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}  B={B} T={T} C={C} "
          f"V={V}  ids={args.ids} ({touched} distinct)  copy {copy_bw:.0f} GB/s")
    rows = []
    print(f"{'empty kernel':32s} {ms_empty:.4f} ms  (the fixed cost of one timed call)")
    for name, ms, nb in [("copy of the op's byte count", ms_same, 2 * same.nbytes),
                         ("access pattern alone (no dwpe)", ms_pattern, nb_pattern),
                         ("encoder_backward", ms_op, nb_op)]:
        bw = nb / ms / 1e6
        rows.append({"name": name, "ms": ms, "MB": nb / 1e6, "GB/s": bw,
                     "pct_of_copy": 100 * bw / copy_bw})
        print(f"{name:32s} {ms:.4f} ms  {nb / 1e6:6.1f} MB  {bw:5.0f} GB/s  "
              f"{100 * bw / copy_bw:3.0f}% of copy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GB/s": copy_bw, "ids": args.ids, "empty_kernel_ms": ms_empty,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
