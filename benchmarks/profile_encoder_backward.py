"""Three encoder_backward calls at GPT-2 124M shapes, for a per-kernel profile:
    ncu --metrics gpu__time_duration.sum python benchmarks/profile_encoder_backward.py"""
import numpy as np, cupy as cp
from textgpt2 import ops
B, T, C, V = 16, 1024, 768, 50304
rng = np.random.default_rng(0)
idx = cp.asarray(rng.integers(0, 50257, size=(B, T)).astype(np.int32))
dout = cp.asarray(rng.standard_normal((B, T, C)).astype(np.float32))
dwte, dwpe = cp.zeros((V, C), np.float32), cp.zeros((T, C), np.float32)
for _ in range(3):
    ops.encoder_backward(dout, idx, dwte, dwpe)
cp.cuda.Device().synchronize()
