// Token + position embedding.
//
// Forward:  out[b,t,:] = wte[idx[b,t],:] + wpe[t,:]
// Backward: out is a sum of one row of each table, so every dout row flows unchanged into the
//   row it was gathered from:  dwte[v] += sum of dout[b,t] over the (b,t) with idx[b,t] == v,
//   dwpe[t] += sum over b of dout[b,t].
//
// The backward must give the same bits on every run, so there are no float atomics: each row's
// sum is taken in one fixed order (ascending position). It should also read dout only once, since
// dout is most of the bytes it moves. The positions are taken in chunks (up to 16 sequences and
// 16384 positions, 8192 before Hopper: a rectangle b0 <= b < b0+Bc, t0 <= t < t0+Tc), each in
// three kernels:
//   1. sort, in shared memory (a cluster of 8 blocks on Hopper, one block before): a stable LSD
//      radix sort of the chunk's ids (8-bit digits, ranked within a warp by ballots) lists the
//      positions by (id, position), and the runs of equal ids are measured. A position that ends
//      a short run (at most kShortRun positions) gets a "link" to its run; the entries of longer
//      runs are copied to a separate list. Out-of-range ids get the key V and reach no dwte row.
//   2. backward, launched while the sort still runs (programmatic dependent launch): one block per
//      position t reads the Bc rows dout[b0.., t], adds their sum to dwpe[t] (no sort needed, so
//      this overlaps with it), waits for the sort, then adds the short runs to their dwte rows: a
//      run of one straight from registers, a longer one by the block that holds its last row,
//      which re-reads the few others. Extra blocks take the long runs (frequent ids) in tiles of
//      kTile sorted entries: a run inside a tile is added to its row directly, a run that crosses
//      tiles leaves one partial sum per tile in scratch, so a run of thousands is spread over many
//      blocks instead of serialized in one.
//   3. run_sum adds each crossing run's partials to its row, in tile order.
// With random ids over a 50k vocabulary nearly every run is short and dout is read about 1.05
// times; the rows of a frequent id are read twice (for dwpe, then in its tile).

#include <algorithm>
#include <cstring>

#include <cooperative_groups.h>

#include "common.cuh"
#include "launchers.h"

namespace {
namespace cg = cooperative_groups;

// Partial sums are float32 whatever the storage type (VEC of them, 16-byte aligned when VEC%4==0).
template <int VEC>
__device__ __forceinline__ void load_partial(float (&dst)[VEC], const float* src) {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int k = 0; k < VEC; k += 4) {
            const float4 f = *reinterpret_cast<const float4*>(src + k);
            dst[k] = f.x; dst[k + 1] = f.y; dst[k + 2] = f.z; dst[k + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) dst[k] = src[k];
    }
}
template <int VEC>
__device__ __forceinline__ void store_partial(float* dst, const float (&src)[VEC]) {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int k = 0; k < VEC; k += 4)
            *reinterpret_cast<float4*>(dst + k) =
                make_float4(src[k], src[k + 1], src[k + 2], src[k + 3]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) dst[k] = src[k];
    }
}

constexpr unsigned kFullMask = 0xffffffffu;

// ---- forward -------------------------------------------------------------------------------
// threadIdx.x walks the channels (VEC per thread), threadIdx.y the rows, so small C still fills
// whole blocks. An out-of-range id writes NaN over its row instead of reading outside wte.
template <typename T, int VEC>
__global__ void encoder_forward_kernel(T* __restrict__ out, const int* __restrict__ idx,
                                       const T* __restrict__ wte, const T* __restrict__ wpe,
                                       int N, int seq_len, int C, int V) {
    const int n = blockIdx.x * blockDim.y + threadIdx.y;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (n >= N || c >= C) return;
    const int id = idx[n];
    float r[VEC];
    if (id >= 0 && id < V) {
        float a[VEC], p[VEC];
        load_vec<T, VEC>(a, wte + (long long)id * C + c);
        load_vec<T, VEC>(p, wpe + (long long)(n % seq_len) * C + c);
#pragma unroll
        for (int k = 0; k < VEC; k++) r[k] = a[k] + p[k];
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) r[k] = __int_as_float(0x7fffffff);  // NaN
    }
    store_vec<T, VEC>(out + (long long)n * C + c, r);
}

// ---- backward: chunks and scratch ----------------------------------------------------------
constexpr int kCluster = 8;            // sort blocks on Hopper and later (a portable cluster size)
constexpr int kSortThreads = 512;
constexpr int kSortWarps = kSortThreads / 32;
// ids per sort thread (unrolled, so it sets the code size): a chunk holds up to
// G * kSortThreads * rounds positions, 16384 with the cluster, 8192 without
template <int G> __host__ __device__ constexpr int max_rounds() { return G > 1 ? 4 : 16; }
constexpr int kBins = 256;             // 8-bit digits
constexpr int kBinStride = kBins + 1;  // a warp's counts, + one bin for lanes past the chunk
constexpr int kGroups = 4;             // threadIdx.y of the backward kernel
constexpr int kRowsPerThread = 4;      // dout rows one backward thread keeps
constexpr int kMaxRows = kGroups * kRowsPerThread;  // sequences per chunk
constexpr int kShortRun = 16;          // longest run summed by the block holding its last row
constexpr int kTile = 32;              // sorted long-run entries per tile
constexpr int kTileAhead = 4;          // rows a tile thread loads before adding them up
constexpr int kRunWarps = 8;           // warps sharing one crossing run's partials
constexpr int kRunBlocks = 128;

__device__ __forceinline__ int token_key(int id, int V) { return (id >= 0 && id < V) ? id : V; }

// The positions (b0 + b, t0 + t) for b < Bc, t < Tc, with local index p = b * Tc + t. A chunk is
// whole sequences (t0 = 0, Tc = T) or part of one (Bc = 1), so the dout row of p is base + p.
struct Chunk {
    int base, t0, Bc, Tc;
    __host__ __device__ int size() const { return Bc * Tc; }
};

// Scratch, int32 elements (float32 for the partials). Sized for the largest chunk.
struct EncoderPlan {
    int Bc, Tc;              // chunk shape
    bool hopper;             // sort on a cluster of kCluster blocks, dependent launches
    int max_rounds;          // sort rounds the GPU's shared memory allows
    int passes, digit_bits;  // radix passes over keys 0..V
    long long links, sorted_rows, long_keys, long_rows, counts, owners, partials, total;
};

// counts[0]: entries in the long-run list; counts[1]: crossing runs registered by their tiles.
constexpr int kLongCount = 0, kOwnerCount = 1;

inline long long round_up(long long x, long long m) { return (x + m - 1) / m * m; }

inline int sort_smem_bytes(int rounds) {
    // keys and positions of the block's entries, per-warp digit counts, per-digit bases, 64 ints
    return (int)sizeof(int) * (2 * rounds * kSortThreads + kSortWarps * kBinStride + kBins + 64);
}

EncoderPlan encoder_plan(const char* op, int B, int T, int C, int V) {
    if (B <= 0 || T <= 0 || C <= 0 || V <= 0)
        throw std::invalid_argument(std::string(op) + ": B, T, C, V must be positive");
    if ((long long)B * T > (1LL << 30))
        throw std::invalid_argument(std::string(op) + ": B*T must be at most 2^30");
    int dev = 0, optin = 0;
    CUDA_CHECK(op, cudaGetDevice(&dev));
    CUDA_CHECK(op, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    EncoderPlan p{};
    p.hopper = hopper_or_later(op);
    const int cluster = p.hopper ? kCluster : 1;
    p.max_rounds = p.hopper ? max_rounds<kCluster>() : max_rounds<1>();
    while (p.max_rounds > 1 && sort_smem_bytes(p.max_rounds) > optin) p.max_rounds /= 2;
    const int cap = cluster * p.max_rounds * kSortThreads;  // positions fit in 16 bits
    p.Tc = std::min(T, cap);
    p.Bc = std::min({B, kMaxRows, cap / p.Tc});
    const int bits = 32 - __builtin_clz((unsigned)V);  // keys are 0..V
    p.passes = (bits + 7) / 8;
    p.digit_bits = (bits + p.passes - 1) / p.passes;
    const long long S = (long long)p.Bc * p.Tc;
    const long long ntiles = (S + kTile - 1) / kTile;
    long long off = 0;
    auto take = [&](long long n) {  // 256-byte aligned regions
        const long long o = off;
        off = round_up(off + n, 64);
        return o;
    };
    p.links = take(S);
    p.sorted_rows = take(S);
    p.long_keys = take(S);
    p.long_rows = take(S);
    p.counts = take(2);
    p.owners = take(ntiles);
    p.partials = take(2 * ntiles * C);
    p.total = off;
    return p;
}

// ---- backward, 1: sort one chunk's ids -----------------------------------------------------
// The sort runs on a cluster of kCluster blocks (Hopper and later; one block before): block q
// holds the sorted list's entries [q, q+1) * Sb, and the blocks exchange digit counts, entries
// and run lengths through distributed shared memory: ~31 us (ncu) on 8 SMs, against 61 us on
// one. Its barriers, not its arithmetic, set that time (docs/PERF.md).
template <int G> __device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (G > 1) return (int)cg::this_cluster().block_rank();
#endif
    return 0;
}
template <int G> __device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (G > 1) {
        cg::this_cluster().sync();
        return;
    }
#endif
    __syncthreads();
}
// The same shared array in cluster block q (this block's own array without the cluster window).
template <int G> __device__ __forceinline__ int* peer(int* p, int q) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (G > 1)
        if (q != cluster_rank<G>()) return cg::this_cluster().map_shared_rank(p, q);
#endif
    return p;
}

struct Plus {
    __device__ int operator()(int a, int b) const { return a + b; }
};
struct Max {
    __device__ int operator()(int a, int b) const { return max(a, b); }
};

// Inclusive scan over the warp's lanes under `op`.
template <typename Op>
__device__ __forceinline__ int warp_inclusive_scan(int x, Op op) {
    const int lane = threadIdx.x % 32;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(kFullMask, x, o);
        if (lane >= o) x = op(x, y);
    }
    return x;
}

// Exclusive scan of one int per thread over the block under `op`; *total (if given) receives the
// reduction of all of them. `buf`: 32 ints of shared memory.
template <typename Op>
__device__ int block_exclusive_scan(int x, int identity, Op op, int* buf, int* total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    const int incl = warp_inclusive_scan(x, op);
    __syncthreads();  // buf may still be read after a previous call
    if (lane == 31) buf[warp] = incl;
    __syncthreads();
    if (warp == 0) buf[lane] = warp_inclusive_scan(lane < nwarps ? buf[lane] : identity, op);
    __syncthreads();
    int excl = __shfl_up_sync(kFullMask, incl, 1);
    if (lane == 0) excl = identity;
    if (total != nullptr) *total = buf[nwarps - 1];
    return warp > 0 ? op(buf[warp - 1], excl) : excl;
}

// Over the cluster: the reduction under `op` of `value` (one per block, held by every thread)
// over the blocks before this one. `slot`: one int of shared memory; ends with a cluster sync.
template <int G, typename Op>
__device__ int cluster_exclusive(int value, int identity, Op op, int* slot) {
    if (threadIdx.x == 0) *slot = value;
    cluster_sync<G>();
    int v[G];  // all loads first: remote reads are slow, and independent
#pragma unroll
    for (int q = 0; q < G; q++) v[q] = q < cluster_rank<G>() ? *peer<G>(slot, q) : identity;
    int acc = identity;
#pragma unroll
    for (int q = 0; q < G; q++) acc = op(acc, v[q]);
    return acc;
}

// Outputs, for the chunk's S positions (p: local index, its dout row base + p):
//   links[p]        (run start << 5) | (run length - 1) if p is the last position of a run of at
//                   most kShortRun valid ids, else -1;
//   sorted_rows[k]  the dout row of the k-th sorted entry;
//   long_keys, long_rows: the entries of the longer runs, in sorted order, counts[kLongCount] of
//                   them; counts[kOwnerCount] = 0 for the tiles that register crossing runs.
// Layout: block q holds list entries [q*Sb, q*Sb + nb); its warp w holds the block's entries
// [w, w+1) * rounds * 32, 32 consecutive ones per round, so lane order is list order and shared
// accesses are conflict free.
template <int G>
__global__ void __launch_bounds__(kSortThreads)
encoder_sort_kernel(int* __restrict__ links, int* __restrict__ sorted_rows,
                    int* __restrict__ long_keys, int* __restrict__ long_rows,
                    int* __restrict__ counts, const int* __restrict__ idx, Chunk chunk, int V,
                    int passes, int digit_bits, int Sb, int rounds) {
    constexpr int kRounds = max_rounds<G>();
    pdl_launch_dependents();  // the backward kernel's dwpe half needs nothing from here
    extern __shared__ int smem[];
    int* skey = smem;                           // [rounds * kSortThreads]
    int* spos = skey + rounds * kSortThreads;   // [rounds * kSortThreads]
    int* table = spos + rounds * kSortThreads;  // [kSortWarps][kBinStride]: per-warp digit counts
    int* gbase = table + kSortWarps * kBinStride;  // [kBins]: the block's counts, then bases
    int* buf = gbase + kBins;                   // [32] block scans, [32]: cluster slot
    int* slot = buf + 32;
    const int S = chunk.size();
    const int q = cluster_rank<G>();
    const int e0 = q * Sb;                      // the block's first list entry
    const int nb = max(0, min(Sb, S - e0));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int first = warp * rounds * 32 + lane;  // this thread's local entry of round 0
    const unsigned lanes_below = (1u << lane) - 1u;

    int key[kRounds];
#pragma unroll
    for (int r = 0; r < kRounds; r++) {
        const int i = first + r * 32;
        key[r] = r < rounds && i < nb ? token_key(idx[chunk.base + e0 + i], V) : 0;
    }

    // Stable LSD radix sort: an entry goes to (entries with a smaller digit) + (same digit,
    // earlier block) + (same digit, same block, lower warp) + (same digit, same warp, earlier).
    // The in-warp rank comes from ballots: the lanes whose digit equals this lane's agree with
    // it on every bit.
    const int mask = (1 << digit_bits) - 1;
    int* hist = table + warp * kBinStride;
    for (int pass = 0; pass < passes; pass++) {
        const int shift = pass * digit_bits;
        if (pass > 0) {
#pragma unroll
            for (int r = 0; r < kRounds; r++) {
                const int i = first + r * 32;
                if (r < rounds && i < nb) key[r] = skey[i];
            }
        }
        for (int d = lane; d < kBinStride; d += 32) hist[d] = 0;
        __syncwarp();
        int rank_pos[kRounds];  // rank in the warp << 16 | position
#pragma unroll
        for (int r = 0; r < kRounds; r++) {
            if (r >= rounds) break;
            const int i = first + r * 32;
            const bool valid = i < nb;
            const int digit = valid ? (key[r] >> shift) & mask : kBins;
            unsigned peers = __ballot_sync(kFullMask, valid);
            if (!valid) peers = ~peers;
#pragma unroll
            for (int bit = 0; bit < 8; bit++) {
                if (bit >= digit_bits) break;
                const unsigned ones = __ballot_sync(kFullMask, (digit >> bit) & 1);
                peers &= ((digit >> bit) & 1) ? ones : ~ones;
            }
            const int pos = pass == 0 || !valid ? e0 + i : spos[i];
            rank_pos[r] = (hist[digit] + __popc(peers & lanes_below)) << 16 | pos;
            __syncwarp();
            if (lane == 31 - __clz(peers)) hist[digit] += __popc(peers);  // one writer per digit
            __syncwarp();
        }
        __syncthreads();
        // the block's count of each digit, then each (digit, warp) cell's exclusive prefix within
        // its digit
        for (int d = threadIdx.x; d <= mask; d += kSortThreads) {
            int running = 0;
            for (int w = 0; w < kSortWarps; w++) {
                const int count = table[w * kBinStride + d];
                table[w * kBinStride + d] = running;
                running += count;
            }
            gbase[d] = running;
        }
        cluster_sync<G>();  // every block's counts are out; every key of this pass is read
        // digit d's entries of this block start at (all entries with smaller digits) + (digit d
        // in earlier blocks)
        int below = 0, total = 0;
        if ((int)threadIdx.x <= mask) {
            int count[G];
#pragma unroll
            for (int b = 0; b < G; b++) count[b] = peer<G>(gbase, b)[threadIdx.x];
#pragma unroll
            for (int b = 0; b < G; b++) {
                if (b < q) below += count[b];
                total += count[b];
            }
        }
        const int start = block_exclusive_scan((int)threadIdx.x <= mask ? total : 0, 0, Plus(),
                                               buf, nullptr);
        cluster_sync<G>();  // every block has read gbase
        if ((int)threadIdx.x <= mask) gbase[threadIdx.x] = start + below;
        __syncthreads();
#pragma unroll
        for (int r = 0; r < kRounds; r++) {
            if (r >= rounds || first + r * 32 >= nb) break;
            const int digit = (key[r] >> shift) & mask;
            const int dst = gbase[digit] + hist[digit] + (rank_pos[r] >> 16);
            peer<G>(skey, dst / Sb)[dst % Sb] = key[r];
            peer<G>(spos, dst / Sb)[dst % Sb] = rank_pos[r] & 0xffff;
        }
        cluster_sync<G>();
    }

    // Runs of equal keys. Run starts: a max-scan of the head indices in list order; then the
    // last entry of each run writes the run's length over the run's first key, where every
    // entry of the run reads it.
    int start[kRounds];
    unsigned last = 0;  // bit r: this thread's entry of round r ends its run
    int carry = -1;
#pragma unroll
    for (int r = 0; r < kRounds; r++) {
        if (r >= rounds) break;
        const int i = first + r * 32, e = e0 + i;
        int head = -1;
        if (i < nb) {
            key[r] = skey[i];
            const int prev = i > 0 ? skey[i - 1] : (q > 0 ? peer<G>(skey, q - 1)[Sb - 1] : -1);
            const int next = i + 1 < nb ? skey[i + 1] : (e + 1 < S ? peer<G>(skey, q + 1)[0] : -1);
            if (prev != key[r]) head = e;
            if (next != key[r]) last |= 1u << r;
        }
        start[r] = max(carry, warp_inclusive_scan(head, Max()));
        carry = __shfl_sync(kFullMask, start[r], 31);
    }
    int block_max;
    const int before = block_exclusive_scan(lane == 31 ? carry : -1, -1, Max(), buf, &block_max);
    const int before_block = cluster_exclusive<G>(block_max, -1, Max(), slot);  // keys all read
#pragma unroll
    for (int r = 0; r < kRounds; r++) {
        if (r >= rounds) break;
        start[r] = max(start[r], max(before, before_block));
        const int i = first + r * 32;
        if (i < nb && (last >> r & 1u))
            peer<G>(skey, start[r] / Sb)[start[r] % Sb] = e0 + i - start[r] + 1;
    }
    cluster_sync<G>();
    // start[r] becomes the entry's link; long-run entries get -2 and a place in the long list
    int nlong = 0;
#pragma unroll
    for (int r = 0; r < kRounds; r++) {
        if (r >= rounds) break;
        const int i = first + r * 32;
        bool is_long = false;
        if (i < nb) {
            const int len = peer<G>(skey, start[r] / Sb)[start[r] % Sb];
            is_long = key[r] != V && len > kShortRun;
            if (key[r] == V || len > kShortRun)
                start[r] = is_long ? -2 : -1;
            else
                start[r] = (last >> r & 1u) ? (start[r] << 5 | (len - 1)) : -1;
            links[spos[i]] = max(start[r], -1);
        }
        nlong += __popc(__ballot_sync(kFullMask, is_long));
    }
    int block_long;
    // (lane 31 speaks for the warp, so no lane of the warp counts its own warp)
    int at = block_exclusive_scan(lane == 31 ? nlong : 0, 0, Plus(), buf, &block_long);
    const int long_before = cluster_exclusive<G>(block_long, 0, Plus(), slot);
    at += long_before;
#pragma unroll
    for (int r = 0; r < kRounds; r++) {
        if (r >= rounds) break;
        const int i = first + r * 32;
        const bool is_long = i < nb && start[r] == -2;
        const unsigned ballot = __ballot_sync(kFullMask, is_long);
        if (is_long) {
            const int dst = at + __popc(ballot & lanes_below);
            long_keys[dst] = key[r];
            long_rows[dst] = chunk.base + spos[i];
        }
        at += __popc(ballot);
    }
    for (int i = threadIdx.x; i < nb; i += kSortThreads) sorted_rows[e0 + i] = chunk.base + spos[i];
    if (q == G - 1 && threadIdx.x == 0) {  // the last block knows the whole list's length
        counts[kLongCount] = long_before + block_long;
        counts[kOwnerCount] = 0;
    }
    cluster_sync<G>();  // no block leaves while others may read its shared memory
}

// ---- backward, 2: dwpe and short runs by position, long runs by tile ---------------------------

// One block per local position t (and channel slice); thread group y = threadIdx.y holds the
// rows b = y * kRowsPerThread + u. dwpe first, then the short runs that end at this position.
template <typename T, int VEC>
__device__ __forceinline__ void backward_position(T* __restrict__ dwte, T* __restrict__ dwpe,
                                                  const T* __restrict__ dout,
                                                  const int* __restrict__ idx,
                                                  const int* __restrict__ links,
                                                  const int* __restrict__ sorted_rows,
                                                  const Chunk& chunk, int t, int c, int C) {
    extern __shared__ float part[];  // [kGroups][blockDim.x * VEC]: each group's dwpe share
    const int y = threadIdx.y, b0 = y * kRowsPerThread;
    const bool active = c < C;
    float g[kRowsPerThread][VEC];  // dout[b0 + u, t0 + t], kept from the dwpe sum to dwte
    int id[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++) {
        const int b = b0 + u;
#pragma unroll
        for (int k = 0; k < VEC; k++) g[u][k] = 0.0f;
        if (b < chunk.Bc) {
            const int row = chunk.base + b * chunk.Tc + t;
            id[u] = idx[row];
            if (active) load_vec<T, VEC>(g[u], dout + (long long)row * C + c);
        }
    }
    float sum[VEC];
#pragma unroll
    for (int k = 0; k < VEC; k++) sum[k] = 0.0f;
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++) {
        if (b0 + u >= chunk.Bc) break;
#pragma unroll
        for (int k = 0; k < VEC; k++) sum[k] += g[u][k];
    }
    float* mine = part + (y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; k++) mine[k] = sum[k];
    __syncthreads();
    if (y == 0 && active) {  // the groups' shares in group order
        T* prow = dwpe + (long long)(chunk.t0 + t) * C + c;
        float w[VEC];
        load_vec<T, VEC>(w, prow);
        for (int y2 = 1; y2 < kGroups && y2 * kRowsPerThread < chunk.Bc; y2++) {
            const float* other = part + (y2 * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
            for (int k = 0; k < VEC; k++) sum[k] += other[k];
        }
#pragma unroll
        for (int k = 0; k < VEC; k++) w[k] += sum[k];
        store_vec<T, VEC>(prow, w);
    }

    pdl_wait();  // the links are the sort's
    if (!active) return;
    // Every dwte row written here belongs to one run, and no other block writes it, so all loads
    // can go before the stores.
    int link[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++)
        link[u] = b0 + u < chunk.Bc ? links[(b0 + u) * chunk.Tc + t] : -1;
    float w[kRowsPerThread][VEC];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++)
        if (link[u] >= 0) load_vec<T, VEC>(w[u], dwte + (long long)id[u] * C + c);
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++) {
        if (link[u] < 0) continue;
        // the run's rows in sorted order; this position's own row is the last of them
        const int run0 = link[u] >> 5, len = (link[u] & 31) + 1;
        float acc[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) acc[k] = 0.0f;
#pragma unroll 4
        for (int j = 0; j < len - 1; j++) {
            float h[VEC];
            load_vec<T, VEC>(h, dout + (long long)sorted_rows[run0 + j] * C + c);
#pragma unroll
            for (int k = 0; k < VEC; k++) acc[k] += h[k];
        }
#pragma unroll
        for (int k = 0; k < VEC; k++) w[u][k] += acc[k] + g[u][k];
        store_vec<T, VEC>(dwte + (long long)id[u] * C + c, w[u]);
    }
}

// One tile per thread group y. Partial slots: 2*tile holds the tile's share of a run that began
// in an earlier tile ("head"), 2*tile+1 the share of a run that begins here and goes on into the
// next tile ("tail"); the tile that holds a run's tail registers as its owner for run_sum.
template <typename T, int VEC>
__device__ __forceinline__ void backward_long_tile(T* __restrict__ dwte, float* __restrict__ partials,
                                                   int* __restrict__ owners, int* __restrict__ counts,
                                                   const T* __restrict__ dout,
                                                   const int* __restrict__ keys,
                                                   const int* __restrict__ rows, int M, int tile,
                                                   int c, int C) {
    __shared__ int skey_all[kGroups][kTile + 2];  // [0]: entry before the tile, [n+1]: after
    __shared__ int srow_all[kGroups][kTile];
    int* skey = skey_all[threadIdx.y];
    int* srow = srow_all[threadIdx.y];
    const int k0 = tile * kTile;
    const int n = min(kTile, M - k0);  // <= 0: no tile for this group
    for (int j = threadIdx.x; j < n + 2; j += blockDim.x) {
        const int k = k0 - 1 + j;
        skey[j] = (k >= 0 && k < M) ? keys[k] : -1;
        if (j >= 1 && j <= n) srow[j - 1] = rows[k];
    }
    __syncthreads();
    if (n <= 0) return;
    const int prev_key = skey[0], next_key = skey[n + 1];
    // A run is contiguous, so the tile's last run began before the tile only if it fills the tile.
    if (blockIdx.y == 0 && threadIdx.x == 0 && skey[n] == next_key && skey[n] != prev_key)
        owners[atomicAdd(counts + kOwnerCount, 1)] = tile;
    if (c >= C) return;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; k++) acc[k] = 0.0f;
    for (int j0 = 0; j0 < n; j0 += kTileAhead) {
        // All loads of the batch first (they are independent), then the ordered additions.
        float g[kTileAhead][VEC], w[kTileAhead][VEC];
#pragma unroll
        for (int u = 0; u < kTileAhead; u++) {
            const int j = j0 + u;
            if (j >= n) break;
            const int key = skey[j + 1];
            load_vec<T, VEC>(g[u], dout + (long long)srow[j] * C + c);
            // a run that starts and ends in this tile is added to its row right here
            if (skey[j + 2] != key && key != prev_key)
                load_vec<T, VEC>(w[u], dwte + (long long)key * C + c);
        }
#pragma unroll
        for (int u = 0; u < kTileAhead; u++) {
            const int j = j0 + u;
            if (j >= n) break;
            const int key = skey[j + 1];
#pragma unroll
            for (int k = 0; k < VEC; k++) acc[k] += g[u][k];
            const bool tile_end = j == n - 1;
            if (!tile_end && skey[j + 2] == key) continue;  // the run goes on in this tile
            if (key == prev_key) {
                store_partial<VEC>(partials + (2LL * tile) * C + c, acc);
            } else if (tile_end && next_key == key) {
                store_partial<VEC>(partials + (2LL * tile + 1) * C + c, acc);
            } else {
#pragma unroll
                for (int k = 0; k < VEC; k++) w[u][k] += acc[k];
                store_vec<T, VEC>(dwte + (long long)key * C + c, w[u]);
            }
#pragma unroll
            for (int k = 0; k < VEC; k++) acc[k] = 0.0f;
        }
    }
}

// blockIdx.x < Tc: a position; above: kGroups tiles of the long-run list (usually empty).
// blockIdx.y: a slice of blockDim.x * VEC channels.
template <typename T, int VEC>
__global__ void __launch_bounds__(kGroups * 64, 4) encoder_backward_kernel(T* __restrict__ dwte, T* __restrict__ dwpe,
                                        int* __restrict__ s, EncoderPlan p,
                                        const T* __restrict__ dout, const int* __restrict__ idx,
                                        Chunk chunk, int C) {
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if ((int)blockIdx.x < chunk.Tc) {
        backward_position<T, VEC>(dwte, dwpe, dout, idx, s + p.links, s + p.sorted_rows, chunk,
                                  blockIdx.x, c, C);
        return;
    }
    pdl_wait();
    const int M = s[p.counts + kLongCount];
    const int tile0 = (blockIdx.x - chunk.Tc) * kGroups;
    if (tile0 * kTile >= M) return;  // the whole block: no tile here
    backward_long_tile<T, VEC>(dwte, reinterpret_cast<float*>(s + p.partials), s + p.owners,
                               s + p.counts, dout, s + p.long_keys, s + p.long_rows, M,
                               tile0 + threadIdx.y, c, C);
}

// ---- backward, 3: crossing runs ------------------------------------------------------------

// First index after k whose key differs from keys[k] (keys ascend over [0, M)); warp-cooperative:
// each round the 32 lanes probe 32 evenly spaced entries and the first probe past the key narrows
// the range ~32-fold.
__device__ int run_end(const int* keys, int M, int k, int lane) {
    const int key0 = keys[k];
    int lo = k + 1, hi = M;
    while (lo < hi) {
        const int step = (hi - lo + 31) / 32;
        const int q = min(lo + step * (lane + 1) - 1, hi - 1);
        const unsigned gt = __ballot_sync(kFullMask, keys[q] > key0);
        if (gt == 0u) break;  // keys[hi-1] <= key0 (lane 31 probed it): the answer is hi
        const int l = __ffs(gt) - 1;
        const int q_first = __shfl_sync(kFullMask, q, l);
        const int q_before = __shfl_sync(kFullMask, q, l > 0 ? l - 1 : 0);
        hi = q_first;  // keys[q_first] > key0
        lo = l > 0 ? q_before + 1 : lo;
    }
    return hi;
}

// One block per owner (grid-stride; blockIdx.y: a slice of 32*VEC channels). The run's partial
// slots (tail of the owner tile, heads of the following tiles) are split into kRunWarps
// contiguous ranges, one per warp, and the warp sums are added in warp order: fixed order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRunWarps * 32)
encoder_run_sum_kernel(T* __restrict__ dwte, const int* __restrict__ s, EncoderPlan p, int C) {
    __shared__ float red[kRunWarps][32 * VEC];
    pdl_wait();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c = (blockIdx.y * 32 + lane) * VEC;
    const int* keys = s + p.long_keys;
    const int M = s[p.counts + kLongCount];
    const int count = s[p.counts + kOwnerCount];
    const float* partials = reinterpret_cast<const float*>(s + p.partials);
    for (int o = blockIdx.x; o < count; o += gridDim.x) {
        const int tile = s[p.owners + o];
        const int k_last = (tile + 1) * kTile - 1;  // an owner tile is full: its run goes on
        const int end = run_end(keys, M, k_last, lane);
        const int nslots = (end - 1) / kTile - tile + 1;
        const int s0 = (int)((long long)warp * nslots / kRunWarps);
        const int s1 = (int)((long long)(warp + 1) * nslots / kRunWarps);
        float sum[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) sum[k] = 0.0f;
        if (c < C) {
#pragma unroll 4
            for (int i = s0; i < s1; i++) {
                const long long slot = i == 0 ? 2LL * tile + 1 : 2LL * (tile + i);
                float v[VEC];
                load_partial<VEC>(v, partials + slot * C + c);
#pragma unroll
                for (int k = 0; k < VEC; k++) sum[k] += v[k];
            }
        }
#pragma unroll
        for (int k = 0; k < VEC; k++) red[warp][lane * VEC + k] = sum[k];
        __syncthreads();
        if (warp == 0 && c < C) {
            T* row = dwte + (long long)keys[k_last] * C + c;
            float r[VEC];
            load_vec<T, VEC>(r, row);
            float tot[VEC];
#pragma unroll
            for (int k = 0; k < VEC; k++) tot[k] = sum[k];
            for (int w2 = 1; w2 < kRunWarps; w2++) {
#pragma unroll
                for (int k = 0; k < VEC; k++) tot[k] += red[w2][lane * VEC + k];
            }
#pragma unroll
            for (int k = 0; k < VEC; k++) r[k] += tot[k];
            store_vec<T, VEC>(row, r);
        }
        __syncthreads();  // red is reused by the next owner
    }
}

template <int G>
void launch_sort(const EncoderPlan& p, const Chunk& chunk, int* s, const int* ids, int V,
                 cudaStream_t st) {
    const char* op = "encoder_backward";
    set_smem(op, encoder_sort_kernel<G>, sort_smem_bytes(p.max_rounds));
    const int Sb = ceil_div(chunk.size(), G);
    const int rounds = ceil_div(Sb, kSortThreads);
    launch_ex(op, encoder_sort_kernel<G>, dim3(G), dim3(kSortThreads), sort_smem_bytes(rounds), st,
              G, false, s + p.links, s + p.sorted_rows, s + p.long_keys, s + p.long_rows,
              s + p.counts, ids, chunk, V, p.passes, p.digit_bits, Sb, rounds);
}

template <typename T, int VEC>
void launch_backward(T* dwte, T* dwpe, int* s, const EncoderPlan& p, const Chunk& chunk,
                     const T* dout, const int* idx, int C, cudaStream_t st) {
    const char* op = "encoder_backward";
    const int cv = C / VEC;  // vectors per row
    // 64 threads across the row (a slice of it) times kGroups: small blocks, several per SM
    const int threads = std::min(64, (cv + 31) / 32 * 32);
    const int slices = ceil_div(cv, threads);
    const int run_slices = ceil_div(cv, 32);
    if (slices > 65535 || run_slices > 65535)
        throw std::invalid_argument("encoder_backward: C too large for the grid");
    const int tile_blocks = ceil_div(ceil_div(chunk.size(), kTile), kGroups);
    const size_t smem = sizeof(float) * kGroups * threads * VEC;
    launch_ex(op, encoder_backward_kernel<T, VEC>, dim3(chunk.Tc + tile_blocks, slices),
              dim3(threads, kGroups), smem, st, 1, p.hopper, dwte, dwpe, s, p, dout, idx, chunk, C);
    launch_ex(op, encoder_run_sum_kernel<T, VEC>,
              dim3(std::min(ceil_div(chunk.size(), kTile), kRunBlocks), run_slices),
              dim3(kRunWarps * 32), 0, st, 1, p.hopper, dwte, s, p, C);
}

}  // namespace

void encoder_forward(uintptr_t out, uintptr_t idx, uintptr_t wte, uintptr_t wpe, int B, int T,
                     int C, int V, int dtype, uintptr_t stream) {
    if (B <= 0 || T <= 0 || C <= 0 || V <= 0)
        throw std::invalid_argument("encoder_forward: B, T, C, V must be positive");
    const long long N = (long long)B * T;
    if (N > 0x7fffffffLL) throw std::invalid_argument("encoder_forward: B*T does not fit int32");
    DISPATCH_STORAGE("encoder_forward", dtype, [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = C % kVec == 0 && aligned16(out) && aligned16(wte) && aligned16(wpe);
        const int cv = vec ? C / kVec : C;
        // threads.x over the row's vectors; small rows share a block (threads.y rows)
        int tx = 1;
        if (cv >= 32) tx = std::min(256, (cv + 31) / 32 * 32);
        else while (tx < cv) tx *= 2;
        const int ty = std::max(1, 256 / tx);
        const dim3 grid(ceil_div(N, ty), ceil_div(cv, tx));
        if (grid.y > 65535)
            throw std::invalid_argument("encoder_forward: C too large for the grid");
        if (vec)
            encoder_forward_kernel<scalar_t, kVec><<<grid, dim3(tx, ty), 0, as_stream(stream)>>>(
                as_ptr<scalar_t>(out), as_ptr<const int>(idx), as_ptr<const scalar_t>(wte),
                as_ptr<const scalar_t>(wpe), (int)N, T, C, V);
        else
            encoder_forward_kernel<scalar_t, 1><<<grid, dim3(tx, ty), 0, as_stream(stream)>>>(
                as_ptr<scalar_t>(out), as_ptr<const int>(idx), as_ptr<const scalar_t>(wte),
                as_ptr<const scalar_t>(wpe), (int)N, T, C, V);
    });
    check_launch("encoder_forward");
}

long long encoder_backward_scratch_size(int B, int T, int C, int V) {
    return encoder_plan("encoder_backward_scratch_size", B, T, C, V).total;
}

void encoder_backward(uintptr_t dwte, uintptr_t dwpe, uintptr_t scratch, uintptr_t dout,
                      uintptr_t idx, int B, int T, int C, int V, int dtype, uintptr_t stream) {
    const char* op = "encoder_backward";
    const EncoderPlan p = encoder_plan(op, B, T, C, V);
    cudaStream_t st = as_stream(stream);
    int* s = as_ptr<int>(scratch);
    const int* ids = as_ptr<const int>(idx);
    DISPATCH_STORAGE(op, dtype, [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = C % kVec == 0 && aligned16(dwte) && aligned16(dwpe) && aligned16(dout) &&
                         aligned16(scratch);
        // Chunks in a fixed order, so each row's sum over chunks is too.
        for (int b0 = 0; b0 < B; b0 += p.Bc) {
            for (int t0 = 0; t0 < T; t0 += p.Tc) {
                const Chunk chunk{b0 * T + t0, t0, std::min(p.Bc, B - b0), std::min(p.Tc, T - t0)};
                if (p.hopper)
                    launch_sort<kCluster>(p, chunk, s, ids, V, st);
                else
                    launch_sort<1>(p, chunk, s, ids, V, st);
                check_launch(op);
                if (vec)
                    launch_backward<scalar_t, kVec>(as_ptr<scalar_t>(dwte), as_ptr<scalar_t>(dwpe),
                                                    s, p, chunk, as_ptr<const scalar_t>(dout), ids,
                                                    C, st);
                else
                    launch_backward<scalar_t, 1>(as_ptr<scalar_t>(dwte), as_ptr<scalar_t>(dwpe), s,
                                                 p, chunk, as_ptr<const scalar_t>(dout), ids, C, st);
            }
        }
    });
    check_launch(op);
}
