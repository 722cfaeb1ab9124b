// Layernorm over the last axis (rows of C values).
//
// Forward:  mean = sum_c x_c / C,  var = sum_c (x_c - mean)^2 / C,  rstd = 1 / sqrt(var + eps),
//           xhat_c = (x_c - mean) * rstd,  out_c = xhat_c * w_c + b_c.   mean, rstd saved (fp32).
// Backward: with g_c = dout_c * w_c and, since mean and rstd both depend on every x_k,
//             d xhat_c / d x_k = rstd * (delta_ck - 1/C - xhat_c * xhat_k / C):
//             dx_k = sum_c g_c * d xhat_c / d x_k
//                  = rstd * (g_k - mean_c(g_c) - xhat_k * mean_c(g_c * xhat_c)),
//           dw_c += sum over rows of dout_c * xhat_c,  db_c += sum over rows of dout_c.
//
// One warp per row with the row held in registers (x read once, 16-byte accesses where C % 4 == 0
// and the pointers are aligned), the variance taken as the mean of squared deviations from the
// registers (no E[x^2] - mean^2 cancellation). Rows longer than the register path's 2048 (vector)
// or 512 (scalar) values take a looped kernel that re-reads the row.
// The parameter gradients are deterministic with no atomics: each warp sums its rows into a
// warp-private shared-memory row, the block adds its warps in warp order into one scratch row per
// block, and a second kernel adds the blocks' rows in block order to dweight/dbias.

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace {

// Register path: lane l holds the VEC-wide slots i*32 + l, i < NPL, of its row (coalesced per i).
// C <= 32 * NPL * VEC; slots past C hold zeros and are masked out of every sum.
constexpr int kFwdWarps = 8;        // rows per forward block
constexpr int kMaxBwdBlocks = 512;  // scratch rows of per-block parameter-gradient partials
constexpr int kReduceWarps = 16;    // warps per block of the final parameter-gradient pass

template <typename T, int VEC, int NPL>
__global__ void __launch_bounds__(kFwdWarps * 32)
layernorm_forward_kernel(T* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                         const T* __restrict__ x, const T* __restrict__ weight,
                         const T* __restrict__ bias, int N, int C, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * kFwdWarps + threadIdx.x / 32;
    if (row >= N) return;  // whole warp
    const T* xr = x + (long long)row * C;
    float v[NPL][VEC];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int c = (i * 32 + lane) * VEC;
        if (c < C) {
            load_vec<T, VEC>(v[i], xr + c);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; k++) v[i][k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < VEC; k++) sum += v[i][k];
    }
    const float m = warp_sum(sum) / (float)C;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        if ((i * 32 + lane) * VEC < C) {
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                const float d = v[i][k] - m;
                sq += d * d;
            }
        }
    }
    const float r = 1.0f / sqrtf(warp_sum(sq) / (float)C + eps);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
    T* outr = out + (long long)row * C;
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int c = (i * 32 + lane) * VEC;
        if (c < C) {
            float w[VEC], b[VEC], o[VEC];
            load_vec<T, VEC>(w, weight + c);
            load_vec<T, VEC>(b, bias + c);
#pragma unroll
            for (int k = 0; k < VEC; k++) o[k] = (v[i][k] - m) * r * w[k] + b[k];
            store_vec<T, VEC>(outr + c, o);
        }
    }
}

// Any C: a warp per row, three passes over the row (mean, variance, output); the re-reads mostly
// hit L1/L2.
template <typename T, int VEC>
__global__ void __launch_bounds__(kFwdWarps * 32)
layernorm_forward_looped_kernel(T* __restrict__ out, float* __restrict__ mean,
                                float* __restrict__ rstd, const T* __restrict__ x,
                                const T* __restrict__ weight, const T* __restrict__ bias, int N,
                                int C, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * kFwdWarps + threadIdx.x / 32;
    if (row >= N) return;
    const T* xr = x + (long long)row * C;
    float sum = 0.0f;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float v[VEC];
        load_vec<T, VEC>(v, xr + c);
#pragma unroll
        for (int k = 0; k < VEC; k++) sum += v[k];
    }
    const float m = warp_sum(sum) / (float)C;
    float sq = 0.0f;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float v[VEC];
        load_vec<T, VEC>(v, xr + c);
#pragma unroll
        for (int k = 0; k < VEC; k++) sq += (v[k] - m) * (v[k] - m);
    }
    const float r = 1.0f / sqrtf(warp_sum(sq) / (float)C + eps);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
    T* outr = out + (long long)row * C;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
        float v[VEC], w[VEC], b[VEC], o[VEC];
        load_vec<T, VEC>(v, xr + c);
        load_vec<T, VEC>(w, weight + c);
        load_vec<T, VEC>(b, bias + c);
#pragma unroll
        for (int k = 0; k < VEC; k++) o[k] = (v[k] - m) * r * w[k] + b[k];
        store_vec<T, VEC>(outr + c, o);
    }
}

// Warps per backward block (up to 4): the warp-private accumulators, 2 * 32*NPL*VEC floats per
// warp, stay within the 48 KB (12288 floats) of static shared memory.
template <int VEC, int NPL>
constexpr int kBwdWarps = 192 / (NPL * VEC) >= 4 ? 4 : (192 / (NPL * VEC) >= 1 ? 192 / (NPL * VEC) : 1);

// Block b handles rows [b*rows_per_block, ...), warp w every W-th of them. Writes dx and the
// block's partial (dweight | dbias) row: partial[b * 2C + c], c < C dweight, c >= C dbias.
template <typename T, int VEC, int NPL>
__global__ void __launch_bounds__(kBwdWarps<VEC, NPL> * 32)
layernorm_backward_kernel(T* __restrict__ dx, float* __restrict__ partial,
                          const T* __restrict__ dout, const T* __restrict__ x,
                          const T* __restrict__ weight, const float* __restrict__ mean,
                          const float* __restrict__ rstd, int N, int C, int rows_per_block) {
    constexpr int W = kBwdWarps<VEC, NPL>;
    constexpr int CMAX = 32 * NPL * VEC;
    __shared__ __align__(16) float acc[W][2][CMAX];  // warp-private dweight / dbias sums
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float* aw = acc[warp][0];
    float* ab = acc[warp][1];
    // Each lane only ever touches its own slots, so the warp needs no synchronization on them.
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int c = (i * 32 + lane) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; k++) aw[c + k] = ab[c + k] = 0.0f;
    }
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(r0 + rows_per_block, N);
    const float inv_c = 1.0f / (float)C;
    for (int row = r0 + warp; row < r1; row += W) {
        const T* xr = x + (long long)row * C;
        const T* gr = dout + (long long)row * C;
        float xh[NPL][VEC], g[NPL][VEC];
#pragma unroll
        for (int i = 0; i < NPL; i++) {
            const int c = (i * 32 + lane) * VEC;
            if (c < C) {
                load_vec<T, VEC>(xh[i], xr + c);
                load_vec<T, VEC>(g[i], gr + c);
            }
        }
        const float m = mean[row], rs = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
#pragma unroll
        for (int i = 0; i < NPL; i++) {
            const int c = (i * 32 + lane) * VEC;
            if (c < C) {
                float w[VEC];
                load_vec<T, VEC>(w, weight + c);
#pragma unroll
                for (int k = 0; k < VEC; k++) {
                    xh[i][k] = (xh[i][k] - m) * rs;
                    aw[c + k] += g[i][k] * xh[i][k];
                    ab[c + k] += g[i][k];
                    g[i][k] *= w[k];  // from here on g = dout * w
                    sg += g[i][k];
                    sgx += g[i][k] * xh[i][k];
                }
            }
        }
        const float mg = warp_sum(sg) * inv_c, mgx = warp_sum(sgx) * inv_c;
        T* dxr = dx + (long long)row * C;
#pragma unroll
        for (int i = 0; i < NPL; i++) {
            const int c = (i * 32 + lane) * VEC;
            if (c < C) {
                float d[VEC];
#pragma unroll
                for (int k = 0; k < VEC; k++) d[k] = (g[i][k] - mg - xh[i][k] * mgx) * rs;
                store_vec<T, VEC>(dxr + c, d);
            }
        }
    }
    __syncthreads();
    float* out = partial + (long long)blockIdx.x * 2 * C;
    for (int col = threadIdx.x; col < 2 * C; col += blockDim.x) {
        const int which = col >= C ? 1 : 0;
        const int c = col - which * C;
        float s = acc[0][which][c];
        for (int w = 1; w < W; w++) s += acc[w][which][c];
        out[col] = s;
    }
}

// Any C: one warp per block, three passes over each row; the warp accumulates straight into its
// block's scratch row (each lane owns its columns there, so there is no race).
template <typename T, int VEC>
__global__ void __launch_bounds__(32)
layernorm_backward_looped_kernel(T* __restrict__ dx, float* __restrict__ partial,
                                 const T* __restrict__ dout, const T* __restrict__ x,
                                 const T* __restrict__ weight, const float* __restrict__ mean,
                                 const float* __restrict__ rstd, int N, int C,
                                 int rows_per_block) {
    const int lane = threadIdx.x;
    float* pw = partial + (long long)blockIdx.x * 2 * C;
    float* pb = pw + C;
    for (int c = lane * VEC; c < C; c += 32 * VEC) {
#pragma unroll
        for (int k = 0; k < VEC; k++) pw[c + k] = pb[c + k] = 0.0f;
    }
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(r0 + rows_per_block, N);
    const float inv_c = 1.0f / (float)C;
    for (int row = r0; row < r1; row++) {
        const T* xr = x + (long long)row * C;
        const T* gr = dout + (long long)row * C;
        const float m = mean[row], rs = rstd[row];
        float sg = 0.0f, sgx = 0.0f;
        for (int c = lane * VEC; c < C; c += 32 * VEC) {
            float xv[VEC], gv[VEC], w[VEC];
            load_vec<T, VEC>(xv, xr + c);
            load_vec<T, VEC>(gv, gr + c);
            load_vec<T, VEC>(w, weight + c);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                const float xh = (xv[k] - m) * rs;
                pw[c + k] += gv[k] * xh;
                pb[c + k] += gv[k];
                sg += gv[k] * w[k];
                sgx += gv[k] * w[k] * xh;
            }
        }
        const float mg = warp_sum(sg) * inv_c, mgx = warp_sum(sgx) * inv_c;
        T* dxr = dx + (long long)row * C;
        for (int c = lane * VEC; c < C; c += 32 * VEC) {
            float xv[VEC], gv[VEC], w[VEC], d[VEC];
            load_vec<T, VEC>(xv, xr + c);
            load_vec<T, VEC>(gv, gr + c);
            load_vec<T, VEC>(w, weight + c);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                const float xh = (xv[k] - m) * rs;
                d[k] = (gv[k] * w[k] - mg - xh * mgx) * rs;
            }
            store_vec<T, VEC>(dxr + c, d);
        }
    }
}

// dweight[c] += sum_b partial[b][c], dbias[c] += sum_b partial[b][C + c], b in a fixed order:
// warp w of a block sums a contiguous range of blocks' rows for 32 columns, then warp 0 adds the
// warps' sums in warp order.
template <typename T>
__global__ void __launch_bounds__(kReduceWarps * 32)
layernorm_param_grad_kernel(T* __restrict__ dweight, T* __restrict__ dbias,
                            const float* __restrict__ partial, int nblocks, int C) {
    __shared__ float red[kReduceWarps][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int col = blockIdx.x * 32 + lane;
    const int b0 = warp * nblocks / kReduceWarps, b1 = (warp + 1) * nblocks / kReduceWarps;
    float s = 0.0f;
    if (col < 2 * C) {
#pragma unroll 4
        for (int b = b0; b < b1; b++) s += partial[(long long)b * 2 * C + col];
    }
    red[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && col < 2 * C) {
        for (int w = 1; w < kReduceWarps; w++) s += red[w][lane];
        T* dst = col < C ? dweight + col : dbias + (col - C);
        store_f(dst, load_f(dst) + s);
    }
}

// ---- launch plumbing -----------------------------------------------------------------------

// Smallest instantiated slots-per-lane that covers `need`, 0 if the row is too long.
inline int pick_npl(int need) {
    for (int npl : {1, 2, 3, 4, 6, 8, 12, 16})
        if (npl >= need) return npl;
    return 0;
}

// Calls f(std::integral_constant<int, VEC>): VEC = kVec where the rows are read in 16-byte
// vectors, else 1.
template <int kVec, typename F> void with_vec(bool vec, F&& f) {
    if (vec) f(std::integral_constant<int, kVec>{});
    else f(std::integral_constant<int, 1>{});
}

// Calls f(std::integral_constant<int, NPL>) for the runtime npl.
template <typename F> void with_npl(int npl, F&& f) {
    switch (npl) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 8: f(std::integral_constant<int, 8>{}); break;
        case 12: f(std::integral_constant<int, 12>{}); break;
        case 16: f(std::integral_constant<int, 16>{}); break;
        default: throw std::logic_error("layernorm: no kernel for npl " + std::to_string(npl));
    }
}

void check_sizes(const char* op, int N, int C) {
    if (N < 0 || C <= 0)
        throw std::invalid_argument(std::string(op) + ": N must be >= 0 and C positive");
}

// Backward grid: a block per rows_per_block rows, at most kMaxBwdBlocks blocks (the scratch rows).
struct BwdGrid {
    int blocks, rows_per_block;
};
BwdGrid bwd_grid(int N, int rows_per_warp_group) {
    int blocks = std::min<long long>(ceil_div(N, rows_per_warp_group), kMaxBwdBlocks);
    const int rpb = ceil_div(N, blocks);
    return {ceil_div(N, rpb), rpb};
}

}  // namespace

void layernorm_forward(uintptr_t out, uintptr_t mean, uintptr_t rstd, uintptr_t x,
                       uintptr_t weight, uintptr_t bias, int N, int C, float eps, int dtype,
                       uintptr_t stream) {
    check_sizes("layernorm_forward", N, C);
    if (N == 0) return;
    DISPATCH_STORAGE("layernorm_forward", dtype, [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = C % kVec == 0 && aligned16(out) && aligned16(x) && aligned16(weight) &&
                         aligned16(bias);
        const int slots = vec ? C / kVec : C;
        const int npl = pick_npl(ceil_div(slots, 32));
        const dim3 grid(ceil_div(N, kFwdWarps)), block(kFwdWarps * 32);
        cudaStream_t st = as_stream(stream);
        auto args = [&](auto kernel) {
            kernel<<<grid, block, 0, st>>>(as_ptr<scalar_t>(out), as_ptr<float>(mean),
                                           as_ptr<float>(rstd), as_ptr<const scalar_t>(x),
                                           as_ptr<const scalar_t>(weight),
                                           as_ptr<const scalar_t>(bias), N, C, eps);
        };
        with_vec<kVec>(vec, [&](auto v) {
            constexpr int VEC = decltype(v)::value;
            if (npl == 0)
                args(layernorm_forward_looped_kernel<scalar_t, VEC>);
            else
                with_npl(npl, [&](auto n) {
                    args(layernorm_forward_kernel<scalar_t, VEC, decltype(n)::value>);
                });
        });
    });
    check_launch("layernorm_forward");
}

long long layernorm_backward_scratch_size(int N, int C) {
    check_sizes("layernorm_backward_scratch_size", N, C);
    // Every path uses at most min(N, kMaxBwdBlocks) blocks, each with one 2C row.
    return (long long)std::max(1, std::min(N, kMaxBwdBlocks)) * 2 * C;
}

void layernorm_backward(uintptr_t dx, uintptr_t dweight, uintptr_t dbias, uintptr_t scratch,
                        uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t mean,
                        uintptr_t rstd, int N, int C, int dtype, uintptr_t stream) {
    check_sizes("layernorm_backward", N, C);
    if (N == 0) return;
    DISPATCH_STORAGE("layernorm_backward", dtype, [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = C % kVec == 0 && aligned16(dx) && aligned16(dout) && aligned16(x) &&
                         aligned16(weight);
        const int slots = vec ? C / kVec : C;
        const int npl = pick_npl(ceil_div(slots, 32));
        cudaStream_t st = as_stream(stream);
        float* partial = as_ptr<float>(scratch);
        int nblocks = 0;
        auto args = [&](auto kernel, BwdGrid g, int threads) {
            nblocks = g.blocks;
            kernel<<<g.blocks, threads, 0, st>>>(
                as_ptr<scalar_t>(dx), partial, as_ptr<const scalar_t>(dout),
                as_ptr<const scalar_t>(x), as_ptr<const scalar_t>(weight),
                as_ptr<const float>(mean), as_ptr<const float>(rstd), N, C, g.rows_per_block);
        };
        with_vec<kVec>(vec, [&](auto v) {
            constexpr int VEC = decltype(v)::value;
            if (npl == 0) {
                // one warp per block: as many rows per block as the scratch rows allow
                args(layernorm_backward_looped_kernel<scalar_t, VEC>, bwd_grid(N, 1), 32);
            } else {
                with_npl(npl, [&](auto n) {
                    constexpr int NPL = decltype(n)::value;
                    constexpr int W = kBwdWarps<VEC, NPL>;
                    args(layernorm_backward_kernel<scalar_t, VEC, NPL>, bwd_grid(N, W), W * 32);
                });
            }
        });
        layernorm_param_grad_kernel<scalar_t><<<ceil_div(2LL * C, 32), kReduceWarps * 32, 0, st>>>(
            as_ptr<scalar_t>(dweight), as_ptr<scalar_t>(dbias), partial, nblocks, C);
    });
    check_launch("layernorm_backward");
}
