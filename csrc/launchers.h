// Every launcher that bindings.cpp exposes. A launcher takes raw device pointers (uintptr_t,
// from CuPy's array.data.ptr), sizes, a storage dtype code (DType in common.cuh) and a
// cudaStream_t as uintptr_t; it queues its kernels on that stream, checks the launch, and
// returns without synchronizing. Shapes and dtypes were validated by textgpt2/ops.py.
//
// Conventions: parameter gradients (dwte, dwpe, dweight, dbias) are ACCUMULATED (+=), so
// gradient accumulation over micro-batches needs no extra pass; activation gradients are
// overwritten. An output may alias an input only where its comment says so.
#pragma once
#include <cstdint>

// encoder.cu: out[b,t,:] = wte[idx[b,t],:] + wpe[t,:]
void encoder_forward(uintptr_t out, uintptr_t idx, uintptr_t wte, uintptr_t wpe,
                     int B, int T, int C, int V, int dtype, uintptr_t stream);
// An out-of-range id (outside [0, V), V = wte rows) writes NaN over its out row.
// dwte[v] += sum of dout rows whose token is v; dwpe[t] += sum_b dout[b,t]. Deterministic (same
// bits every run, no float atomics); rows of out-of-range ids reach dwpe but no dwte row.
// scratch: int32 workspace of encoder_backward_scratch_size(B, T, C, V) elements (256-byte aligned;
// it holds float32 partial sums too, hence C; the size depends on the current GPU's shared
// memory, which bounds the chunk one sort handles). Needs B*T <= 2^30.
// plan: 0, or a device copy of an encoder_backward_plan of these ids (then the ids are read from
// its head and the grouping kernels are not launched).
long long encoder_backward_scratch_size(int B, int T, int C, int V);
void encoder_backward(uintptr_t dwte, uintptr_t dwpe, uintptr_t scratch, uintptr_t dout,
                      uintptr_t idx, uintptr_t plan, int B, int T, int C, int V, int dtype,
                      uintptr_t stream);
// Host code: writes into plan (host memory, encoder_backward_plan_size(B, T, C) int32) the ids
// (B*T int32 in host memory, each in [0, V)) and their grouping for encoder_backward.
long long encoder_backward_plan_size(int B, int T, int C);
void encoder_backward_plan(uintptr_t plan, uintptr_t ids, int B, int T, int C, int V);
// Host code, for tests: writes 12 int64 into out: Bc, Tc (the chunk shape), then the offsets in
// int32 elements of the first region, the region size, and, within a region, head, run, order,
// long_keys, long_rows, owners, tile_done, runs_past (encoder.cu, PlanLayout).
void encoder_backward_plan_layout(uintptr_t out, int B, int T, int C);

// layernorm.cu: rows of length C; mean and rstd (float32, N each) saved for the backward.
void layernorm_forward(uintptr_t out, uintptr_t mean, uintptr_t rstd, uintptr_t x,
                       uintptr_t weight, uintptr_t bias, int N, int C, float eps, int dtype,
                       uintptr_t stream);
// scratch: float32 workspace of layernorm_backward_scratch_size(N, C) elements.
long long layernorm_backward_scratch_size(int N, int C);
void layernorm_backward(uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t scratch,
                        uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t mean,
                        uintptr_t rstd, int N, int C, int dtype, uintptr_t stream);

// residual.cu: out = a + b (out may alias a or b).
void residual_forward(uintptr_t out, uintptr_t a, uintptr_t b, long long n, int dtype,
                      uintptr_t stream);

// feedforward.cu
// out[n, :] = x[n, :] + bias (out may alias x).
void bias_forward(uintptr_t out, uintptr_t x, uintptr_t bias, int N, int OC, int dtype,
                  uintptr_t stream);
// dbias += sum over rows of dout, two-stage fixed-order reduction through scratch
// (float32, bias_backward_scratch_size(N, OC) elements).
long long bias_backward_scratch_size(int N, int OC);
void bias_backward(uintptr_t dbias, uintptr_t scratch, uintptr_t dout, int N, int OC,
                   int dtype, uintptr_t stream);
// GELU, tanh form. gelu_backward: dx = dout * gelu'(x) (dx may alias dout).
void gelu_forward(uintptr_t out, uintptr_t x, long long n, int dtype, uintptr_t stream);
void gelu_backward(uintptr_t dx, uintptr_t x, uintptr_t dout, long long n, int dtype,
                   uintptr_t stream);

// cross_entropy.cu: rows of Vp logits of which the first V are real. losses[n] =
// logsumexp(row[:V]) - row[target]; if dlogits != 0 it gets (softmax - onehot) * dloss_scale
// for the first V columns and 0 for the padded ones (dlogits may alias logits). A target
// outside [0, V) gives that row loss NaN and dlogits NaN on its first V columns (pads still 0).
void cross_entropy_forward_backward(uintptr_t losses, uintptr_t dlogits, uintptr_t logits,
                                    uintptr_t targets, int N, int V, int Vp,
                                    float dloss_scale, int dtype, uintptr_t stream);

// adamw.cu (float32 master weights, gradients and moments, one flat buffer each)
// out[0] = sum(grads^2), deterministic, through scratch (global_norm_scratch_size(n) floats).
long long global_norm_scratch_size(long long n);
void global_norm_squared(uintptr_t out, uintptr_t scratch, uintptr_t grads, long long n,
                         uintptr_t stream);
// One AdamW step over the flat buffers. Elements [0, n_decay) get decoupled weight decay.
// If norm_sq != 0, gradients are scaled by min(1, max_norm / (sqrt(*norm_sq) + 1e-6)), read on
// the device (no host sync).
void adamw_update(uintptr_t params, uintptr_t grads, uintptr_t m, uintptr_t v,
                  uintptr_t norm_sq, long long n, long long n_decay, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float max_norm, int step,
                  uintptr_t stream);

// attention.cu: qkv is (B, T, 3C): [q | k | v], head h at columns h*d .. h*d+d-1 of each.
// out is (B, T, C), head h at columns h*d; lse (float32, B*H*T) saved for the backward.
// dropout_p in [0, 1) on the attention probabilities (p == 0: none); the mask is Philox keyed by
// (seed, offset) at element index ((b*H + h)*T + i)*T + j (i query, j key), regenerated by the
// backward, which must get the same (dropout_p, seed, offset).
void attention_forward(uintptr_t out, uintptr_t lse, uintptr_t qkv, int B, int T, int C,
                       int H, int dtype, float dropout_p, uint64_t seed, uint64_t offset,
                       uintptr_t stream);
// dqkv (B, T, 3C) overwritten; scratch: float32, attention_backward_scratch_size(B,T,H).
long long attention_backward_scratch_size(int B, int T, int H);
void attention_backward(uintptr_t dqkv, uintptr_t scratch, uintptr_t dout, uintptr_t qkv,
                        uintptr_t out, uintptr_t lse, int B, int T, int C, int H, int dtype,
                        float dropout_p, uint64_t seed, uint64_t offset, uintptr_t stream);

// dropout.cu: out = x * keep / (1 - p) with keep ~ Bernoulli(1 - p) from Philox-4x32-10 keyed by
// (seed, offset, element index) (counter layout: csrc/philox.cuh); dropout_backward regenerates
// the same mask: dx = dout * keep / (1 - p). 0 <= p < 1 (p == 0: a copy). out may alias x, dx may
// alias dout (exactly, not partially).
void dropout_forward(uintptr_t out, uintptr_t x, uint64_t seed, uint64_t offset, long long n,
                     float p, int dtype, uintptr_t stream);
void dropout_backward(uintptr_t dx, uintptr_t dout, uint64_t seed, uint64_t offset, long long n,
                      float p, int dtype, uintptr_t stream);
