// Shared by every kernel file: error checks, the storage-type traits that let one templated
// kernel serve float and __nv_bfloat16, the dtype dispatch used by launchers, and warp/block
// reductions.
#pragma once

#include <cstdint>
#include <cstring>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

// Raised as RuntimeError on the Python side (pybind11 translates std::runtime_error).
inline void throw_cuda_error(const char* op, cudaError_t err) {
    throw std::runtime_error(std::string(op) + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

// After every launch: a bad launch configuration (or an earlier asynchronous fault) surfaces
// here, named after the launcher, instead of at some later unrelated call.
inline void check_launch(const char* op) {
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw_cuda_error(op, err);
}

#define CUDA_CHECK(op, call)                          \
    do {                                              \
        cudaError_t err_ = (call);                    \
        if (err_ != cudaSuccess) throw_cuda_error(op, err_); \
    } while (0)

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
template <typename T> inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// 16-byte vector accesses need every pointer they touch on a 16-byte boundary.
inline bool aligned16(uintptr_t p) { return p % 16 == 0; }

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Dynamic shared memory above 48 KB must be opted into per kernel and device. Done once per
// (kernel, device), so later launches (and CUDA-graph captures) make no extra runtime calls; a
// GPU with less shared memory per block than a kernel needs gets a clear error instead of a
// failed launch.
template <typename Kernel> void set_smem(const char* op, Kernel kernel, int bytes) {
    int dev = 0;
    CUDA_CHECK(op, cudaGetDevice(&dev));
    static std::mutex mu;
    static std::set<std::pair<const void*, int>> done;
    const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
    std::lock_guard<std::mutex> lock(mu);
    if (done.count(key)) return;
    int optin = 0;
    CUDA_CHECK(op, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (bytes > optin)
        throw std::runtime_error(std::string(op) + ": needs " + std::to_string(bytes) +
                                 " bytes of shared memory per block, this GPU allows " +
                                 std::to_string(optin));
    CUDA_CHECK(op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done.insert(key);
}

// ---- cluster and programmatic dependent launches (Hopper and later) --------------------------
// A kernel launched as `dependent` may start while the kernel before it in the stream is still
// running, once every block of that kernel has called pdl_launch_dependents() (or exited). It
// must call pdl_wait() before it reads anything the earlier kernel writes; work before the wait
// (loads of inputs that were ready before the earlier kernel began) overlaps with it. On older
// GPUs both calls compile to nothing (launch with dependent = false there).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Thread-block clusters and programmatic dependent launch both came with compute capability 9.0.
inline bool hopper_or_later(const char* op) {
    int dev = 0, major = 0;
    CUDA_CHECK(op, cudaGetDevice(&dev));
    CUDA_CHECK(op, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    return major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), in clusters of `cluster` blocks (1: none) and as
// a dependent launch if `dependent`.
template <typename... Params, typename... Args>
void launch_ex(const char* op, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
               cudaStream_t stream, int cluster, bool dependent, Args... args) {
    cudaLaunchAttribute attr[2];
    unsigned n = 0;
    if (cluster > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n].val.clusterDim.x = cluster;
        attr[n].val.clusterDim.y = 1;
        attr[n].val.clusterDim.z = 1;
        n++;
    }
    if (dependent) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = n;
    CUDA_CHECK(op, cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

// ---- storage types -------------------------------------------------------------------------
// Kernels compute in float and convert at loads and stores, so the same code handles fp32 and
// bf16 storage. DType codes are what ops.py passes across the binding.
enum DType : int { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

template <typename T> struct StorageTraits;
template <> struct StorageTraits<float> {
    static constexpr const char* name = "float32";
    __device__ __forceinline__ static float to_float(float x) { return x; }
    __device__ __forceinline__ static float from_float(float x) { return x; }
};
template <> struct StorageTraits<__nv_bfloat16> {
    static constexpr const char* name = "bfloat16";
    __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
};
template <typename T> __device__ __forceinline__ float load_f(const T* p) {
    return StorageTraits<T>::to_float(*p);
}
template <typename T> __device__ __forceinline__ void store_f(T* p, float x) {
    *p = StorageTraits<T>::from_float(x);
}

// VEC consecutive values of storage type T as floats: one 16-byte access when VEC*sizeof(T) is
// 16 (the caller guarantees the alignment; the launchers check it), else VEC scalar accesses.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(float (&dst)[VEC], const T* src) {
    if constexpr (VEC * sizeof(T) == 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        T v[VEC];
        memcpy(v, &raw, 16);
#pragma unroll
        for (int k = 0; k < VEC; k++) dst[k] = StorageTraits<T>::to_float(v[k]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) dst[k] = load_f(src + k);
    }
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const float (&src)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        T v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) v[k] = StorageTraits<T>::from_float(src[k]);
        uint4 raw;
        memcpy(&raw, v, 16);
        *reinterpret_cast<uint4*>(dst) = raw;
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) store_f(dst + k, src[k]);
    }
}

// Runs `body` with `scalar_t` bound to the storage type named by `dtype`. Only float32 is
// instantiated for now; bf16 kernels are the same templates, enabled here when the mixed
// precision path lands (ops.py rejects bf16 before it gets this far).
#define DISPATCH_STORAGE(op, dtype, ...)                                               \
    do {                                                                               \
        if ((dtype) == DTYPE_F32) {                                                    \
            using scalar_t = float;                                                    \
            __VA_ARGS__();                                                             \
        } else {                                                                       \
            throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + \
                                        std::to_string(dtype));                        \
        }                                                                              \
    } while (0)

// ---- reductions ----------------------------------------------------------------------------
template <typename T>  // float or double
__device__ __forceinline__ T warp_sum(T x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Reduction over the whole block (blockDim.x a multiple of 32, at most 1024) by a warp
// reduction applied twice (lanes, then warps); every thread gets the result. `scratch` is 32
// elements of shared memory. The order is fixed, so the result is the same bits on every run.
template <typename T, typename WarpReduce>
__device__ inline T block_reduce(T x, T* scratch, T identity, WarpReduce warp_reduce) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    x = warp_reduce(x);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < nwarps ? scratch[lane] : identity;
    return warp_reduce(x);
}
template <typename T>
__device__ inline T block_sum(T x, T* scratch) {
    return block_reduce(x, scratch, T(0), [](T v) { return warp_sum(v); });
}
__device__ inline float block_max(float x, float* scratch) {
    return block_reduce(x, scratch, -INFINITY, [](float v) { return warp_max(v); });
}
