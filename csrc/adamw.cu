// AdamW over the flat parameter buffer, and the global gradient norm used for clipping.
//
// Math (step t counts from 1; decoupled weight decay, Loshchilov & Hutter):
//   clip  = min(1, max_norm / (sqrt(sum g^2) + 1e-6))           only when clipping is on
//   g     = grad * clip
//   m     = b1 m + (1 - b1) g          v = b2 v + (1 - b2) g^2
//   mhat  = m / (1 - b1^t)             vhat = v / (1 - b2^t)
//   param = param - lr (mhat / (sqrt(vhat) + eps) + wd param)   wd = 0 past n_decay
// An optimizer step has no backward. The expressions keep reference.adamw_update's order of
// operations so the float32 result stays within a few ulps of the float64 one.
//
// Both kernels are memory-bound streams: adamw reads 4 and writes 3 float32 arrays (28 bytes an
// element), the norm reads one.

#include <climits>
#include <cmath>

#include "common.cuh"
#include "launchers.h"

namespace {

// ---- alignment ---------------------------------------------------------------------------
// CuPy allocations are 256-byte aligned, but a view such as buf[1:] is not. For vectorised
// access every pointer must sit at the same offset within 16 bytes; then the first `head`
// (0..3) elements are done one at a time and the rest as float4 from an aligned address.
// Float32 pointers are always 4-byte aligned, which the launchers check.
inline long long head_elements(uintptr_t p, long long n) {
    long long head = static_cast<long long>(((16 - (p & 15)) & 15) / 4);
    return head < n ? head : n;
}

__device__ __forceinline__ float sum_sq4(float4 a) {
    return fmaf(a.x, a.x, fmaf(a.y, a.y, fmaf(a.z, a.z, a.w * a.w)));
}

// ---- global norm ---------------------------------------------------------------------------
// Stage 1: a grid that depends on n alone (not on the GPU) so the partition into partial sums,
// and with it every bit of the result, is the same on every run and every device. Block b,
// thread t sums the float4s t + b*THREADS + k*(grid*THREADS): each pass of the grid reads one
// contiguous span. Partials are doubles: a thread may sum thousands of squares at n ~ 1e9,
// and the extra precision costs one conversion and one add per four elements. Blocks of
// the grid well beyond one wave (up to NORM_MAX_BLOCKS) keep the last-wave tail small on any
// GPU. Stage 2: one block adds the partials in index order.
constexpr int NORM_THREADS = 256;
constexpr int NORM_FINAL_THREADS = 1024;
constexpr long long NORM_MAX_BLOCKS = 8192;
constexpr long long NORM_ELEMS_PER_THREAD = 16;  // before the grid stops growing

inline int norm_blocks(long long n) {
    const long long per_block = NORM_THREADS * NORM_ELEMS_PER_THREAD;
    long long b = (n + per_block - 1) / per_block;
    if (b < 1) b = 1;
    if (b > NORM_MAX_BLOCKS) b = NORM_MAX_BLOCKS;
    return static_cast<int>(b);
}

__global__ void __launch_bounds__(NORM_THREADS)
global_norm_partials_kernel(double* __restrict__ partials, const float* __restrict__ g,
                            long long n, long long head, long long nvec) {
    __shared__ double red[32];
    const float4* g4 = reinterpret_cast<const float4*>(g + head);
    const long long stride = static_cast<long long>(gridDim.x) * NORM_THREADS;
    long long j = static_cast<long long>(blockIdx.x) * NORM_THREADS + threadIdx.x;
    double acc = 0.0;
    // Four independent 16-byte loads in flight per thread before any of them is used.
    for (; j + 3 * stride < nvec; j += 4 * stride) {
        const float4 a = g4[j], b = g4[j + stride], c = g4[j + 2 * stride], d = g4[j + 3 * stride];
        acc += static_cast<double>(sum_sq4(a));
        acc += static_cast<double>(sum_sq4(b));
        acc += static_cast<double>(sum_sq4(c));
        acc += static_cast<double>(sum_sq4(d));
    }
    for (; j < nvec; j += stride) acc += static_cast<double>(sum_sq4(g4[j]));
    // The unaligned head (< 4 elements) and the tail (< 4) go to fixed threads of block 0.
    if (blockIdx.x == 0 && threadIdx.x < 4) {
        const long long t = threadIdx.x, tail = head + 4 * nvec + t;
        if (t < head) acc += static_cast<double>(g[t] * g[t]);
        if (tail < n) acc += static_cast<double>(g[tail] * g[tail]);
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(NORM_FINAL_THREADS)
global_norm_final_kernel(float* __restrict__ out, const double* __restrict__ partials, int count) {
    __shared__ double red[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += NORM_FINAL_THREADS) acc += partials[i];
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) out[0] = static_cast<float>(acc);
}

// ---- AdamW ---------------------------------------------------------------------------------
struct AdamWHyper {
    float lr, beta1, beta2, one_minus_beta1, one_minus_beta2;
    float inv_bc1, inv_bc2;  // 1 / (1 - beta^t), from the host in double
    float eps, weight_decay, max_norm;
};

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, float wd,
                                              const AdamWHyper& h) {
    m = h.beta1 * m + h.one_minus_beta1 * g;
    v = h.beta2 * v + h.one_minus_beta2 * (g * g);
    const float mhat = m * h.inv_bc1, vhat = v * h.inv_bc2;
    p = p - h.lr * (mhat / (sqrtf(vhat) + h.eps) + wd * p);
}

// Thread j < nvec updates the float4 at element head + 4j. The threads after them take the
// scalar leftovers, numbered s = j - nvec: the head elements [0, head), then the tail
// [head + 4 nvec, n). With nvec = head = 0 every element is scalar: the path for views whose
// pointers sit at different offsets within 16 bytes.
constexpr int ADAMW_THREADS = 256;

__global__ void __launch_bounds__(ADAMW_THREADS)
adamw_update_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                    float* __restrict__ v, const float* __restrict__ norm_sq, long long n,
                    long long n_decay, long long head, long long nvec, AdamWHyper h) {
    const long long j = static_cast<long long>(blockIdx.x) * ADAMW_THREADS + threadIdx.x;
    // The clip factor is recomputed by every thread from one cached float: no host sync and no
    // second kernel, and it matches reference.clip_scale(norm, max_norm).
    float scale = 1.0f;
    if (norm_sq != nullptr) scale = fminf(1.0f, h.max_norm / (sqrtf(*norm_sq) + 1e-6f));

    if (j < nvec) {
        const long long i = head + 4 * j;
        float4 pp = *reinterpret_cast<const float4*>(p + i);
        const float4 gg = *reinterpret_cast<const float4*>(g + i);
        float4 mm = *reinterpret_cast<const float4*>(m + i);
        float4 vv = *reinterpret_cast<const float4*>(v + i);
        adamw_element(pp.x, gg.x * scale, mm.x, vv.x, i + 0 < n_decay ? h.weight_decay : 0.0f, h);
        adamw_element(pp.y, gg.y * scale, mm.y, vv.y, i + 1 < n_decay ? h.weight_decay : 0.0f, h);
        adamw_element(pp.z, gg.z * scale, mm.z, vv.z, i + 2 < n_decay ? h.weight_decay : 0.0f, h);
        adamw_element(pp.w, gg.w * scale, mm.w, vv.w, i + 3 < n_decay ? h.weight_decay : 0.0f, h);
        *reinterpret_cast<float4*>(p + i) = pp;
        *reinterpret_cast<float4*>(m + i) = mm;
        *reinterpret_cast<float4*>(v + i) = vv;
        return;
    }
    const long long s = j - nvec;
    const long long i = s < head ? s : 4 * nvec + s;  // head + 4 nvec + (s - head)
    if (i >= n) return;
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_element(pi, g[i] * scale, mi, vi, i < n_decay ? h.weight_decay : 0.0f, h);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

long long global_norm_scratch_size(long long n) {
    // One double (two floats) per stage-1 block.
    return n > 0 ? 2LL * norm_blocks(n) : 0;
}

void global_norm_squared(uintptr_t out, uintptr_t scratch, uintptr_t grads, long long n,
                         uintptr_t stream) {
    if (n < 0) throw std::invalid_argument("global_norm_squared: negative size");
    if (grads & 3) throw std::invalid_argument("global_norm_squared: grads is not 4-byte aligned");
    if (n > 0 && (scratch & 7))
        throw std::invalid_argument("global_norm_squared: scratch is not 8-byte aligned");
    const cudaStream_t s = as_stream(stream);
    int blocks = 0;
    if (n > 0) {
        const long long head = head_elements(grads, n);
        const long long nvec = (n - head) / 4;
        blocks = norm_blocks(n);
        global_norm_partials_kernel<<<blocks, NORM_THREADS, 0, s>>>(
            as_ptr<double>(scratch), as_ptr<const float>(grads), n, head, nvec);
        check_launch("global_norm_squared");
    }
    // With n == 0 this writes 0 without reading the (empty) scratch.
    global_norm_final_kernel<<<1, NORM_FINAL_THREADS, 0, s>>>(as_ptr<float>(out),
                                                             as_ptr<const double>(scratch), blocks);
    check_launch("global_norm_squared");
}

void adamw_update(uintptr_t params, uintptr_t grads, uintptr_t m, uintptr_t v,
                  uintptr_t norm_sq, long long n, long long n_decay, float lr, float beta1,
                  float beta2, float eps, float weight_decay, float max_norm, int step,
                  uintptr_t stream) {
    if (n < 0 || n_decay < 0 || n_decay > n)
        throw std::invalid_argument("adamw_update: need 0 <= n_decay <= n");
    if (step < 1) throw std::invalid_argument("adamw_update: step counts from 1");
    if ((params | grads | m | v | norm_sq) & 3)
        throw std::invalid_argument("adamw_update: a pointer is not 4-byte aligned");
    if (n == 0) return;

    AdamWHyper h;
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(beta1));
    h.one_minus_beta2 = static_cast<float>(1.0 - static_cast<double>(beta2));
    h.inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(beta1), step)));
    h.inv_bc2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(beta2), step)));
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.max_norm = max_norm;

    const uintptr_t off = params & 15;
    const bool same_offset = (grads & 15) == off && (m & 15) == off && (v & 15) == off;
    long long head = 0, nvec = 0;
    if (same_offset) {
        head = head_elements(params, n);
        nvec = (n - head) / 4;
    }
    const long long threads_needed = nvec + (n - 4 * nvec);
    const long long blocks = (threads_needed + ADAMW_THREADS - 1) / ADAMW_THREADS;
    if (blocks > INT_MAX) throw std::invalid_argument("adamw_update: n too large for one launch");
    adamw_update_kernel<<<static_cast<unsigned>(blocks), ADAMW_THREADS, 0, as_stream(stream)>>>(
        as_ptr<float>(params), as_ptr<const float>(grads), as_ptr<float>(m), as_ptr<float>(v),
        as_ptr<const float>(norm_sq), n, n_decay, head, nvec, h);
    check_launch("adamw_update");
}
