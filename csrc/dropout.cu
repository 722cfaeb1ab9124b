// Dropout (inverted): out = x * keep / (1 - p), elementwise over n values, where keep is a
// Bernoulli(1 - p) mask drawn from Philox-4x32-10 keyed by (seed, offset) and the element index
// (counter layout in philox.cuh). Dividing by 1 - p keeps E[out] = x, so evaluation, which
// drops nothing, needs no rescaling.
// Backward: out_i = x_i * keep_i * s with s = 1/(1-p) is linear in x_i alone, so
// dx_i = dout_i * keep_i * s: the same kernel applied to dout with the same mask, which it
// regenerates from (seed, offset, i) instead of reading a stored mask (no mask memory, no extra
// traffic). Dropped elements are written as 0 by a select, so a dropped inf/NaN gives 0.

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "philox.cuh"

// One thread per group of 4 consecutive elements (grid-stride beyond 2^24 groups): the group's
// single Philox call gives exactly the 4 words those elements need, and the 4 values move as one
// 16-byte access when VEC (float storage, both pointers 16-byte aligned). The tail group
// (n % 4 elements) and misaligned views take the scalar path, with the same mask: element i
// always uses word i & 3 of group i >> 2, whichever path runs. out may alias x (each thread
// reads its elements before writing them, and no element is touched by two threads).
template <typename T, bool VEC>
__global__ void dropout_kernel(T* out, const T* x, long long n, uint64_t seed, uint64_t offset,
                               uint32_t threshold, float scale) {
    const long long groups = (n + 3) / 4;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long g = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; g < groups;
         g += stride) {
        const long long i = g * 4;
        if constexpr (VEC) {
            static_assert(std::is_same_v<T, float>, "the 16-byte path is for float storage");
            if (i + 3 < n) {
                float4 v = *reinterpret_cast<const float4*>(x + i);  // issue the load first
                const unsigned keep = philox_dropout_keep4(seed, offset, g, threshold);
                v.x = (keep & 1u) ? v.x * scale : 0.0f;
                v.y = (keep & 2u) ? v.y * scale : 0.0f;
                v.z = (keep & 4u) ? v.z * scale : 0.0f;
                v.w = (keep & 8u) ? v.w * scale : 0.0f;
                *reinterpret_cast<float4*>(out + i) = v;
                continue;
            }
        }
        const unsigned keep = philox_dropout_keep4(seed, offset, g, threshold);
        for (int k = 0; k < 4 && i + k < n; k++) {
            store_f(out + i + k, ((keep >> k) & 1u) ? load_f(x + i + k) * scale : 0.0f);
        }
    }
}

// Shared by forward and backward: they are the same map on different arrays.
static void dropout_launch(const char* op, uintptr_t out, uintptr_t x, uint64_t seed,
                           uint64_t offset, long long n, float p, int dtype, uintptr_t stream) {
    if (!(p >= 0.0f && p < 1.0f)) {  // ops.py rejects these; never let a bad threshold through
        throw std::invalid_argument(std::string(op) + ": p must satisfy 0 <= p < 1, got " +
                                    std::to_string(p));
    }
    if (n <= 0) return;
    DISPATCH_STORAGE(op, dtype, [&] {
        if (p == 0.0f) {  // identity: a copy, or nothing at all in place
            if (out != x) {
                CUDA_CHECK(op, cudaMemcpyAsync(as_ptr<scalar_t>(out), as_ptr<const scalar_t>(x),
                                               static_cast<size_t>(n) * sizeof(scalar_t),
                                               cudaMemcpyDeviceToDevice, as_stream(stream)));
            }
            return;
        }
        const uint32_t threshold = dropout_threshold(p);
        const float scale = dropout_scale(p);
        const int threads = 256;
        const long long groups = (n + 3) / 4;
        const long long blocks = std::min<long long>((groups + threads - 1) / threads, 1LL << 16);
        if constexpr (std::is_same_v<scalar_t, float>) {
            if (out % 16 == 0 && x % 16 == 0) {  // views into a buffer may be misaligned
                dropout_kernel<scalar_t, true><<<static_cast<int>(blocks), threads, 0,
                                                 as_stream(stream)>>>(
                    as_ptr<scalar_t>(out), as_ptr<const scalar_t>(x), n, seed, offset, threshold,
                    scale);
                return;
            }
        }
        dropout_kernel<scalar_t, false><<<static_cast<int>(blocks), threads, 0,
                                          as_stream(stream)>>>(
            as_ptr<scalar_t>(out), as_ptr<const scalar_t>(x), n, seed, offset, threshold, scale);
    });
    check_launch(op);
}

void dropout_forward(uintptr_t out, uintptr_t x, uint64_t seed, uint64_t offset, long long n,
                     float p, int dtype, uintptr_t stream) {
    dropout_launch("dropout_forward", out, x, seed, offset, n, p, dtype, stream);
}

void dropout_backward(uintptr_t dx, uintptr_t dout, uint64_t seed, uint64_t offset, long long n,
                      float p, int dtype, uintptr_t stream) {
    dropout_launch("dropout_backward", dx, dout, seed, offset, n, p, dtype, stream);
}
