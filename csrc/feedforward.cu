// Feed-forward pieces around the cuBLAS matmuls: bias add, GELU, and the bias gradient.
//
// bias:  out[n, c] = x[n, c] + b[c]          =>  db[c] = sum_n dout[n, c]   (accumulated, +=)
//                                                dx    = dout (no kernel needed)
// GELU (tanh form): gelu(x) = 0.5 x (1 + tanh(u)),  u = s (x + a x^3),
//   s = sqrt(2/pi), a = 0.044715.
//   Since 0.5 (1 + tanh(u)) = sigmoid(2u), gelu(x) = x * sigma(z) with z = 2u. Written this way the
//   negative tail needs no 1 + tanh(u) (which cancels catastrophically for u << 0: 1 + tanh(-4.4)
//   loses 12 of fp32's 24 bits), and sigma is evaluated from e = exp(-|z|) in (0, 1], which never
//   overflows:  sigma(|z|) = 1/(1+e),  sigma(-|z|) = e/(1+e).
//   Backward: d gelu/dx = sigma(z) + x sigma'(z) z'(x), with
//   sigma'(z) = sigma(z) sigma(-z) = e/(1+e)^2 (the same for z and -z) and z'(x) = 2s (1 + 3a x^2).
//   gelu_backward: dx = dout * gelu'(x).

#include "common.cuh"
#include "launchers.h"

#include <algorithm>

namespace {

constexpr float kTwoS = 1.5957691216057308f;        // 2 sqrt(2/pi)
constexpr float kTwoSA = 0.07135481627260025f;      // 2 sqrt(2/pi) * 0.044715
constexpr float kSixSA = 0.21406444881780076f;      // 3 * kTwoSA: d/dx (kTwoSA x^3)

// Elements per 16-byte access for storage type T (4 for float, 8 for bf16).
template <typename T> constexpr int pack_width() { return static_cast<int>(16 / sizeof(T)); }

// ---- GELU math ---------------------------------------------------------------------------

// e = exp(-|z|) and r = 1/(1+e) for z = 2u; expf and the division are the accurate (not fast-math)
// versions, so sigma carries a few ulp of error.
__device__ __forceinline__ void gelu_parts(float x, float& z, float& e, float& r) {
    z = x * fmaf(kTwoSA, x * x, kTwoS);  // 2s (x + a x^3)
    e = expf(-fabsf(z));
    r = 1.0f / (1.0f + e);
}

__device__ __forceinline__ float gelu_value(float x) {
    float z, e, r;
    gelu_parts(x, z, e, r);
    return x * (z >= 0.0f ? r : e * r);
}

__device__ __forceinline__ float gelu_grad(float x) {
    float z, e, r;
    gelu_parts(x, z, e, r);
    const float sig = z >= 0.0f ? r : e * r;
    const float dsig = e * r * r;  // sigma(z) sigma(-z)
    // dsig > 0 implies |z| < ~104, so |x| < ~5 and x^2 cannot overflow; when dsig underflows to 0
    // the term is exactly 0, which the select keeps from becoming 0 * inf for |x| > 1.8e19.
    const float zprime = fmaf(kSixSA, x * x, kTwoS);
    return sig + (dsig > 0.0f ? x * dsig * zprime : 0.0f);
}

// ---- kernels -----------------------------------------------------------------------------

// 2-D blocks: threadIdx.x walks column units (W columns each), threadIdx.y walks rows, so the bias
// is loaded once per thread and no index needs a division. out may alias x: every element is read
// and then written by the same thread.
template <typename T, int W>
__global__ void bias_forward_kernel(T* out, const T* x, const T* bias, int N, int OC) {
    const int cu = blockIdx.x * blockDim.x + threadIdx.x;
    if (cu >= OC / W) return;
    const int c = cu * W;
    float b[W];
    load_vec(b, bias + c);
    const long long stride = (long long)gridDim.y * blockDim.y;
    for (long long r = (long long)blockIdx.y * blockDim.y + threadIdx.y; r < N; r += stride) {
        float v[W];
        load_vec(v, x + r * OC + c);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] += b[k];
        store_vec(out + r * OC + c, v);
    }
}

// Bias gradient, stage 1. Block (32, 8) owns 32 column units and one chunk of rows_per_chunk rows;
// each thread sums every 8th row of the chunk for its columns (a warp reads 32 consecutive units:
// 512 contiguous bytes for fp32), then the 8 row-partials are added in a fixed order and written to
// partial[chunk, col]. No atomics: the order of every addition depends only on (N, OC).
constexpr int kBbX = 32, kBbY = 8;
template <typename T, int W>
__global__ void __launch_bounds__(kBbX * kBbY)
    bias_backward_partial_kernel(float* partial, const T* dout, int N, int OC, int rows_per_chunk) {
    __shared__ float sm[kBbY][kBbX * W];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int cu = blockIdx.x * kBbX + tx;
    const long long r0 = (long long)blockIdx.y * rows_per_chunk;
    const long long r1 = min(r0 + rows_per_chunk, (long long)N);
    float acc[W];
#pragma unroll
    for (int k = 0; k < W; k++) acc[k] = 0.0f;
    if (cu < OC / W) {
        const T* p = dout + (long long)cu * W;
#pragma unroll 4
        for (long long r = r0 + ty; r < r1; r += kBbY) {
            float v[W];
            load_vec(v, p + r * OC);
#pragma unroll
            for (int k = 0; k < W; k++) acc[k] += v[k];
        }
    }
#pragma unroll
    for (int k = 0; k < W; k++) sm[ty][tx * W + k] = acc[k];
    __syncthreads();
    for (int c = ty * kBbX + tx; c < kBbX * W; c += kBbX * kBbY) {
        const long long col = (long long)blockIdx.x * kBbX * W + c;
        if (col < OC) {
            float s = 0.0f;
#pragma unroll
            for (int y = 0; y < kBbY; y++) s += sm[y][c];
            partial[(long long)blockIdx.y * OC + col] = s;
        }
    }
}

// Bias gradient, stage 2: dbias[col] += sum over chunks of partial[chunk, col]. Block (32, 16): 16
// threads per column take every 16th chunk (independent loads, so this pass is short even for
// hundreds of chunks), then one thread adds the 16 sums in a fixed order.
constexpr int kBfX = 32, kBfY = 16;
template <typename T>
__global__ void __launch_bounds__(kBfX * kBfY)
    bias_backward_final_kernel(T* dbias, const float* partial, int chunks, int OC) {
    __shared__ float sm[kBfY][kBfX + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * kBfX + tx;
    float acc = 0.0f;
    if (col < OC) {
#pragma unroll 4
        for (int g = ty; g < chunks; g += kBfY) acc += partial[(long long)g * OC + col];
    }
    sm[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < OC) {
        float s = 0.0f;
#pragma unroll
        for (int y = 0; y < kBfY; y++) s += sm[y][tx];
        store_f(dbias + col, load_f(dbias + col) + s);
    }
}

// One W-wide unit per thread (16-byte accesses when W > 1); the last partial unit is done
// element by element. out may alias x.
template <typename T, int W>
__global__ void gelu_forward_kernel(T* out, const T* x, long long n) {
    const long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * W;
    if (i + W <= n) {
        float v[W];
        load_vec(v, x + i);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = gelu_value(v[k]);
        store_vec(out + i, v);
    } else {
        for (long long j = i; j < n; j++) store_f(out + j, gelu_value(load_f(x + j)));
    }
}

// dx may alias dout (or x): each element is read and then written by the same thread.
template <typename T, int W>
__global__ void gelu_backward_kernel(T* dx, const T* x, const T* dout, long long n) {
    const long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * W;
    if (i + W <= n) {
        float v[W], g[W];
        load_vec(v, x + i);
        load_vec(g, dout + i);
#pragma unroll
        for (int k = 0; k < W; k++) g[k] *= gelu_grad(v[k]);
        store_vec(dx + i, g);
    } else {
        for (long long j = i; j < n; j++)
            store_f(dx + j, load_f(dout + j) * gelu_grad(load_f(x + j)));
    }
}

// ---- launch helpers ----------------------------------------------------------------------

template <typename T, int W>
void launch_bias_forward(uintptr_t out, uintptr_t x, uintptr_t bias, int N, int OC,
                         cudaStream_t s) {
    const int units = OC / W;
    const int bx = units >= 256 ? 256 : ((units + 31) / 32) * 32;
    const int by = 256 / bx;
    const dim3 block(bx, by);
    const dim3 grid(ceil_div(units, bx), static_cast<unsigned>(std::min(ceil_div(N, by), 65535)));
    bias_forward_kernel<T, W><<<grid, block, 0, s>>>(as_ptr<T>(out), as_ptr<const T>(x),
                                                     as_ptr<const T>(bias), N, OC);
}

// Rows per stage-1 chunk: 128 (16 loads per thread), more only if N would need over 65535 chunks
// (the grid's y limit). A function of N alone, so the reduction order is too.
int bias_backward_rows_per_chunk(int N) {
    const int chunks128 = ceil_div(N, 128);
    return 128 * ceil_div(chunks128, 65535);
}

template <typename T, int W>
void launch_bias_backward(uintptr_t dbias, uintptr_t scratch, uintptr_t dout, int N, int OC,
                          cudaStream_t s) {
    const int rows = bias_backward_rows_per_chunk(N);
    const int chunks = ceil_div(N, rows);
    const dim3 grid1(ceil_div(OC / W, kBbX), chunks);
    bias_backward_partial_kernel<T, W><<<grid1, dim3(kBbX, kBbY), 0, s>>>(
        as_ptr<float>(scratch), as_ptr<const T>(dout), N, OC, rows);
    bias_backward_final_kernel<T><<<ceil_div(OC, kBfX), dim3(kBfX, kBfY), 0, s>>>(
        as_ptr<T>(dbias), as_ptr<const float>(scratch), chunks, OC);
}

}  // namespace

// ---- launchers ---------------------------------------------------------------------------

void bias_forward(uintptr_t out, uintptr_t x, uintptr_t bias, int N, int OC, int dtype,
                  uintptr_t stream) {
    if (N <= 0 || OC <= 0) return;
    DISPATCH_STORAGE("bias_forward", dtype, [&] {
        constexpr int W = pack_width<scalar_t>();
        // Rows start 16-byte aligned only when OC is a multiple of the pack width.
        if (OC % W == 0 && aligned16(out) && aligned16(x) && aligned16(bias))
            launch_bias_forward<scalar_t, W>(out, x, bias, N, OC, as_stream(stream));
        else
            launch_bias_forward<scalar_t, 1>(out, x, bias, N, OC, as_stream(stream));
    });
    check_launch("bias_forward");
}

long long bias_backward_scratch_size(int N, int OC) {
    if (N <= 0 || OC <= 0) return 0;
    return (long long)ceil_div(N, bias_backward_rows_per_chunk(N)) * OC;
}

void bias_backward(uintptr_t dbias, uintptr_t scratch, uintptr_t dout, int N, int OC, int dtype,
                   uintptr_t stream) {
    if (N <= 0 || OC <= 0) return;  // an empty sum adds nothing
    DISPATCH_STORAGE("bias_backward", dtype, [&] {
        constexpr int W = pack_width<scalar_t>();
        if (OC % W == 0 && aligned16(dout))
            launch_bias_backward<scalar_t, W>(dbias, scratch, dout, N, OC, as_stream(stream));
        else
            launch_bias_backward<scalar_t, 1>(dbias, scratch, dout, N, OC, as_stream(stream));
    });
    check_launch("bias_backward");
}

void gelu_forward(uintptr_t out, uintptr_t x, long long n, int dtype, uintptr_t stream) {
    if (n <= 0) return;
    DISPATCH_STORAGE("gelu_forward", dtype, [&] {
        constexpr int W = pack_width<scalar_t>();
        const int threads = 256;
        const cudaStream_t s = as_stream(stream);
        auto* o = as_ptr<scalar_t>(out);
        const auto* xi = as_ptr<const scalar_t>(x);
        if (aligned16(out) && aligned16(x))
            gelu_forward_kernel<scalar_t, W><<<ceil_div(n, 1LL * W * threads), threads, 0, s>>>(
                o, xi, n);
        else
            gelu_forward_kernel<scalar_t, 1><<<ceil_div(n, threads), threads, 0, s>>>(o, xi, n);
    });
    check_launch("gelu_forward");
}

void gelu_backward(uintptr_t dx, uintptr_t x, uintptr_t dout, long long n, int dtype,
                   uintptr_t stream) {
    if (n <= 0) return;
    DISPATCH_STORAGE("gelu_backward", dtype, [&] {
        constexpr int W = pack_width<scalar_t>();
        const int threads = 256;
        const cudaStream_t s = as_stream(stream);
        auto* d = as_ptr<scalar_t>(dx);
        const auto* xi = as_ptr<const scalar_t>(x);
        const auto* g = as_ptr<const scalar_t>(dout);
        if (aligned16(dx) && aligned16(x) && aligned16(dout))
            gelu_backward_kernel<scalar_t, W><<<ceil_div(n, 1LL * W * threads), threads, 0, s>>>(
                d, xi, g, n);
        else
            gelu_backward_kernel<scalar_t, 1><<<ceil_div(n, threads), threads, 0, s>>>(d, xi, g, n);
    });
    check_launch("gelu_backward");
}
