// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) and the dropout keep-mask built on it. Shared by dropout.cu and any kernel that drops
// values itself (the attention kernel's probability dropout), so every dropout site draws from
// one generator with one counter layout, and textgpt2/reference.py (dropout_mask) reproduces
// each mask bit for bit.
//
// Why a counter-based generator: the random words are a pure function of (key, counter), so the
// backward pass regenerates the forward mask instead of storing it, any thread can produce the
// bits for any element without shared state, runs are reproducible, and a resumed run draws the
// same masks as an uninterrupted one.
//
// Counter layout (THE contract; reference.dropout_mask mirrors it):
//   key     = (seed & 0xffffffff, seed >> 32)                        seed:   uint64
//   counter = (g & 0xffffffff, g >> 32, offset & 0xffffffff, offset >> 32)
//   with g = index >> 2 (the group of 4 consecutive elements) and offset: uint64, the stream id
//   of the dropout site (step / layer / site, chosen by the caller; distinct (seed, offset)
//   pairs give independent masks, and the element index never spills into the offset bits).
//   One Philox call yields 4 words r[0..3]; element `index` uses word r[index & 3].
//   keep  <=>  r[index & 3] >= threshold,  threshold = floor(p * 2^32) with p rounded to float
//   first, so P(keep) = 1 - threshold / 2^32 (= 1 - p to within 2^-32).
// Kept values are multiplied by scale = (float)(1 / (1 - (double)p)); dropped values become 0
// (a select, not a multiply by 0, so a dropped inf/NaN input gives 0 rather than NaN).
//
// Cost: one call is 10 rounds of two 32x32->64 multiplies plus xors (~40 instructions); use
// philox_dropout_keep4 / dropout_random4 where one thread owns 4 consecutive elements of a group.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

// Published constants of Philox-4x32: the two round multipliers and the Weyl key increments
// (golden ratio and sqrt(3) - 1, as 32-bit fractions).
constexpr uint32_t PHILOX_M4x32_0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M4x32_1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W32_0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W32_1 = 0xBB67AE85u;

__host__ __device__ __forceinline__ void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi,
                                                        uint32_t& lo) {
#ifdef __CUDA_ARCH__
    hi = __umulhi(a, b);
    lo = a * b;
#else
    const uint64_t prod = static_cast<uint64_t>(a) * b;
    hi = static_cast<uint32_t>(prod >> 32);
    lo = static_cast<uint32_t>(prod);
#endif
}

// One round: two multiplies, the high halves xor'd with the other two words and the key,
// words permuted so every output word depends on every input word after a few rounds.
__host__ __device__ __forceinline__ uint4 philox4x32_round(uint4 c, uint2 k) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(PHILOX_M4x32_0, c.x, hi0, lo0);
    philox_mulhilo(PHILOX_M4x32_1, c.z, hi1, lo1);
    return make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
}

// Philox-4x32 with 10 rounds (the variant Random123 recommends and whose known-answer vectors
// tests/test_reference.py checks through the NumPy twin). The key is bumped by the Weyl
// constants between rounds.
__host__ __device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            key.x += PHILOX_W32_0;
            key.y += PHILOX_W32_1;
        }
        counter = philox4x32_round(counter, key);
    }
    return counter;
}

// ---- dropout masks -------------------------------------------------------------------------

// Computed once on the host per launch (cheap on the device too, but it needs double).
// Requires 0 <= p < 1 as a float (ops.py checks): then p * 2^32 <= 2^32 - 2^8 fits uint32.
__host__ __device__ inline uint32_t dropout_threshold(float p) {
    return static_cast<uint32_t>(static_cast<double>(p) * 4294967296.0);  // floor, p >= 0
}
__host__ __device__ inline float dropout_scale(float p) {
    return static_cast<float>(1.0 / (1.0 - static_cast<double>(p)));
}

// The 4 random words of group g = index >> 2 of stream (seed, offset).
__host__ __device__ __forceinline__ uint4 dropout_random4(uint64_t seed, uint64_t offset,
                                                          uint64_t group) {
    const uint4 counter =
        make_uint4(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                   static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
    const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    return philox4x32_10(counter, key);
}

// Keep bits of the 4 elements 4g .. 4g+3: bit k set <=> element 4g + k is kept.
__host__ __device__ __forceinline__ unsigned philox_dropout_keep4(uint64_t seed, uint64_t offset,
                                                                  uint64_t group,
                                                                  uint32_t threshold) {
    const uint4 r = dropout_random4(seed, offset, group);
    return static_cast<unsigned>(r.x >= threshold) |
           (static_cast<unsigned>(r.y >= threshold) << 1) |
           (static_cast<unsigned>(r.z >= threshold) << 2) |
           (static_cast<unsigned>(r.w >= threshold) << 3);
}

// Whether element `index` of stream (seed, offset) is kept; P(keep) = 1 - threshold / 2^32.
// One full Philox call per element: prefer philox_dropout_keep4 when a thread handles a group.
__host__ __device__ __forceinline__ bool philox_dropout_keep(uint64_t seed, uint64_t offset,
                                                             uint64_t index, uint32_t threshold) {
    const uint4 r = dropout_random4(seed, offset, index >> 2);
    const unsigned k = static_cast<unsigned>(index & 3);
    // selects, not an indexed array, so the words stay in registers
    const uint32_t w = k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
    return w >= threshold;
}
