"""Three encoder_backward calls at GPT-2 124M shapes grouping the ids on the GPU, then three with
the ids grouped on the host (a plan), for a per-kernel profile:
    ncu --metrics gpu__time_duration.sum python benchmarks/profile_encoder_backward.py"""
import numpy as np, cupy as cp
from textgpt2 import ops
B, T, C, V = 16, 1024, 768, 50304
rng = np.random.default_rng(0)
ids = rng.integers(0, 50257, size=(B, T)).astype(np.int32)
idx = cp.asarray(ids)
plan = ops.encoder_backward_plan(ids, C, V)
dout = cp.asarray(rng.standard_normal((B, T, C)).astype(np.float32))
dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
for _ in range(3):
    ops.encoder_backward(dout, idx, dwte, dwpe)
for _ in range(3):
    ops.encoder_backward(dout, plan.idx, dwte, dwpe, plan=plan)
cp.cuda.Device().synchronize()
