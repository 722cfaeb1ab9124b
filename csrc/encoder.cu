// Token + position embedding.
//
// Forward:  out[b,t,:] = wte[idx[b,t],:] + wpe[t,:]
// Backward: out is a sum of one row of each table, so every dout row flows unchanged into the
//   row it was gathered from:  dwte[v] += sum of dout[b,t] over the (b,t) with idx[b,t] == v,
//   dwpe[t] += sum over b of dout[b,t].
//
// The backward must give the same bits on every run, so there are no float atomics: the
// (position, row) pairs are put into one fixed order and every row's sum is taken in that order.
//   1. A stable LSD radix sort of the token ids (8-bit digits, two passes for a 50k vocabulary)
//      lists the positions sorted by (token id, position). Integer work only: each warp ranks its
//      chunk of ids with __match_any_sync, one exclusive scan over the (digit, chunk) counts gives
//      every chunk its offsets, a scatter writes the permutation. Out-of-range ids get the key V,
//      which sorts last and is skipped (their rows reach no dwte row).
//   2. The dwpe half needs no sort: position-major order (t, then b) is already grouped by t.
//      The two halves form one list of 2N entries whose keys ascend (token ids 0..V-1, V for
//      skipped ids, then V+1+t), so one pair of kernels reduces both.
//   3. The list is cut into tiles of kTile entries. A block per tile sums each run of equal keys
//      in list order; a run that lies inside the tile is added to its gradient row directly (no
//      other block touches that row), a run that crosses a tile boundary leaves one partial sum
//      per tile in scratch. A second kernel adds each crossing run's partials in tile order. So a
//      frequent token (or all ids equal) is spread over many blocks instead of serialized in one.

#include <algorithm>
#include <cstring>

#include "common.cuh"
#include "launchers.h"

namespace {

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

// ---- backward, step 1: stable radix sort of the token ids ----------------------------------
constexpr int kMaxBins = 256;   // 8-bit digits
constexpr int kRankWarps = 4;   // warps (= chunks) per rank block
constexpr int kMinRounds = 16;  // a chunk is rounds*32 ids
constexpr int kMaxChunks = 256; // bounds the (digit, chunk) table the scan walks
constexpr int kBatch = 8;       // ids a warp loads before ranking them (latency hiding)

__device__ __forceinline__ int token_key(int id, int V) { return (id >= 0 && id < V) ? id : V; }

// Warp w ranks chunk w: rank[i] = number of earlier ids in the chunk with the same digit (ids
// taken in position order, 32 per round), table[d * nchunks + chunk] = count of digit d.
// keys_in == nullptr on the first pass: keys come from idx (out-of-range ids -> V); that pass
// also zeroes the owner counter the reduction uses.
__global__ void __launch_bounds__(kRankWarps * 32)
radix_rank_kernel(int* __restrict__ rank, int* __restrict__ table, int* __restrict__ owner_count,
                  const int* __restrict__ idx, const int* __restrict__ keys_in, int N, int V,
                  int shift, int mask, int rounds, int nchunks) {
    __shared__ int hist[kRankWarps][kMaxBins + 1];  // last bin: lanes past N
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int chunk = blockIdx.x * kRankWarps + warp;
    if (owner_count != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *owner_count = 0;
    if (chunk >= nchunks) return;  // whole warp
    int* h = hist[warp];
    for (int d = lane; d <= kMaxBins; d += 32) h[d] = 0;
    __syncwarp();
    const int base = chunk * rounds * 32;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int r0 = 0; r0 < rounds && base + r0 * 32 < N; r0 += kBatch) {
        int digit[kBatch];
#pragma unroll
        for (int u = 0; u < kBatch; u++) {
            const int i = base + (r0 + u) * 32 + lane;
            digit[u] = kMaxBins;
            if (r0 + u < rounds && i < N) {
                const int key = keys_in != nullptr ? keys_in[i] : token_key(idx[i], V);
                digit[u] = (key >> shift) & mask;
            }
        }
#pragma unroll
        for (int u = 0; u < kBatch; u++) {
            const int i = base + (r0 + u) * 32 + lane;
            if (r0 + u >= rounds || base + (r0 + u) * 32 >= N) break;  // warp-uniform
            const unsigned peers = __match_any_sync(kFullMask, digit[u]);
            const int my_rank = h[digit[u]] + __popc(peers & lanes_below);
            __syncwarp();
            if (lane == 31 - __clz(peers)) h[digit[u]] += __popc(peers);  // one writer per digit
            __syncwarp();
            if (i < N) rank[i] = my_rank;
        }
    }
    for (int d = lane; d <= mask; d += 32) table[d * nchunks + chunk] = h[d];
}

// In-place exclusive scan of n ints by one block (digit-major table: every (digit, chunk) cell
// becomes the first output slot of that chunk's ids with that digit).
__global__ void __launch_bounds__(1024) exclusive_scan_kernel(int* __restrict__ data, int n) {
    __shared__ int warp_total[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int begin = min((int)threadIdx.x * per, n), end = min(begin + per, n);
    int sum = 0;
    for (int i = begin; i < end; i++) sum += data[i];
    int incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(kFullMask, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        int t = lane < nwarps ? warp_total[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(kFullMask, t, o);
            if (lane >= o) t += y;
        }
        warp_total[lane] = t;
    }
    __syncthreads();
    int running = (warp > 0 ? warp_total[warp - 1] : 0) + incl - sum;
    for (int i = begin; i < end; i++) {
        const int v = data[i];
        data[i] = running;
        running += v;
    }
}

__global__ void radix_scatter_kernel(int* __restrict__ keys_out, int* __restrict__ vals_out,
                                     const int* __restrict__ rank, const int* __restrict__ table,
                                     const int* __restrict__ idx, const int* __restrict__ keys_in,
                                     const int* __restrict__ vals_in, int N, int V, int shift,
                                     int mask, int chunk_len, int nchunks) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    const int key = keys_in != nullptr ? keys_in[i] : token_key(idx[i], V);
    const int val = vals_in != nullptr ? vals_in[i] : i;
    const int dst = table[((key >> shift) & mask) * nchunks + i / chunk_len] + rank[i];
    keys_out[dst] = key;
    vals_out[dst] = val;
}

// ---- backward, steps 2-3: run sums over the combined list ----------------------------------
constexpr int kTile = 32;     // list entries per tile
constexpr int kAhead = 8;     // dout rows a thread loads before adding them up
constexpr int kRunWarps = 8;  // warps sharing one crossing run's partials
constexpr int kRunBlocks = 128;

// Entry k < N: the k-th (token id, position) pair of the sort, key = token id (V: skipped).
// Entry N + t*B + b: position (b, t) with key V + 1 + t. Keys ascend along the list.
struct EntryList {
    const int* keys;
    const int* vals;
    int N, B, seq_len, V;
    __device__ __forceinline__ int key(int k) const {
        return k < N ? keys[k] : V + 1 + (k - N) / B;
    }
    __device__ __forceinline__ int pos(int k) const {
        if (k < N) return vals[k];
        const int j = k - N;
        return (j % B) * seq_len + j / B;
    }
    // First index after k whose key differs from key(k); warp-cooperative (all 32 lanes call it).
    __device__ int run_end(int k, int lane) const {
        if (k >= N) return N + ((k - N) / B + 1) * B;
        const int key0 = keys[k];
        // Upper bound of key0 in keys[lo, hi) by a 32-way search: each round the lanes probe 32
        // evenly spaced entries and the first probe past key0 narrows the range ~32-fold.
        int lo = k + 1, hi = N;
        while (lo < hi) {
            const int step = (hi - lo + 31) / 32;
            const int p = min(lo + step * (lane + 1) - 1, hi - 1);
            const unsigned gt = __ballot_sync(kFullMask, keys[p] > key0);
            if (gt == 0u) break;  // keys[hi-1] <= key0 (lane 31 probed it): the answer is hi
            const int l = __ffs(gt) - 1;
            const int p_first = __shfl_sync(kFullMask, p, l);
            const int p_before = __shfl_sync(kFullMask, p, l > 0 ? l - 1 : 0);
            hi = p_first;  // keys[p_first] > key0
            lo = l > 0 ? p_before + 1 : lo;
        }
        return hi;
    }
};

template <typename T>
__device__ __forceinline__ T* grad_row(T* dwte, T* dwpe, int key, int V, int C) {
    return key < V ? dwte + (long long)key * C : dwpe + (long long)(key - V - 1) * C;
}

// One block per tile (blockIdx.y: channel slice). Partial slots: 2*tile holds the tile's share of
// a run that began in an earlier tile ("head"), 2*tile+1 the share of a run that begins here and
// goes on into the next tile ("tail"); the tile that holds a run's tail registers as its owner.
template <typename T, int VEC>
__global__ void encoder_tile_sum_kernel(T* __restrict__ dwte, T* __restrict__ dwpe,
                                        float* __restrict__ partials, int* __restrict__ owners,
                                        int* __restrict__ owner_count, const T* __restrict__ dout,
                                        EntryList list, int C) {
    __shared__ int skey[kTile + 2];  // [0]: entry before the tile, [n+1]: entry after (-1: none)
    __shared__ int spos[kTile];
    const int L = 2 * list.N;
    const int tile = blockIdx.x;
    const int k0 = tile * kTile;
    const int n = min(kTile, L - k0);
    for (int j = threadIdx.x; j < n + 2; j += blockDim.x) {
        const int k = k0 - 1 + j;
        skey[j] = (k >= 0 && k < L) ? list.key(k) : -1;
        if (j >= 1 && j <= n) spos[j - 1] = list.pos(k);
    }
    __syncthreads();
    const int V = list.V;
    const int prev_key = skey[0], next_key = skey[n + 1];
    // Keys ascend, so the tile's last run began before the tile only if it fills the tile.
    if (blockIdx.y == 0 && threadIdx.x == 0 && skey[n] == next_key && skey[n] != prev_key &&
        skey[n] != V)
        owners[atomicAdd(owner_count, 1)] = tile;

    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (c >= C) return;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; k++) acc[k] = 0.0f;
    for (int j0 = 0; j0 < n; j0 += kAhead) {
        // All loads of the batch first (they are independent), then the ordered additions.
        float g[kAhead][VEC], w[kAhead][VEC];
#pragma unroll
        for (int u = 0; u < kAhead; u++) {
            const int j = j0 + u;
#pragma unroll
            for (int k = 0; k < VEC; k++) g[u][k] = w[u][k] = 0.0f;
            if (j < n) {
                const int key = skey[j + 1];
                if (key != V) {
                    load_vec<T, VEC>(g[u], dout + (long long)spos[j] * C + c);
                    // a run that starts and ends in this tile is added to its row right here
                    if (skey[j + 2] != key && key != prev_key)
                        load_vec<T, VEC>(w[u], grad_row(dwte, dwpe, key, V, C) + c);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kAhead; u++) {
            const int j = j0 + u;
            if (j >= n) break;
            const int key = skey[j + 1];
            if (key == V) continue;
#pragma unroll
            for (int k = 0; k < VEC; k++) acc[k] += g[u][k];
            const bool tile_end = j == n - 1;
            if (!tile_end && skey[j + 2] == key) continue;  // the run goes on in this tile
            if (key == prev_key) {
                store_partial<VEC>(partials + (2LL * tile) * C + c, acc);
            } else if (tile_end && next_key == key) {
                store_partial<VEC>(partials + (2LL * tile + 1) * C + c, acc);
            } else {
                float r[VEC];
#pragma unroll
                for (int k = 0; k < VEC; k++) r[k] = w[u][k] + acc[k];
                store_vec<T, VEC>(grad_row(dwte, dwpe, key, V, C) + c, r);
            }
#pragma unroll
            for (int k = 0; k < VEC; k++) acc[k] = 0.0f;
        }
    }
}

// One block per owner (grid-stride; blockIdx.y: a slice of 32*VEC channels). The run's partial
// slots (tail of the owner tile, heads of the following tiles) are split into kRunWarps
// contiguous ranges, one per warp, and the warp sums are added in warp order: fixed order.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRunWarps * 32)
encoder_run_sum_kernel(T* __restrict__ dwte, T* __restrict__ dwpe,
                       const float* __restrict__ partials, const int* __restrict__ owners,
                       const int* __restrict__ owner_count, EntryList list, int C) {
    __shared__ float red[kRunWarps][32 * VEC];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int c = (blockIdx.y * 32 + lane) * VEC;
    const int count = *owner_count;
    for (int o = blockIdx.x; o < count; o += gridDim.x) {
        const int tile = owners[o];
        const int k_last = (tile + 1) * kTile - 1;  // an owner tile is full: its run goes on
        const int key = list.key(k_last);
        const int end = list.run_end(k_last, lane);
        const int nslots = (end - 1) / kTile - tile + 1;
        const int s0 = (int)((long long)warp * nslots / kRunWarps);
        const int s1 = (int)((long long)(warp + 1) * nslots / kRunWarps);
        float s[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) s[k] = 0.0f;
        if (c < C) {
#pragma unroll 4
            for (int i = s0; i < s1; i++) {
                const long long slot = i == 0 ? 2LL * tile + 1 : 2LL * (tile + i);
                float v[VEC];
                load_partial<VEC>(v, partials + slot * C + c);
#pragma unroll
                for (int k = 0; k < VEC; k++) s[k] += v[k];
            }
        }
#pragma unroll
        for (int k = 0; k < VEC; k++) red[warp][lane * VEC + k] = s[k];
        __syncthreads();
        if (warp == 0 && c < C) {
            T* row = grad_row(dwte, dwpe, key, list.V, C) + c;
            float r[VEC];
            load_vec<T, VEC>(r, row);
            float tot[VEC];
#pragma unroll
            for (int k = 0; k < VEC; k++) tot[k] = s[k];
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

// ---- scratch layout (int32 elements) -------------------------------------------------------
struct EncoderPlan {
    int N, rounds, nchunks, ntiles, bits, passes, digit_bits;
    long long keys_a, vals_a, keys_b, vals_b, rank, table, owner_count, owners, partials, total;
};

inline long long round_up(long long x, long long m) { return (x + m - 1) / m * m; }

EncoderPlan encoder_plan(const char* op, int B, int T, int C, int V) {
    if (B <= 0 || T <= 0 || C <= 0 || V <= 0)
        throw std::invalid_argument(std::string(op) + ": B, T, C, V must be positive");
    const long long N = (long long)B * T;
    // The combined list has 2N entries and keys up to V + T, both held in int.
    if (N > (1LL << 30) || (long long)V + T >= (1LL << 31) - 1)
        throw std::invalid_argument(std::string(op) +
                                    ": B*T must be at most 2^30 and V + T below 2^31 - 1");
    EncoderPlan p{};
    p.N = (int)N;
    p.rounds = (int)std::max<long long>(kMinRounds, (N + 32LL * kMaxChunks - 1) /
                                                        (32LL * kMaxChunks));
    p.nchunks = (int)((N + 32LL * p.rounds - 1) / (32LL * p.rounds));
    p.ntiles = (int)((2 * N + kTile - 1) / kTile);
    p.bits = 32 - __builtin_clz((unsigned)V);  // keys are 0..V
    p.passes = (p.bits + 7) / 8;
    p.digit_bits = (p.bits + p.passes - 1) / p.passes;
    long long off = 0;
    auto take = [&](long long n) {  // 256-byte aligned regions
        const long long o = off;
        off = round_up(off + n, 64);
        return o;
    };
    p.keys_a = take(N);
    p.vals_a = take(N);
    p.keys_b = take(N);
    p.vals_b = take(N);
    p.rank = take(N);
    p.table = take((long long)kMaxBins * p.nchunks);
    p.owner_count = take(1);
    p.owners = take(p.ntiles);
    p.partials = take(2LL * p.ntiles * C);  // float32 (same size as int32)
    p.total = off;
    return p;
}

template <typename T, int VEC>
void launch_run_sums(T* dwte, T* dwpe, int* s, const EncoderPlan& p, EntryList list, const T* dout,
                     int C, cudaStream_t st) {
    const int cv = C / VEC;  // vectors per row
    const int threads = std::min(256, (cv + 31) / 32 * 32);
    const int slices = (cv + threads - 1) / threads;
    const int run_slices = (cv + 31) / 32;
    if (run_slices > 65535)
        throw std::invalid_argument("encoder_backward: C too large for the grid");
    float* partials = reinterpret_cast<float*>(s + p.partials);
    encoder_tile_sum_kernel<T, VEC><<<dim3(p.ntiles, slices), threads, 0, st>>>(
        dwte, dwpe, partials, s + p.owners, s + p.owner_count, dout, list, C);
    encoder_run_sum_kernel<T, VEC><<<dim3(std::min(p.ntiles, kRunBlocks), run_slices),
                                     kRunWarps * 32, 0, st>>>(
        dwte, dwpe, partials, s + p.owners, s + p.owner_count, list, C);
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
    const EncoderPlan p = encoder_plan("encoder_backward", B, T, C, V);
    cudaStream_t st = as_stream(stream);
    int* s = as_ptr<int>(scratch);
    const int* ids = as_ptr<const int>(idx);
    const int N = p.N;

    // Step 1: LSD radix sort of the keys, positions carried along (starting from 0..N-1).
    const int* keys_in = nullptr;
    const int* vals_in = nullptr;
    const int mask = (1 << p.digit_bits) - 1;
    for (int pass = 0; pass < p.passes; pass++) {
        int* keys_out = s + (pass % 2 == 0 ? p.keys_a : p.keys_b);
        int* vals_out = s + (pass % 2 == 0 ? p.vals_a : p.vals_b);
        const int shift = pass * p.digit_bits;
        radix_rank_kernel<<<ceil_div(p.nchunks, kRankWarps), kRankWarps * 32, 0, st>>>(
            s + p.rank, s + p.table, pass == 0 ? s + p.owner_count : nullptr, ids, keys_in, N, V,
            shift, mask, p.rounds, p.nchunks);
        exclusive_scan_kernel<<<1, 1024, 0, st>>>(s + p.table, (mask + 1) * p.nchunks);
        radix_scatter_kernel<<<ceil_div(N, 256), 256, 0, st>>>(
            keys_out, vals_out, s + p.rank, s + p.table, ids, keys_in, vals_in, N, V, shift, mask,
            p.rounds * 32, p.nchunks);
        keys_in = keys_out;
        vals_in = vals_out;
    }

    // Steps 2-3: run sums over the sorted token entries followed by the position entries.
    const EntryList list{keys_in, vals_in, N, B, T, V};
    DISPATCH_STORAGE("encoder_backward", dtype, [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = C % kVec == 0 && aligned16(dwte) && aligned16(dwpe) && aligned16(dout) &&
                         aligned16(scratch);
        if (vec)
            launch_run_sums<scalar_t, kVec>(as_ptr<scalar_t>(dwte), as_ptr<scalar_t>(dwpe), s, p,
                                            list, as_ptr<const scalar_t>(dout), C, st);
        else
            launch_run_sums<scalar_t, 1>(as_ptr<scalar_t>(dwte), as_ptr<scalar_t>(dwpe), s, p,
                                         list, as_ptr<const scalar_t>(dout), C, st);
    });
    check_launch("encoder_backward");
}
