"""Why bench_kernels flushes L2 by writing a buffer, not by reading one.

A kernel that writes ends with part of its output still dirty in L2; those lines reach DRAM
while the next kernel runs, and that kernel pays for them. This script shows it with ncu:
residual_forward (reads 2 x 50 MB, writes 50 MB) after three kinds of flush of a 256 MiB
buffer, profiled without ncu's own cache control:

    ncu --cache-control none --clock-control none --kernel-name regex:residual \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        python benchmarks/profile_flush.py

Each mode profiles two kernels, the one before the flush and the one after it, in the order
printed: write (rewrite the buffer: L2 left full of dirty lines), read (read it: L2 left full
of clean lines), none (the kernel before is another residual_forward, as in a training step),
twice. On an H100 (session 9) every kernel read 100.7 MB from DRAM; what it wrote during its
run: after a write flush 55.7 MB in 54.1 us, after a read flush 29.8 MB in 45.8 us, back to back
with another residual_forward 49.5-50.6 MB in 51.4-52.6 us. So a kernel after a read flush is
timed as if 20 MB of its writes were free, and a write flush is close to (a little harder than)
what a kernel meets in a real step."""
import cupy as cp
import numpy as np

from textgpt2 import ops

N = 16 * 1024 * 768  # one GPT-2 124M activation at B=16, T=1024
x, y = cp.ones(N, np.float32), cp.ones(N, np.float32)
out = cp.empty_like(x)
flush_buf = cp.ones(64 * 1024 * 1024, np.float32)
for mode in ["write", "read", "none"] * 2:
    ops.residual_forward(x, y, out=out)
    if mode == "write":
        flush_buf.fill(1.0)
    elif mode == "read":
        flush_buf.sum()
    cp.cuda.Device().synchronize()
    print("flush:", mode, flush=True)
    ops.residual_forward(x, y, out=out)  # the profiled one
    cp.cuda.Device().synchronize()
