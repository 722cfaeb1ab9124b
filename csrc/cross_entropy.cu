// Fused softmax + cross-entropy + dlogits.
//
// Row n holds Vp logits x of which the first V are real (the rest pad the vocabulary to a multiple
// of 128 and are ignored). With t = targets[n]:
//   loss[n] = logsumexp(x[:V]) - x[t]
//   d(scale * loss[n]) / dx[i] = scale * (softmax(x[:V])[i] - [i == t])   for i < V
//                              = 0                                          for V <= i < Vp
// because d lse / dx_i = softmax_i and d x_t / dx_i = [i == t]. The caller passes scale (1/N for a
// mean loss, times the loss gradient from above).
//
// One block per row, two passes over it:
//  1. an online max / sum of exponentials over x[:V] (each thread keeps its own running max m and
//     a sum s scaled by that max; the block then combines them), read back to front;
//  2. dlogits front to back. Pass 1 running back to front means the start of the row, touched
//     last, is what pass 2 re-reads first, so most of pass 2 hits L2: a 50304-float row is
//     201 KB and 2 blocks x 132 SMs hold 264 rows (53 MB) at once, of which about half is
//     loaded and not yet re-read at any moment. Pass 2 uses evict-first loads and stores so its
//     traffic does not push out rows still waiting for their second read.
// Exponentials are exp2(x * log2e - off) with off = fl(m * log2e) carried exactly from pass 1 to
// pass 2, so softmax = exp2(fma(x, log2e, -off)) / S needs no further correction; the loss adds
// back the rounding of off (see the loss line). dlogits may alias logits: every element is read
// and then written by the same thread, after the block-wide reductions that end pass 1, and x[t]
// is read in pass 1.

#include "common.cuh"
#include "launchers.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kUnroll = 4;  // units in flight per thread per pass (memory-level parallelism)

// Last read of these bytes: evict-first (ld.global.cs).
template <int W, typename T>
__device__ __forceinline__ void load_units_last(const T* p, float (&v)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        alignas(16) T tmp[W];
        *reinterpret_cast<int4*>(tmp) = __ldcs(reinterpret_cast<const int4*>(p));
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = StorageTraits<T>::to_float(tmp[k]);
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = load_f(p + k);
    }
}
// Written once, not read again by this kernel: evict-first (st.global.cs).
template <int W, typename T>
__device__ __forceinline__ void store_units_stream(T* p, const float (&v)[W]) {
    if constexpr (W * sizeof(T) == 16) {
        alignas(16) T tmp[W];
#pragma unroll
        for (int k = 0; k < W; k++) tmp[k] = StorageTraits<T>::from_float(v[k]);
        __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(tmp));
    } else {
#pragma unroll
        for (int k = 0; k < W; k++) store_f(p + k, v[k]);
    }
}

// Folds `count` values into a thread's running (m, off, s): m is the largest value seen,
// off = fl(m * log2e) (0 while m is -inf, so -inf values give exp2(-inf) = 0 instead of
// fma(-inf, log2e, +inf) = NaN), s = sum of exp2(fma(v, log2e, -off)) over the values seen
// (NaN once a NaN was seen: fmaxf skips NaN, the sum does not).
// When the max moves, s is rescaled by exp2(old off - new off): both offsets are the same floats
// used for the terms, so the rescale is consistent with them.
template <int COUNT>
__device__ __forceinline__ void online_update(const float (&v)[COUNT], float& m, float& off,
                                              float& s) {
    float mx = v[0];
#pragma unroll
    for (int k = 1; k < COUNT; k++) mx = fmaxf(mx, v[k]);
    if (mx > m) {
        const float new_off = mx * kLog2e;
        // s == 0: nothing but -inf so far, and exp2(0 - new_off) may be inf. A NaN s stays NaN.
        s = (s == 0.0f) ? 0.0f : s * exp2f(off - new_off);
        m = mx;
        off = new_off;
    }
    float add = 0.0f;
#pragma unroll
    for (int k = 0; k < COUNT; k++) add += exp2f(fmaf(v[k], kLog2e, -off));
    s += add;
}

// blockDim.x: a multiple of 32, at most 1024. W: elements per access (1, or 16 / sizeof(T) when
// Vp % W == 0 and the row pointers are 16-byte aligned).
template <typename T, int W>
__global__ void __launch_bounds__(1024)
    cross_entropy_kernel(float* losses, T* dlogits, const T* logits, const int* targets, int V,
                         int Vp, float scale) {
    __shared__ float red[32];
    const long long row = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    const T* x = logits + row * Vp;
    T* d = dlogits ? dlogits + row * Vp : nullptr;
    const int t = targets[row];

    if (t < 0 || t >= V) {  // same t for the whole block, so no thread skips a barrier
        if (tid == 0) losses[row] = NAN;
        if (d)
            for (int c = tid; c < Vp; c += nt) store_f(d + c, c < V ? NAN : 0.0f);
        return;
    }

    // ---- pass 1: max and sum of exponentials over x[0, V), back to front ----
    float m = -INFINITY, off = 0.0f, s = 0.0f;
    const int nfull = V / W;  // units lying entirely inside [0, V)
    for (int j0 = nfull - 1 - tid; j0 >= 0; j0 -= kUnroll * nt) {
        float v[kUnroll * W];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const int j = j0 - u * nt;
            float vu[W];
            if (j >= 0) {
                load_vec(vu, x + (long long)j * W);
            } else {
#pragma unroll
                for (int k = 0; k < W; k++) vu[k] = -INFINITY;
            }
#pragma unroll
            for (int k = 0; k < W; k++) v[u * W + k] = vu[k];
        }
        online_update<kUnroll * W>(v, m, off, s);
    }
    float xt = 0.0f;
    if (tid == nt - 1) {  // the last warp usually has the least pass-1 work
        for (int c = nfull * W; c < V; c++) {  // fewer than W columns
            const float v1[1] = {load_f(x + c)};
            online_update<1>(v1, m, off, s);
        }
    }
    if (tid == 0) xt = load_f(x + t);

    const float M = block_max(m, red);
    // Offset for the whole row; the per-thread sums move onto it. A thread that saw only -inf
    // (or nothing) has s == 0 and contributes 0; a NaN s (a NaN logit) stays NaN.
    const float offM = (M == -INFINITY) ? 0.0f : M * kLog2e;
    const float S = block_sum(s == 0.0f ? 0.0f : s * exp2f(off - offM), red);

    if (tid == 0) {
        // S = sum_i 2^(x_i*log2e - offM) = e^(-offM*ln2) * sum_i e^(x_i (1+delta)) with
        // log2e_f * ln2 = 1 + delta, so lse = ln S + offM*ln2 - M*delta = M + ln S - r*ln2 where
        // r = M*log2e_f - offM is the rounding error of offM, exact through fma. Subtracting x_t
        // from M first keeps a near-zero loss accurate even when the logits are large.
        const float r = fmaf(M, kLog2e, -offM);
        losses[row] = (M - xt) + (logf(S) - r * kLn2);
    }
    if (!d) return;

    // ---- pass 2: dlogits = scale * (softmax - onehot), zeros on [V, Vp), front to back ----
    const float inv_s = 1.0f / S;
    const int nunits = Vp / W;
    for (int j0 = tid; j0 < nunits; j0 += kUnroll * nt) {
        float v[kUnroll][W];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const int j = j0 + u * nt;
            if (j < nunits && j * W < V) {
                load_units_last<W>(x + (long long)j * W, v[u]);
            } else {
#pragma unroll
                for (int k = 0; k < W; k++) v[u][k] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; u++) {
            const int j = j0 + u * nt;
            if (j < nunits) {
                float g[W];
#pragma unroll
                for (int k = 0; k < W; k++) {
                    const int c = j * W + k;
                    const float p = exp2f(fmaf(v[u][k], kLog2e, -offM)) * inv_s;
                    g[k] = c < V ? (p - (c == t ? 1.0f : 0.0f)) * scale : 0.0f;
                }
                store_units_stream<W>(d + (long long)j * W, g);
            }
        }
    }
}

template <typename T, int W>
void launch_cross_entropy(uintptr_t losses, uintptr_t dlogits, uintptr_t logits, uintptr_t targets,
                          int N, int V, int Vp, float scale, cudaStream_t stream) {
    // ~8 or more units per thread for long rows (1024 threads for GPT-2's 50304), a single warp
    // for short ones.
    const int units = Vp / W;
    const int threads = std::min(1024, std::max(32, ceil_div(ceil_div(units, 8), 32) * 32));
    cross_entropy_kernel<T, W><<<N, threads, 0, stream>>>(
        as_ptr<float>(losses), as_ptr<T>(dlogits), as_ptr<const T>(logits),
        as_ptr<const int>(targets), V, Vp, scale);
}

}  // namespace

void cross_entropy_forward_backward(uintptr_t losses, uintptr_t dlogits, uintptr_t logits,
                                    uintptr_t targets, int N, int V, int Vp, float dloss_scale,
                                    int dtype, uintptr_t stream) {
    if (V <= 0 || V > Vp)
        throw std::invalid_argument("cross_entropy_forward_backward: need 0 < V <= Vp, got V=" +
                                    std::to_string(V) + ", Vp=" + std::to_string(Vp));
    if (N <= 0) return;
    DISPATCH_STORAGE("cross_entropy_forward_backward", dtype, [&] {
        constexpr int W = static_cast<int>(16 / sizeof(scalar_t));
        // Every row start is 16-byte aligned only if Vp is a multiple of the pack width.
        const bool vec = Vp % W == 0 && logits % 16 == 0 && dlogits % 16 == 0;
        if (vec)
            launch_cross_entropy<scalar_t, W>(losses, dlogits, logits, targets, N, V, Vp,
                                              dloss_scale, as_stream(stream));
        else
            launch_cross_entropy<scalar_t, 1>(losses, dlogits, logits, targets, N, V, Vp,
                                              dloss_scale, as_stream(stream));
    });
    check_launch("cross_entropy_forward_backward");
}
