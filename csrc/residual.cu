// Residual add: out = a + b, elementwise over n values.
// Backward: d a = d out and d b = d out, so it needs no kernel of its own; the model adds
// gradient streams with this same forward.

#include "common.cuh"
#include "launchers.h"

// Four elements per thread, through 16-byte accesses when the storage is float and every pointer
// is 16-byte aligned (a fresh CuPy allocation is; a view like a[1:] is not); a scalar tail
// covers n % 4.
template <typename T>
__global__ void residual_forward_kernel(T* out, const T* a, const T* b, long long n, bool vec) {
    long long i = (blockIdx.x * (long long)blockDim.x + threadIdx.x) * 4;
    if (i + 3 < n) {
        if (sizeof(T) == 4 && vec) {
            float4 x = *reinterpret_cast<const float4*>(a + i);
            float4 y = *reinterpret_cast<const float4*>(b + i);
            *reinterpret_cast<float4*>(out + i) = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
            return;
        } else {
            for (int k = 0; k < 4; k++) store_f(out + i + k, load_f(a + i + k) + load_f(b + i + k));
            return;
        }
    }
    for (; i < n; i++) store_f(out + i, load_f(a + i) + load_f(b + i));
}

void residual_forward(uintptr_t out, uintptr_t a, uintptr_t b, long long n, int dtype,
                      uintptr_t stream) {
    if (n == 0) return;
    const bool vec = ((out | a | b) % 16) == 0;
    DISPATCH_STORAGE("residual_forward", dtype, [&] {
        const int threads = 256;
        residual_forward_kernel<<<ceil_div(n, 4LL * threads), threads, 0, as_stream(stream)>>>(
            as_ptr<scalar_t>(out), as_ptr<const scalar_t>(a), as_ptr<const scalar_t>(b), n, vec);
    });
    check_launch("residual_forward");
}
