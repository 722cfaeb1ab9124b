// Causal multi-head attention, flash style: forward and backward without any T x T buffer.
//
// Layout: qkv (B, T, 3C) = [q | k | v] along the last axis, head h at columns h*d .. h*d+d-1 of
// each part (d = C/H); out (B, T, C) with head h at columns h*d; lse (B, H, T) float32.
//
// Forward, per (batch, head), with q_i, k_j, v_j the head's rows and s = 1/sqrt(d):
//   S_ij = s q_i.k_j for j <= i (j > i masked),   L_i = log sum_{j<=i} exp(S_ij)   (saved: lse)
//   P_ij = exp(S_ij - L_i),   o_i = sum_j P_ij v_j
// computed one (query tile, key tile) pair at a time with the online softmax: a running row max
// m and row sum l; each new key tile rescales the partial o and l by exp(m_old - m_new).
//
// Backward, with dO = dL/d out:
//   dv_j  = sum_i P_ij dO_i
//   dP_ij = dO_i . v_j
//   dS_ij = P_ij (dP_ij - D_i),  D_i = sum_j P_ij dP_ij = dO_i . sum_j P_ij v_j = dO_i . o_i
//           (the softmax Jacobian: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik))
//   dq_i  = s sum_j dS_ij k_j,   dk_j = s sum_i dS_ij q_i
// P is recomputed tile by tile from q, k and the saved L. Three kernels, no atomics, so the
// result is the same bits on every run:
//   1. D_i = dO_i . o_i per query row (into the scratch buffer);
//   2. per key tile: dk, dv accumulated in registers over the query tiles that can see it;
//   3. per query tile: dq accumulated in registers over the key tiles it can see.
//
// Math: tensor cores through mma.sync.m16n8k8 TF32 (inputs rounded to TF32, 10-bit mantissa,
// products accumulated in fp32), softmax in fp32 with exp2 (scores scaled by s*log2(e)). Against
// a float64 reference the outputs agree to ~1e-3 relative (TF32 input rounding, 2^-11).
//
// Tiling (d = head dim, 4 warps = 128 threads per block, each warp owns 16 rows of an m16 tile):
//   forward   64 query rows per block, key tiles of 64 (32 for d = 128), K/V double-buffered
//             through cp.async; q fragments live in registers for the whole block.
//             Shared memory 32 KB (d = 32) or 64 KB.
//   dk/dv     64 keys per block (16 per warp), query tiles of 64 (16 for d = 128) with their dO,
//             lse and D double-buffered; K, V tiles stay in shared memory. ~97 KB (49 KB d = 32).
//   dq        64 query rows per block (Q, dO, lse, D resident), key tiles of 64 (16 for d = 128)
//             double-buffered. ~97 KB (49 KB for d = 32).
// The d = 128 backward tiles are small so that its accumulators (dk and dv, 64 registers each)
// fit in 255 registers without spilling and two blocks share an SM.
// Grids put (batch, head) on x and the tile on y so the block scheduler (x fastest) starts the
// heavy tiles of every head first: late query tiles in the forward and dq kernels, early key
// tiles in the dk/dv kernel.
//
// Shared-memory tiles are rows of d floats in 16-byte chunks, chunk c of row r stored at chunk
// c ^ f(r), f(r) = ((r & 1) << 2) ^ (r & 6). Both fragment access patterns below are then free
// of bank conflicts without padding:
//   pattern A (operand whose contraction index is the head dim): lane (g, t) reads row g, chunk
//     4p + t  ->  in each 8-lane phase rows {2h, 2h+1}, chunks {4p..4p+3}.
//   pattern B (operand whose contraction index is the key/query, taken from an accumulator):
//     lane (g, t) reads rows 2t and 2t + 1, chunk 8q + g.
// Tiles are rounded to TF32 once after they land in shared memory (each thread rounds the
// chunks it copied), so fragment loads feed the MMA without per-use conversion.
//
// Fragment index maps (g = lane / 4, t = lane % 4; see the PTX ISA, mma.m16n8k8 .tf32):
//   A 16x8: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4);  B 8x8: b0 (t, g), b1 (t+4, g);
//   C 16x8: c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1).
// A sum over k may visit k in any order as long as A and B agree; the kernels use that freedom:
//   * head-dim contractions (q.k, dO.v): k-steps 2p and 2p+1 cover dims 16p..16p+15, logical
//     k = t is dim 16p + 4t + 2u and k = t+4 is dim 16p + 4t + 2u + 1 (u = k-step parity), so a
//     lane's four values for both k-steps are one float4 (chunk 4p + t);
//   * key/query contractions (P v, dS k, ...): logical k = t is index 8j + 2t and k = t+4 is
//     8j + 2t + 1, which are exactly the accumulator's c0/c1 columns, so an S/P accumulator
//     becomes the next A fragment in place: a = (c0, c2, c1, c3).
//   * output columns of those second products: n-tile 4q + r, column n is dim 32q + 4n + r, so
//     one float4 of B (chunk 8q + g) serves four n-tiles, and a lane's accumulators for rows g and
//     g+8 hold dims 32q + 8t .. 32q + 8t + 7: two float4 stores per row.
//
// Dropout on the probabilities (GPT-2 / nanoGPT attention dropout), p > 0 only:
//   O_i = sum_j M_ij r P_ij v_j,   M_ij in {0, 1} the keep mask, r = 1 / (1 - p)
// with P, L (lse) those of the undropped scores above: the softmax normalisation (row max, row
// sum, lse) never sees the mask, only the P V product does. Backward, with Pd = M o P r:
//   dv_j  = sum_i Pd_ij dO_i
//   dP_ij = dL/dP_ij = M_ij r (dO_i . v_j)          (dO_i . v_j is "dP dropped", one MMA as before)
//   dS_ij = P_ij (dP_ij - D_i),  D_i = sum_k P_ik dP_ik = dO_i . sum_k M_ik r P_ik v_k = dO_i . O_i
// so D_i = dO_i . o_i still holds, with o the dropped output the forward wrote, and kernel 1 is
// unchanged. The factor r is applied once at the end to o and to dv, and inside dS as
// M (dO.v) r; a dropped entry contributes P (0 - D) to dS (it still moved the softmax).
//
// The mask is not stored: every kernel regenerates it from Philox-4x32-10 (philox.cuh, the
// same generator and counter layout as dropout.cu and reference.dropout_mask) keyed by
// (seed, offset) with the element index
//   idx = ((b H + h) T + i) T + j          (i query, j key; all T x T entries, masked ones too)
// i.e. the mask is reference.dropout_mask(seed, offset, B*H*T*T, p) reshaped to (B, H, T, T).
// Keep function: the 4-wide one, philox_dropout_keep4(group = idx >> 2), element idx uses bit
// idx & 3. Groups follow idx, not rows: when T % 4 != 0 a group straddles rows i and i + 1, so
// a tile row [idx0, idx0 + n) spans n/4 groups plus one more when idx0 % 4 != 0; the helpers
// below compute the groups of a tile row as a whole and shift by idx0 & 3, so every element
// reads the word its own index names. One Philox call (~60 integer instructions) per 4
// elements is the floor this mask layout allows; the helpers reach it (plus the straddling
// group when T % 4 != 0) by splitting a tile row's groups over the lanes that hold it and
// OR-ing the keep bits together with shuffles:
//   forward, dq (rows = queries, a quad holds a row): quad_keep_rows, BC/16 calls per lane and
//     row (+1 on two lanes for straddling groups), 2 + 2 shuffles per row (64-bit for BC = 64);
//   dk/dv (rows = keys: 16 keys per warp x 8 queries per n-tile, consecutive idx runs down a
//     column): warp_keep_cols, one call per lane per n-tile (+1 on 8 lanes), 4 shuffles.
// In the backward kernels the keep bit is folded into the sign of the recomputed P (P >= 0;
// dropped entries are stored as -P), so no mask registers stay live across the dP MMA:
// dV takes max(s, 0), and dS = s (dPd r - D) for a stored s >= 0 (kept), s D for s < 0
// (dropped: P (0 - D) = -P D).
// p == 0 selects the DROP = false instantiations, which contain none of this code.
//
// bf16 storage: the same tiling with the m16n8k16 bf16 MMA and 8-element chunks; the kernels are
// templated on the storage type for that and only the float instantiation exists now.

#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

#include "common.cuh"
#include "launchers.h"
#include "philox.cuh"

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kRows = 64;      // query rows per forward / dq block, keys per dk/dv block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- small device helpers ------------------------------------------------------------------

__device__ __forceinline__ uint32_t tf32_bits(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float tf32_round(float x) { return __uint_as_float(tf32_bits(x)); }
__device__ __forceinline__ uint32_t bits(float x) { return __float_as_uint(x); }

// d += A * B for one 16x8x8 TF32 tile (fp32 accumulate).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros (rows past the sequence end).
__device__ __forceinline__ void cp_async16(float* smem, const float* gmem, int src_bytes) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem, int src_bytes) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are pending; the completed copies are
// then visible to this thread (other threads need a barrier).
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Offset in floats of chunk c (4 floats) of row r in a swizzled tile of D floats per row.
template <int D> __device__ __forceinline__ int swz(int r, int c) {
    return r * D + ((c ^ (((r & 1) << 2) ^ (r & 6))) << 2);
}
// Per-thread offsets for the two fragment access patterns, so that every load in the unrolled
// loops is base + compile-time immediate:
//   pattern A, chunk 4p + t of row r (and of rows r + 8i, which share f): with x = t ^ f(r),
//     the chunk lands at 4 (p ^ (x >> 2)) + (x & 3), i.e. 16p + off_even (p even) or
//     16p + off_odd (p odd) floats;
//   pattern B, chunk 8q + g of row r (r = 2t or 2t + 1, plus multiples of 8): f(r) < 8 leaves
//     8q alone, so the offset is 32q + off.
struct OffA {
    int even, odd;
};
template <int D> __device__ __forceinline__ OffA off_a(int r, int t) {
    const int x = t ^ (((r & 1) << 2) ^ (r & 6));
    const int e = x >> 2, lo = x & 3;
    return {r * D + 4 * lo + 16 * e, r * D + 4 * lo - 16 * e};
}
__device__ __forceinline__ int pick(const OffA& o, int p) { return (p & 1) ? o.odd : o.even; }
template <int D> __device__ __forceinline__ int off_b(int r, int g) {
    return r * D + 4 * (g ^ (((r & 1) << 2) ^ (r & 6)));
}
__device__ __forceinline__ float4 lds4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 ldg4(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float f4get(const float4& v, int r) {
    return r == 0 ? v.x : r == 1 ? v.y : r == 2 ? v.z : v.w;  // r is a compile-time constant
}

// acc += A B for one 8-wide slice of the contraction index: A is the 16x8 fragment `a`, B the 8
// rows of a swizzled [*, D] shared tile that start at `rows`, read with pattern B (offsets ob0,
// ob1 from off_b); acc holds the D output columns as D/8 accumulator tiles.
template <int D>
__device__ __forceinline__ void mma_rows_b(float (&acc)[D / 8][4], const uint32_t (&a)[4],
                                           const float* rows, int ob0, int ob1) {
#pragma unroll
    for (int q = 0; q < D / 32; ++q) {
        const float4 x0 = lds4(rows + 32 * q + ob0);
        const float4 x1 = lds4(rows + 32 * q + ob1);
#pragma unroll
        for (int r = 0; r < 4; ++r)
            mma_tf32(acc[4 * q + r], a, bits(f4get(x0, r)), bits(f4get(x1, r)));
    }
}

// acc = A B^T over D-long rows, both operands read with pattern A from swizzled [*, D] shared
// tiles: A is this warp's 16 rows starting at `a_rows` (offsets oa_r), B the 8 NJ rows starting at
// `b_rows` (offsets oa_g); acc holds the 16 x 8NJ result as NJ accumulator tiles.
template <int D, int NJ>
__device__ __forceinline__ void mma_abt(float (&acc)[NJ][4], const float* a_rows,
                                        const float* b_rows, const OffA& oa_r, const OffA& oa_g) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int p = 0; p < D / 16; ++p) {
        const float4 xa = lds4(a_rows + pick(oa_r, p) + 16 * p);
        const float4 xb = lds4(a_rows + 8 * D + pick(oa_r, p) + 16 * p);
        const uint32_t a0[4] = {bits(xa.x), bits(xb.x), bits(xa.y), bits(xb.y)};
        const uint32_t a1[4] = {bits(xa.z), bits(xb.z), bits(xa.w), bits(xb.w)};
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            const float4 y = lds4(b_rows + 8 * j * D + pick(oa_g, p) + 16 * p);
            mma_tf32(acc[j], a0, bits(y.x), bits(y.y));
            mma_tf32(acc[j], a1, bits(y.z), bits(y.w));
        }
    }
}

// Stores a warp's D output columns of rows r0 and r0 + 8 (elements 0,1 and 2,3 of its D/8
// accumulator tiles; this thread's columns are 32q + 8t .. 32q + 8t + 7), row r0 times s0 and row
// r0 + 8 times s1; rows at or past T are skipped.
template <int D>
__device__ __forceinline__ void store_rows(float* base, int ld, int r0, int T, int t,
                                           const float (&acc)[D / 8][4], float s0, float s1) {
#pragma unroll
    for (int q = 0; q < D / 32; ++q) {
        const int col = 32 * q + 8 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r0 + 8 * h;
            const float s = h ? s1 : s0;
            if (r < T) {
                float* p = base + r * ld + col;
                *reinterpret_cast<float4*>(p) =
                    make_float4(acc[4 * q][2 * h] * s, acc[4 * q + 1][2 * h] * s,
                                acc[4 * q + 2][2 * h] * s, acc[4 * q + 3][2 * h] * s);
                *reinterpret_cast<float4*>(p + 4) =
                    make_float4(acc[4 * q][2 * h + 1] * s, acc[4 * q + 1][2 * h + 1] * s,
                                acc[4 * q + 2][2 * h + 1] * s, acc[4 * q + 3][2 * h + 1] * s);
            }
        }
    }
}

// ---- dropout masks (see the opening comment) -------------------------------------------------

// What the DROP = true kernels need; built once per launch on the host from p.
struct DropArgs {
    uint64_t seed, offset;
    uint32_t threshold;  // keep <=> Philox word >= threshold (dropout_threshold(p))
    float scale;         // 1 / (1 - p) as float (dropout_scale(p))
};

template <int BC>
using KeepBits = typename std::conditional<(BC > 32), unsigned long long, uint32_t>::type;

__device__ __forceinline__ uint32_t keep4(const DropArgs& dr, unsigned long long group) {
    return philox_dropout_keep4(dr.seed, dr.offset, group, dr.threshold);
}

// Keep bits of two rows of BC consecutive elements, ia .. ia + BC - 1 (-> ka) and ib .. (-> kb),
// for the 4 lanes t of a quad, which must all call it with the same ia, ib. Bit k of the result
// (before the per-lane shift) is element ia + k; lane t gets it shifted right by 2t so that its
// own columns 8j + 2t + e sit at the compile-time bits 8j + e. Work split: the BC/4 whole
// groups from ia >> 2 go round-robin over the quad (BC/16 per lane and row), the group that
// straddles the row end (only when ia % 4 != 0, i.e. T % 4 != 0) goes to lane 0 (row A) or
// lane 1 (row B), so no lane makes more than BC/8 + 1 calls.
template <int BC>
__device__ __forceinline__ void quad_keep_rows(const DropArgs& dr, unsigned long long ia,
                                               unsigned long long ib, int t, KeepBits<BC>& ka,
                                               KeepBits<BC>& kb) {
    static_assert(BC % 16 == 0 && BC <= 64, "whole rounds of 4 groups, at most 64 bits");
    using M = KeepBits<BC>;
    constexpr int NG = BC / 4;
    const unsigned long long ga = ia >> 2, gb = ib >> 2;
    const int sa = static_cast<int>(ia & 3), sb = static_cast<int>(ib & 3);
    M a = 0, b = 0;
#pragma unroll
    for (int u = 0; u < NG / 4; ++u) {
        const int m = 4 * u + t;
        // group m holds elements 4m - s .. 4m - s + 3 of the row; bits below 0 precede the row
        a |= (static_cast<M>(keep4(dr, ga + m)) << (4 * m)) >> sa;
        b |= (static_cast<M>(keep4(dr, gb + m)) << (4 * m)) >> sb;
    }
    const int s = t == 0 ? sa : sb;
    if (t < 2 && s != 0) {  // group NG: elements BC - s .. (bits >= BC are never read)
        const M n = static_cast<M>(keep4(dr, (t == 0 ? ga : gb) + NG)) << (BC - s);
        if (t == 0) a |= n;
        else b |= n;
    }
    a |= __shfl_xor_sync(0xffffffffu, a, 1);
    a |= __shfl_xor_sync(0xffffffffu, a, 2);
    b |= __shfl_xor_sync(0xffffffffu, b, 1);
    b |= __shfl_xor_sync(0xffffffffu, b, 2);
    ka = a >> (2 * t);
    kb = b >> (2 * t);
}

// Keep bits of a transposed tile (dk/dv kernel): the warp's 16 keys kw0 .. kw0 + 15 (lane
// (g, t) holds keys g and g + 8) against 8 consecutive queries (lane (g, t) holds columns 2t
// and 2t + 1). cbase is the index of element (query of column lane & 7, key kw0); a column's
// 16 keys are consecutive indices, 4 groups plus a straddling one when cbase % 4 != 0. Lane
// (c + 8m) computes group m of column c (lanes 0..7 also the straddling group), two xor
// shuffles OR the column's nibbles together, two more bring columns 2t, 2t + 1 to lane (g, t).
// Returned bits (lane (g, t)): 0 = (key g, column 2t), 8 = (key g+8, column 2t),
// 16 = (key g, column 2t+1), 24 = (key g+8, column 2t+1).
__device__ __forceinline__ uint32_t warp_keep_cols(const DropArgs& dr, unsigned long long cbase,
                                                   int lane, int g, int t) {
    const int m = lane >> 3;
    const unsigned long long g0 = cbase >> 2;
    const int sh = static_cast<int>(cbase & 3);
    uint32_t v = (keep4(dr, g0 + m) << (4 * m)) >> sh;
    if (m == 0 && sh != 0) v |= keep4(dr, g0 + 4) << (16 - sh);
    v &= 0xffffu;
    v |= __shfl_xor_sync(0xffffffffu, v, 8);
    v |= __shfl_xor_sync(0xffffffffu, v, 16);  // every lane: column lane & 7
    const uint32_t u = __shfl_xor_sync(0xffffffffu, v, 1);
    const uint32_t w = (lane & 1) ? (u | (v << 16)) : (v | (u << 16));  // columns 2k | 2k+1
    return __shfl_sync(0xffffffffu, w, 2 * t) >> g;
}
__device__ __forceinline__ float drop_sign(float x, bool keep) { return keep ? x : -x; }
// The backward's two uses of a recomputed probability s (sign-encoded when DROP): the dV
// operand M o P, and dS from dPd = dO . v. DROP = false gives back the plain expressions.
template <bool DROP> __device__ __forceinline__ float dv_operand(float s) {
    if constexpr (DROP) return fmaxf(s, 0.f);
    else return s;
}
template <bool DROP>
__device__ __forceinline__ float ds_value(float s, float dpd, float Drow, float r) {
    if constexpr (DROP) return s * (s >= 0.f ? fmaf(dpd, r, -Drow) : Drow);
    else return s * (dpd - Drow);
}

// ---- tiles: global -> shared (cp.async), then rounded to TF32 by the thread that copied ------

// Rows [row0, row0 + ROWS) of a row-major matrix (row stride ld floats, D floats used per row)
// into a swizzled tile; rows >= T are zero-filled.
template <int ROWS, int D>
__device__ __forceinline__ void tile_load(float* tile, const float* src, int ld, int row0,
                                          int T) {
    constexpr int CPR = D / 4, CHUNKS = ROWS * CPR;
    static_assert(CHUNKS % kThreads == 0, "tile chunks must split evenly over the block");
#pragma unroll
    for (int k = 0; k < CHUNKS / kThreads; ++k) {
        const int i = k * kThreads + threadIdx.x;
        const int r = i / CPR, c = i % CPR;
        const bool ok = row0 + r < T;
        cp_async16(tile + swz<D>(r, c), src + (ok ? row0 + r : 0) * ld + 4 * c, ok ? 16 : 0);
    }
}
// Same chunks as tile_load issued by this thread: call after cp_async_wait.
template <int ROWS, int D> __device__ __forceinline__ void tile_round(float* tile) {
    constexpr int CPR = D / 4, CHUNKS = ROWS * CPR;
#pragma unroll
    for (int k = 0; k < CHUNKS / kThreads; ++k) {
        const int i = k * kThreads + threadIdx.x;
        float4* p = reinterpret_cast<float4*>(tile + swz<D>(i / CPR, i % CPR));
        float4 v = *p;
        v.x = tf32_round(v.x);
        v.y = tf32_round(v.y);
        v.z = tf32_round(v.z);
        v.w = tf32_round(v.w);
        *p = v;
    }
}
// ROWS (<= kThreads) consecutive floats src[row0 ..], zero past T.
template <int ROWS>
__device__ __forceinline__ void vec_load(float* dst, const float* src, int row0, int T) {
    static_assert(ROWS <= kThreads, "one element per thread");
    if (threadIdx.x < ROWS) {
        const bool ok = row0 + static_cast<int>(threadIdx.x) < T;
        cp_async4(dst + threadIdx.x, src + (ok ? row0 + threadIdx.x : 0), ok ? 4 : 0);
    }
}
// The saved natural-log lse becomes log2 units; rows past T get +inf so that their
// probabilities exp2(S - lse) are exactly 0. Same thread as vec_load, after cp_async_wait.
template <int ROWS> __device__ __forceinline__ void lse_fixup(float* v, int row0, int T) {
    if (threadIdx.x < ROWS)
        v[threadIdx.x] =
            row0 + static_cast<int>(threadIdx.x) < T ? v[threadIdx.x] * kLog2e : INFINITY;
}

// ---- forward -------------------------------------------------------------------------------

template <int D, int BC> struct FwdCfg {
    static constexpr int smem_floats = 2 * 2 * BC * D;  // two stages of (K tile, V tile)
    // resident blocks per SM the register cap aims for (shared memory allows at least this)
    static constexpr int min_blocks = D == 32 ? 3 : 2;
};

template <typename scalar_t, int D, int BC, bool DROP>
__global__ void __launch_bounds__(kThreads, (FwdCfg<D, BC>::min_blocks))
    attention_forward_kernel(scalar_t* __restrict__ out, float* __restrict__ lse,
                             const scalar_t* __restrict__ qkv, int T, int H, float c,
                             DropArgs dr) {
    static_assert(std::is_same<scalar_t, float>::value, "only the fp32 (TF32 MMA) path exists");
    constexpr int BR = kRows, KS = D / 8, NJ = BC / 8;
    extern __shared__ __align__(16) float smem[];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heavy (late) query tiles first
    const int C = H * D, ld = 3 * C;
    const float* qbase = qkv + static_cast<long long>(b) * T * ld + h * D;
    const float* kbase = qbase + C;
    const float* vbase = qbase + 2 * C;
    const int wq0 = q0 + warp * 16;  // this warp's first query row
    const int r0 = wq0 + g, r1 = r0 + 8;
    const bool warp_active = wq0 < T;
    const OffA oa_g = off_a<D>(g, t);  // pattern A, rows 8j + g
    const int ob0 = off_b<D>(2 * t, g), ob1 = off_b<D>(2 * t + 1, g);  // pattern B

    // q as A fragments (rows g, g+8), TF32, for the whole key loop.
    uint32_t qf[KS][4];
#pragma unroll
    for (int p = 0; p < KS / 2; ++p) {
        const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
        const float4 x0 = r0 < T ? ldg4(qbase + r0 * ld + 16 * p + 4 * t) : zero;
        const float4 x1 = r1 < T ? ldg4(qbase + r1 * ld + 16 * p + 4 * t) : zero;
        qf[2 * p][0] = tf32_bits(x0.x);
        qf[2 * p][1] = tf32_bits(x1.x);
        qf[2 * p][2] = tf32_bits(x0.y);
        qf[2 * p][3] = tf32_bits(x1.y);
        qf[2 * p + 1][0] = tf32_bits(x0.z);
        qf[2 * p + 1][1] = tf32_bits(x1.z);
        qf[2 * p + 1][2] = tf32_bits(x0.w);
        qf[2 * p + 1][3] = tf32_bits(x1.w);
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // Running max of the raw scores q.k (unscaled) and per-thread partial row sums of
    // exp2(c * (S - m)) for rows g and g+8; the 4 lanes of a quad share rows.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    const int q_end = min(q0 + BR, T);
    const int nkt = (q_end - 1) / BC + 1;  // key tiles up to the diagonal

    tile_load<BC, D>(smem, kbase, ld, 0, T);
    tile_load<BC, D>(smem + BC * D, vbase, ld, 0, T);
    cp_async_commit();

    for (int kt = 0; kt < nkt; ++kt) {
        float* Ks = smem + (kt & 1) * 2 * BC * D;
        float* Vs = Ks + BC * D;
        if (kt + 1 < nkt) {
            float* Kn = smem + ((kt + 1) & 1) * 2 * BC * D;
            tile_load<BC, D>(Kn, kbase, ld, (kt + 1) * BC, T);
            tile_load<BC, D>(Kn + BC * D, vbase, ld, (kt + 1) * BC, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        tile_round<BC, D>(Ks);
        tile_round<BC, D>(Vs);
        __syncthreads();

        const int k0 = kt * BC;
        if (warp_active && k0 <= wq0 + 15) {  // warp-uniform: some key of the tile is visible
            // keep bits first: integer work the scheduler can overlap with the S MMAs
            KeepBits<BC> ka, kb;  // (no code at all in the DROP = false kernel)
            if constexpr (DROP) {
                // element index of (row r0, key k0); row r1 = r0 + 8 is 8T further
                const unsigned long long ia = (static_cast<unsigned long long>(bh) * T + r0) * T + k0;
                quad_keep_rows<BC>(dr, ia, ia + 8ull * T, t, ka, kb);
            }
            float s[NJ][4];
#pragma unroll
            for (int j = 0; j < NJ; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            // S = q K^T: B[k][n] = K[key 8j + n][dim k]  (pattern A)
#pragma unroll
            for (int p = 0; p < KS / 2; ++p) {
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    const float4 kk = lds4(Ks + 8 * j * D + pick(oa_g, p) + 16 * p);
                    mma_tf32(s[j], qf[2 * p], bits(kk.x), bits(kk.y));
                    mma_tf32(s[j], qf[2 * p + 1], bits(kk.z), bits(kk.w));
                }
            }
            // causal mask where the tile reaches past this warp's first row; keys >= T are
            // always beyond the diagonal of every real row, so this masks them too
            if (k0 + BC - 1 > wq0) {
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    const int key = k0 + 8 * j + 2 * t;
                    if (key > r0) s[j][0] = -INFINITY;
                    if (key + 1 > r0) s[j][1] = -INFINITY;
                    if (key > r1) s[j][2] = -INFINITY;
                    if (key + 1 > r1) s[j][3] = -INFINITY;
                }
            }
            // online softmax; tile 0 holds key 0 <= every row, so m is finite from then on
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
            }
            mx0 = quad_max(mx0);
            mx1 = quad_max(mx1);
            const float corr0 = exp2f((m0 - mx0) * c), corr1 = exp2f((m1 - mx1) * c);
            m0 = mx0;
            m1 = mx1;
            const float mc0 = mx0 * c, mc1 = mx1 * c;
            float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                s[j][0] = exp2f(fmaf(s[j][0], c, -mc0));
                s[j][1] = exp2f(fmaf(s[j][1], c, -mc0));
                s[j][2] = exp2f(fmaf(s[j][2], c, -mc1));
                s[j][3] = exp2f(fmaf(s[j][3], c, -mc1));
                rs0 += s[j][0] + s[j][1];
                rs1 += s[j][2] + s[j][3];
            }
            l0 = l0 * corr0 + rs0;
            l1 = l1 * corr1 + rs1;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                o[n][0] *= corr0;
                o[n][1] *= corr0;
                o[n][2] *= corr1;
                o[n][3] *= corr1;
            }
            // o += P V: A = P (k = key 8j + 2t, 8j + 2t + 1), B[k][n] = V[key][dim] (pattern B);
            // with dropout A = M o P (the row sums above stay undropped, r comes at the end)
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                uint32_t a[4] = {tf32_bits(s[j][0]), tf32_bits(s[j][2]), tf32_bits(s[j][1]),
                                 tf32_bits(s[j][3])};
                if constexpr (DROP) {
                    if (!((ka >> (8 * j)) & 1)) a[0] = 0u;
                    if (!((kb >> (8 * j)) & 1)) a[1] = 0u;
                    if (!((ka >> (8 * j + 1)) & 1)) a[2] = 0u;
                    if (!((kb >> (8 * j + 1)) & 1)) a[3] = 0u;
                }
                mma_rows_b<D>(o, a, Vs + 8 * j * D, ob0, ob1);
            }
        }
        __syncthreads();  // the next iteration's loads overwrite this stage
    }

    if (!warp_active) return;
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    float inv0 = 1.f / l0, inv1 = 1.f / l1;
    if constexpr (DROP) {  // out = r (M o P) V
        inv0 *= dr.scale;
        inv1 *= dr.scale;
    }
    store_rows<D>(out + static_cast<long long>(b) * T * C + h * D, C, r0, T, t, o, inv0, inv1);
    if (t == 0) {
        // lse = log(sum_j exp(s q.k_j)) = (c m + log2 l) ln 2 with c = s log2(e)
        float* lrow = lse + static_cast<long long>(bh) * T;
        if (r0 < T) lrow[r0] = (m0 * c + log2f(l0)) * kLn2;
        if (r1 < T) lrow[r1] = (m1 * c + log2f(l1)) * kLn2;
    }
}

// ---- backward 1: D_i = dO_i . o_i -------------------------------------------------------------

// 8 lanes per (b, t, h) row, float4 each, fixed-order sum. Rows are taken in memory order
// (b, t, h) and D is written in lse's (b, h, t) order.
template <typename scalar_t, int D>
__global__ void attention_backward_dot_kernel(float* __restrict__ Dvec,
                                              const scalar_t* __restrict__ dout,
                                              const scalar_t* __restrict__ out, int rows, int T,
                                              int H) {
    static_assert(std::is_same<scalar_t, float>::value, "only the fp32 path exists");
    const int row = static_cast<int>((blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 3);
    const int sub = threadIdx.x & 7;
    float acc = 0.f;
    if (row < rows) {
        const float* a = dout + static_cast<long long>(row) * D;
        const float* o = out + static_cast<long long>(row) * D;
#pragma unroll
        for (int k = sub * 4; k < D; k += 32) {
            const float4 x = ldg4(a + k), y = ldg4(o + k);
            acc = fmaf(x.x, y.x, acc);
            acc = fmaf(x.y, y.y, acc);
            acc = fmaf(x.z, y.z, acc);
            acc = fmaf(x.w, y.w, acc);
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    if (row < rows && sub == 0) {
        const int bt = row / H, h = row - bt * H, b = bt / T, tt = bt - b * T;
        Dvec[(static_cast<long long>(b) * H + h) * T + tt] = acc;
    }
}

// ---- backward 2: dk, dv per key tile ---------------------------------------------------------

template <int D, int BRQ> struct DkdvCfg {
    // K, V tiles (64 keys), then two stages of (Q tile, dO tile), then two stages of (lse, D)
    static constexpr int kv = 2 * kRows * D;
    static constexpr int stage = 2 * BRQ * D;
    static constexpr int smem_floats = kv + 2 * stage + 2 * 2 * BRQ;
    static constexpr int min_blocks = D == 32 ? 3 : 2;
};

template <typename scalar_t, int D, int BRQ, bool DROP>
__global__ void __launch_bounds__(kThreads, (DkdvCfg<D, BRQ>::min_blocks))
    attention_backward_dkdv_kernel(scalar_t* __restrict__ dqkv, const scalar_t* __restrict__ qkv,
                                   const scalar_t* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ Dvec,
                                   int T, int H, float c, float scale, DropArgs dr) {
    static_assert(std::is_same<scalar_t, float>::value, "only the fp32 (TF32 MMA) path exists");
    using Cfg = DkdvCfg<D, BRQ>;
    constexpr int BC = kRows, NJ = BRQ / 8;
    extern __shared__ __align__(16) float smem[];
    float* Ks = smem;
    float* Vs = smem + BC * D;
    float* vecs = smem + Cfg::kv + 2 * Cfg::stage;  // [stage][lse2 | D] x BRQ

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int k0 = blockIdx.y * BC;  // early key tiles see the most queries: they go first
    const int C = H * D, ld = 3 * C;
    const float* qbase = qkv + static_cast<long long>(b) * T * ld + h * D;
    const float* kbase = qbase + C;
    const float* vbase = qbase + 2 * C;
    const float* dobase = dout + static_cast<long long>(b) * T * C + h * D;
    const float* lse_bh = lse + static_cast<long long>(bh) * T;
    const float* D_bh = Dvec + static_cast<long long>(bh) * T;
    const int kw0 = k0 + warp * 16;  // this warp's first key
    const int kr = warp * 16 + g;    // tile-local key rows kr, kr + 8 of this thread
    const OffA oa_r = off_a<D>(kr, t);  // pattern A, rows kr and kr + 8 (A operands)
    const OffA oa_g = off_a<D>(g, t);   // pattern A, rows 8j + g (B operands)
    const int ob0 = off_b<D>(2 * t, g), ob1 = off_b<D>(2 * t + 1, g);  // pattern B

    const int qt_first = k0 / BRQ;  // first query tile that reaches key k0
    const int n_it = (T + BRQ - 1) / BRQ - qt_first;

    auto load_q_stage = [&](int st, int q0) {
        float* Qs = smem + Cfg::kv + st * Cfg::stage;
        tile_load<BRQ, D>(Qs, qbase, ld, q0, T);
        tile_load<BRQ, D>(Qs + BRQ * D, dobase, C, q0, T);
        vec_load<BRQ>(vecs + st * 2 * BRQ, lse_bh, q0, T);
        vec_load<BRQ>(vecs + st * 2 * BRQ + BRQ, D_bh, q0, T);
    };

    tile_load<BC, D>(Ks, kbase, ld, k0, T);
    tile_load<BC, D>(Vs, vbase, ld, k0, T);
    load_q_stage(0, qt_first * BRQ);
    cp_async_commit();

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;
    }

    for (int it = 0; it < n_it; ++it) {
        const int st = it & 1;
        const int q0 = (qt_first + it) * BRQ;
        float* Qs = smem + Cfg::kv + st * Cfg::stage;
        float* dOs = Qs + BRQ * D;
        float* lse2s = vecs + st * 2 * BRQ;
        float* Ds = lse2s + BRQ;
        if (it + 1 < n_it) {
            load_q_stage(st ^ 1, q0 + BRQ);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (it == 0) {
            tile_round<BC, D>(Ks);
            tile_round<BC, D>(Vs);
        }
        tile_round<BRQ, D>(Qs);
        tile_round<BRQ, D>(dOs);
        lse_fixup<BRQ>(lse2s, q0, T);
        __syncthreads();

        if (kw0 < min(q0 + BRQ, T)) {  // warp-uniform: some (key <= query) pair is real
            // S^T = K Q^T: rows = this warp's 16 keys, columns = the tile's queries
            float s[NJ][4];
            mma_abt<D, NJ>(s, Ks, Qs, oa_r, oa_g);
            // P^T = exp2(c S^T - lse2[query]); key > query masked
            const bool need_mask = q0 < kw0 + 15;
            const int key0 = kw0 + g, key1 = key0 + 8;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const int qi = 8 * j + 2 * t;  // tile-local query of columns 2t, 2t+1
                const float la = lse2s[qi], lb = lse2s[qi + 1];
                s[j][0] = exp2f(fmaf(s[j][0], c, -la));
                s[j][1] = exp2f(fmaf(s[j][1], c, -lb));
                s[j][2] = exp2f(fmaf(s[j][2], c, -la));
                s[j][3] = exp2f(fmaf(s[j][3], c, -lb));
                if (need_mask) {
                    const int qa = q0 + qi;
                    if (key0 > qa) s[j][0] = 0.f;
                    if (key0 > qa + 1) s[j][1] = 0.f;
                    if (key1 > qa) s[j][2] = 0.f;
                    if (key1 > qa + 1) s[j][3] = 0.f;
                }
                if constexpr (DROP) {  // dropped entries become -P (the sign carries the mask)
                    // element index of (query q0 + 8j + (lane & 7), key kw0)
                    const unsigned long long cbase =
                        (static_cast<unsigned long long>(bh) * T + q0 + 8 * j + (lane & 7)) * T + kw0;
                    const uint32_t kbits = warp_keep_cols(dr, cbase, lane, g, t);
                    s[j][0] = drop_sign(s[j][0], kbits & 1u);
                    s[j][1] = drop_sign(s[j][1], (kbits >> 16) & 1u);
                    s[j][2] = drop_sign(s[j][2], (kbits >> 8) & 1u);
                    s[j][3] = drop_sign(s[j][3], (kbits >> 24) & 1u);
                }
            }
            // dV += P^T dO: A = P^T (k = query 8j + 2t, 8j + 2t + 1), B[k][n] = dO[query][dim];
            // with dropout A = (M o P)^T = max(s, 0), r comes at the end
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const uint32_t a[4] = {
                    tf32_bits(dv_operand<DROP>(s[j][0])), tf32_bits(dv_operand<DROP>(s[j][2])),
                    tf32_bits(dv_operand<DROP>(s[j][1])), tf32_bits(dv_operand<DROP>(s[j][3]))};
                mma_rows_b<D>(dv, a, dOs + 8 * j * D, ob0, ob1);
            }
            // dP^T = V dO^T
            float dp[NJ][4];
            mma_abt<D, NJ>(dp, Vs, dOs, oa_r, oa_g);
            // dS^T = P^T (dP^T - D[query]); with dropout dP = M r (dO.v): kept (s >= 0)
            // s (dPd r - D), dropped (s = -P) P (0 - D) = s D
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const int qi = 8 * j + 2 * t;
                const float Da = Ds[qi], Db = Ds[qi + 1];
                dp[j][0] = ds_value<DROP>(s[j][0], dp[j][0], Da, dr.scale);
                dp[j][1] = ds_value<DROP>(s[j][1], dp[j][1], Db, dr.scale);
                dp[j][2] = ds_value<DROP>(s[j][2], dp[j][2], Da, dr.scale);
                dp[j][3] = ds_value<DROP>(s[j][3], dp[j][3], Db, dr.scale);
            }
            // dK += dS^T Q: A = dS^T, B[k][n] = Q[query][dim] (pattern B)
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const uint32_t a[4] = {tf32_bits(dp[j][0]), tf32_bits(dp[j][2]),
                                       tf32_bits(dp[j][1]), tf32_bits(dp[j][3])};
                mma_rows_b<D>(dk, a, Qs + 8 * j * D, ob0, ob1);
            }
        }
        __syncthreads();  // the next iteration's loads overwrite this stage
    }

    // rows kw0 + g and kw0 + g + 8; dk picks up the score scale s here, dv the dropout r
    if constexpr (DROP) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            dv[n][0] *= dr.scale;
            dv[n][1] *= dr.scale;
            dv[n][2] *= dr.scale;
            dv[n][3] *= dr.scale;
        }
    }
    float* dkbase = dqkv + static_cast<long long>(b) * T * ld + C + h * D;
    store_rows<D>(dkbase, ld, kw0 + g, T, t, dk, scale, scale);
    store_rows<D>(dkbase + C, ld, kw0 + g, T, t, dv, 1.f, 1.f);
}

// ---- backward 3: dq per query tile -----------------------------------------------------------

template <int D, int BC> struct DqCfg {
    // Q, dO tiles (64 rows), lse2 and D (64 each), then two stages of (K tile, V tile)
    static constexpr int qd = 2 * kRows * D + 2 * kRows;
    static constexpr int stage = 2 * BC * D;
    static constexpr int smem_floats = qd + 2 * stage;
    static constexpr int min_blocks = D == 32 ? 3 : 2;
};

template <typename scalar_t, int D, int BC, bool DROP>
__global__ void __launch_bounds__(kThreads, (DqCfg<D, BC>::min_blocks))
    attention_backward_dq_kernel(scalar_t* __restrict__ dqkv, const scalar_t* __restrict__ qkv,
                                 const scalar_t* __restrict__ dout, const float* __restrict__ lse,
                                 const float* __restrict__ Dvec, int T, int H, float c,
                                 float scale, DropArgs dr) {
    static_assert(std::is_same<scalar_t, float>::value, "only the fp32 (TF32 MMA) path exists");
    using Cfg = DqCfg<D, BC>;
    constexpr int BR = kRows, NJ = BC / 8;
    extern __shared__ __align__(16) float smem[];
    float* Qs = smem;
    float* dOs = smem + BR * D;
    float* lse2s = smem + 2 * BR * D;
    float* Ds = lse2s + BR;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh - b * H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BR;  // heavy (late) query tiles first
    const int C = H * D, ld = 3 * C;
    const float* qbase = qkv + static_cast<long long>(b) * T * ld + h * D;
    const float* kbase = qbase + C;
    const float* vbase = qbase + 2 * C;
    const float* dobase = dout + static_cast<long long>(b) * T * C + h * D;
    const int wq0 = q0 + warp * 16;
    const int qr = warp * 16 + g;  // tile-local rows qr, qr + 8 of this thread
    const int r0 = q0 + qr, r1 = r0 + 8;
    const bool warp_active = wq0 < T;
    const OffA oa_r = off_a<D>(qr, t);  // pattern A, rows qr and qr + 8 (A operands)
    const OffA oa_g = off_a<D>(g, t);   // pattern A, rows 8j + g (B operands)
    const int ob0 = off_b<D>(2 * t, g), ob1 = off_b<D>(2 * t + 1, g);  // pattern B

    const int q_end = min(q0 + BR, T);
    const int nkt = (q_end - 1) / BC + 1;

    tile_load<BR, D>(Qs, qbase, ld, q0, T);
    tile_load<BR, D>(dOs, dobase, C, q0, T);
    vec_load<BR>(lse2s, lse + static_cast<long long>(bh) * T, q0, T);
    vec_load<BR>(Ds, Dvec + static_cast<long long>(bh) * T, q0, T);
    tile_load<BC, D>(smem + Cfg::qd, kbase, ld, 0, T);
    tile_load<BC, D>(smem + Cfg::qd + BC * D, vbase, ld, 0, T);
    cp_async_commit();

    float dq[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

    for (int kt = 0; kt < nkt; ++kt) {
        float* Ks = smem + Cfg::qd + (kt & 1) * Cfg::stage;
        float* Vs = Ks + BC * D;
        if (kt + 1 < nkt) {
            float* Kn = smem + Cfg::qd + ((kt + 1) & 1) * Cfg::stage;
            tile_load<BC, D>(Kn, kbase, ld, (kt + 1) * BC, T);
            tile_load<BC, D>(Kn + BC * D, vbase, ld, (kt + 1) * BC, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (kt == 0) {
            tile_round<BR, D>(Qs);
            tile_round<BR, D>(dOs);
            lse_fixup<BR>(lse2s, q0, T);
        }
        tile_round<BC, D>(Ks);
        tile_round<BC, D>(Vs);
        __syncthreads();

        const int k0 = kt * BC;
        if (warp_active && k0 <= wq0 + 15) {  // warp-uniform
            KeepBits<BC> ka, kb;  // (no code at all in the DROP = false kernels)
            if constexpr (DROP) {
                // element index of (row r0, key k0); row r1 = r0 + 8 is 8T further
                const unsigned long long ia = (static_cast<unsigned long long>(bh) * T + r0) * T + k0;
                quad_keep_rows<BC>(dr, ia, ia + 8ull * T, t, ka, kb);
            }
            // S = Q K^T (A = Q from shared, pattern A on both operands)
            float s[NJ][4];
            mma_abt<D, NJ>(s, Qs, Ks, oa_r, oa_g);
            // P = exp2(c S - lse2[row]); key > row masked (this also masks keys >= T)
            const float la = lse2s[qr], lb = lse2s[qr + 8];
            const bool need_mask = k0 + BC - 1 > wq0;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                s[j][0] = exp2f(fmaf(s[j][0], c, -la));
                s[j][1] = exp2f(fmaf(s[j][1], c, -la));
                s[j][2] = exp2f(fmaf(s[j][2], c, -lb));
                s[j][3] = exp2f(fmaf(s[j][3], c, -lb));
                if (need_mask) {
                    const int key = k0 + 8 * j + 2 * t;
                    if (key > r0) s[j][0] = 0.f;
                    if (key + 1 > r0) s[j][1] = 0.f;
                    if (key > r1) s[j][2] = 0.f;
                    if (key + 1 > r1) s[j][3] = 0.f;
                }
                if constexpr (DROP) {  // dropped entries become -P (the sign carries the mask)
                    s[j][0] = drop_sign(s[j][0], (ka >> (8 * j)) & 1);
                    s[j][1] = drop_sign(s[j][1], (ka >> (8 * j + 1)) & 1);
                    s[j][2] = drop_sign(s[j][2], (kb >> (8 * j)) & 1);
                    s[j][3] = drop_sign(s[j][3], (kb >> (8 * j + 1)) & 1);
                }
            }
            // dP = dO V^T
            float dp[NJ][4];
            mma_abt<D, NJ>(dp, dOs, Vs, oa_r, oa_g);
            // dS = P (dP - D[row]); with dropout as in the dk/dv kernel: s (dPd r - D) where
            // kept (s >= 0), s D where dropped (s = -P)
            const float Da = Ds[qr], Db = Ds[qr + 8];
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                dp[j][0] = ds_value<DROP>(s[j][0], dp[j][0], Da, dr.scale);
                dp[j][1] = ds_value<DROP>(s[j][1], dp[j][1], Da, dr.scale);
                dp[j][2] = ds_value<DROP>(s[j][2], dp[j][2], Db, dr.scale);
                dp[j][3] = ds_value<DROP>(s[j][3], dp[j][3], Db, dr.scale);
            }
            // dQ += dS K: A = dS (k = key 8j + 2t, 8j + 2t + 1), B[k][n] = K[key][dim] (pattern B)
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                const uint32_t a[4] = {tf32_bits(dp[j][0]), tf32_bits(dp[j][2]),
                                       tf32_bits(dp[j][1]), tf32_bits(dp[j][3])};
                mma_rows_b<D>(dq, a, Ks + 8 * j * D, ob0, ob1);
            }
        }
        __syncthreads();  // the next iteration's loads overwrite this stage
    }

    if (!warp_active) return;
    store_rows<D>(dqkv + static_cast<long long>(b) * T * ld + h * D, ld, r0, T, t, dq, scale, scale);
}

// ---- host side -------------------------------------------------------------------------------

void check_sizes(const char* op, int B, int T, int C, int H) {
    if (B < 1 || T < 1 || H < 1 || C < 1 || C % H != 0)
        throw std::invalid_argument(std::string(op) + ": bad sizes B=" + std::to_string(B) +
                                    " T=" + std::to_string(T) + " C=" + std::to_string(C) +
                                    " H=" + std::to_string(H));
    const int d = C / H;
    if (d != 32 && d != 64 && d != 128)
        throw std::invalid_argument(std::string(op) + ": head dimension C/H = " +
                                    std::to_string(d) + " is not supported (32, 64 or 128)");
    if (ceil_div(T, kRows) > 65535)
        throw std::invalid_argument(std::string(op) + ": T = " + std::to_string(T) +
                                    " is too long (at most 65535 * 64)");
}

template <int D> constexpr int fwd_bc() { return D == 128 ? 32 : 64; }
template <int D> constexpr int bwd_tile() { return D == 128 ? 16 : 64; }

// p must already be checked (0 <= p < 1); p == 0 runs the DROP = false kernels.
DropArgs drop_args(float p, uint64_t seed, uint64_t offset) {
    DropArgs dr;
    dr.seed = seed;
    dr.offset = offset;
    dr.threshold = p > 0.0f ? dropout_threshold(p) : 0u;
    dr.scale = p > 0.0f ? dropout_scale(p) : 1.0f;
    return dr;
}

void check_dropout(const char* op, float p) {
    if (!(p >= 0.0f && p < 1.0f))  // ops.py rejects these; never let a bad threshold through
        throw std::invalid_argument(std::string(op) + ": dropout_p must satisfy 0 <= p < 1, got " +
                                    std::to_string(p));
}

template <typename scalar_t, int D, bool DROP>
void forward_impl(uintptr_t out, uintptr_t lse, uintptr_t qkv, int B, int T, int H,
                  const DropArgs& dr, cudaStream_t stream) {
    constexpr int BC = fwd_bc<D>();
    auto kernel = attention_forward_kernel<scalar_t, D, BC, DROP>;
    const int smem = FwdCfg<D, BC>::smem_floats * static_cast<int>(sizeof(float));
    set_smem("attention_forward", kernel, smem);
    const float c = kLog2e / sqrtf(static_cast<float>(D));
    dim3 grid(B * H, ceil_div(T, kRows));
    kernel<<<grid, kThreads, smem, stream>>>(as_ptr<scalar_t>(out), as_ptr<float>(lse),
                                             as_ptr<const scalar_t>(qkv), T, H, c, dr);
}

template <typename scalar_t, int D, bool DROP>
void backward_impl(uintptr_t dqkv, uintptr_t scratch, uintptr_t dout, uintptr_t qkv,
                   uintptr_t out, uintptr_t lse, int B, int T, int H, const DropArgs& dr,
                   cudaStream_t stream) {
    const char* op = "attention_backward";
    constexpr int BT = bwd_tile<D>();
    const float scale = 1.0f / sqrtf(static_cast<float>(D));
    const float c = kLog2e * scale;
    float* Dvec = as_ptr<float>(scratch);

    const int rows = B * T * H;
    attention_backward_dot_kernel<scalar_t, D><<<ceil_div(8LL * rows, 256), 256, 0, stream>>>(
        Dvec, as_ptr<const scalar_t>(dout), as_ptr<const scalar_t>(out), rows, T, H);
    check_launch(op);

    auto dkdv = attention_backward_dkdv_kernel<scalar_t, D, BT, DROP>;
    const int smem_kv = DkdvCfg<D, BT>::smem_floats * static_cast<int>(sizeof(float));
    set_smem(op, dkdv, smem_kv);
    dkdv<<<dim3(B * H, ceil_div(T, kRows)), kThreads, smem_kv, stream>>>(
        as_ptr<scalar_t>(dqkv), as_ptr<const scalar_t>(qkv), as_ptr<const scalar_t>(dout),
        as_ptr<const float>(lse), Dvec, T, H, c, scale, dr);
    check_launch(op);

    auto dq = attention_backward_dq_kernel<scalar_t, D, BT, DROP>;
    const int smem_q = DqCfg<D, BT>::smem_floats * static_cast<int>(sizeof(float));
    set_smem(op, dq, smem_q);
    dq<<<dim3(B * H, ceil_div(T, kRows)), kThreads, smem_q, stream>>>(
        as_ptr<scalar_t>(dqkv), as_ptr<const scalar_t>(qkv), as_ptr<const scalar_t>(dout),
        as_ptr<const float>(lse), Dvec, T, H, c, scale, dr);
}

// Runs f(std::integral_constant<int, d>, std::integral_constant<bool, drop>) for the head
// dimension d in {32, 64, 128} (checked) and drop = p > 0.
template <typename F> void dispatch_d_drop(int d, bool drop, F&& f) {
    auto with_d = [&](auto dc) {
        if (drop) f(dc, std::true_type{});
        else f(dc, std::false_type{});
    };
    if (d == 32) with_d(std::integral_constant<int, 32>{});
    else if (d == 64) with_d(std::integral_constant<int, 64>{});
    else with_d(std::integral_constant<int, 128>{});
}

}  // namespace

void attention_forward(uintptr_t out, uintptr_t lse, uintptr_t qkv, int B, int T, int C, int H,
                       int dtype, float dropout_p, uint64_t seed, uint64_t offset,
                       uintptr_t stream) {
    const char* op = "attention_forward";
    check_sizes(op, B, T, C, H);
    check_dropout(op, dropout_p);
    const DropArgs dr = drop_args(dropout_p, seed, offset);
    DISPATCH_STORAGE(op, dtype, [&] {
        dispatch_d_drop(C / H, dropout_p > 0.0f, [&](auto dc, auto drop) {
            forward_impl<scalar_t, decltype(dc)::value, decltype(drop)::value>(
                out, lse, qkv, B, T, H, dr, as_stream(stream));
        });
    });
    check_launch(op);
}

long long attention_backward_scratch_size(int B, int T, int H) {
    return static_cast<long long>(B) * T * H;  // D_i, one float per (b, h, query row)
}

void attention_backward(uintptr_t dqkv, uintptr_t scratch, uintptr_t dout, uintptr_t qkv,
                        uintptr_t out, uintptr_t lse, int B, int T, int C, int H, int dtype,
                        float dropout_p, uint64_t seed, uint64_t offset, uintptr_t stream) {
    const char* op = "attention_backward";
    check_sizes(op, B, T, C, H);
    check_dropout(op, dropout_p);
    const DropArgs dr = drop_args(dropout_p, seed, offset);
    DISPATCH_STORAGE(op, dtype, [&] {
        dispatch_d_drop(C / H, dropout_p > 0.0f, [&](auto dc, auto drop) {
            backward_impl<scalar_t, decltype(dc)::value, decltype(drop)::value>(
                dqkv, scratch, dout, qkv, out, lse, B, T, H, dr, as_stream(stream));
        });
    });
    check_launch(op);
}
