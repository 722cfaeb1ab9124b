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
// 16384 positions: a rectangle b0 <= b < b0+Bc, t0 <= t < t0+Tc), each in two stages, four
// kernels chained by programmatic dependent launch (each may start while the one before
// finishes, and waits for it where it must):
//   1. group: zero resets the counters of the chunk's ids; count counts each id's positions
//      with integer atomics (exact in any order; one per id and warp) and drops the first
//      kShortRun of them in the id's bucket, in an order that varies; ids with more positions
//      are listed as long, and long_sort lists their entries sorted by (id, position): per long
//      id, a ballot over the chunk's ids (copied to shared memory) gives the bitmask of its
//      positions, already in order.
//   2. backward: one block per position t reads the Bc rows dout[b0.., t] and adds their sum to
//      dwpe[t] (this needs no grouping, so the first blocks do it while the grouping runs), then
//      adds the short runs to their dwte rows: a run of one straight from registers, a longer
//      one by the block that holds its last position, which ranks the bucket's positions and
//      re-reads the few other rows in position order. These blocks wait only for count (a
//      counter its blocks raise), not for long_sort. Extra blocks take the long runs (frequent
//      ids) in tiles of kTile sorted entries: a run inside a tile is added to its row directly,
//      a run that crosses tiles leaves one partial sum per tile in scratch, so a run of
//      thousands is spread over many blocks instead of serialized in one. The last blocks wait
//      for the tiles (another counter) and add each crossing run's partials to its row, in tile
//      order.
// Nothing summed depends on the order in which the atomics arrived.
// With random ids over a 50k vocabulary nearly every run is short and dout is read about 1.05
// times; the rows of a frequent id are read twice (for dwpe, then in its tile). The scratch
// holds a counter and a bucket per vocabulary id (17 ints), which the zero kernel resets for
// the ids it meets, so it needs no clearing between calls.
//
// The grouping can also be made ahead, on the host, where the ids come from (the training loop
// has them in host memory before the forward): encoder_backward_plan sorts each chunk's
// positions by (id, position) with a stable radix sort and writes a plan (the ids themselves,
// then per chunk: each position's run, the sorted positions, the long-run list and the tiles
// where a run crosses into the next). Given a plan, encoder_backward launches only the backward
// kernel, whose position blocks find their runs already listed and never wait. Both ways list
// the same runs in the same order, so they give the same bits.

#include <algorithm>
#include <iterator>
#include <string>
#include <vector>

#include "common.cuh"
#include "launchers.h"

namespace {

// Partial sums are float32 whatever the storage type (VEC of them, 16-byte aligned when VEC%4==0).
// They are read from L2 (__ldcg): blocks of the same grid wrote them.
template <int VEC>
__device__ __forceinline__ void load_partial(float (&dst)[VEC], const float* src) {
    if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int k = 0; k < VEC; k += 4) {
            const float4 f = __ldcg(reinterpret_cast<const float4*>(src + k));
            dst[k] = f.x; dst[k + 1] = f.y; dst[k + 2] = f.z; dst[k + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int k = 0; k < VEC; k++) dst[k] = __ldcg(src + k);
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
constexpr int kChunkCap = 16384;       // positions per chunk
constexpr int kGroupThreads = 512;     // = kChunkCap / 32: a long-run block has a warp per 1024
constexpr int kGroups = 4;             // threadIdx.y of the backward kernel
constexpr int kRowsPerThread = 4;      // dout rows one backward thread keeps
constexpr int kMaxRows = kGroups * kRowsPerThread;  // sequences per chunk
constexpr int kShortRun = 16;          // most positions of one id added by a position block
constexpr int kMaxLong = kChunkCap / (kShortRun + 1);  // ids with more positions, at most
constexpr int kTile = 32;              // sorted long-run entries per tile
constexpr int kTileAhead = 4;          // rows a tile thread loads before adding them up
constexpr int kPrefetchWaves = 2;      // waves ahead whose dout a waiting position block prefetches
static_assert(kGroupThreads * 32 == kChunkCap, "sort_long_runs: one ballot bit per position");
static_assert(kMaxLong <= 2 * kGroupThreads, "sort_long_runs: two long ids per thread");

// The positions (b0 + b, t0 + t) for b < Bc, t < Tc, with local index p = b * Tc + t. A chunk is
// whole sequences (t0 = 0, Tc = T) or part of one (Bc = 1), so the dout row of p is base + p.
struct Chunk {
    int base, t0, Bc, Tc;
    __host__ __device__ int size() const { return Bc * Tc; }
};

// Scratch, int32 elements (float32 for the partials). Sized for the largest chunk.
struct EncoderPlan {
    int Bc, Tc;              // chunk shape
    bool hopper;             // dependent launches
    int sms;                 // multiprocessors
    int long_blocks;         // blocks of encoder_long_sort_kernel
    long long id_count, bucket, long_ids, long_keys, long_rows, counts, tile_done, owners,
        partials, total;
};

// counts[kLongCount]: entries in the long-run list; counts[kOwnerCount]: crossing runs
// registered by their tiles; counts[kLongIds]: ids with long runs (long_ids, unordered);
// counts[kCountDone]: count blocks that have finished. tile_done[slice]: tile blocks of that
// channel slice that have stored their partial sums.
constexpr int kLongCount = 0, kOwnerCount = 1, kLongIds = 2, kCountDone = 3;

inline long long round_up(long long x, long long m) { return (x + m - 1) / m * m; }

// Chunks: whole sequences, up to kMaxRows of them and kChunkCap positions; or, for a longer
// sequence, kChunkCap positions of one.
struct ChunkShape {
    int Bc, Tc;
};
inline ChunkShape chunk_shape(int B, int T) {
    const int Tc = std::min(T, kChunkCap);
    return {std::min({B, kMaxRows, kChunkCap / Tc}), Tc};
}

// fn(chunk, j) for the chunks of a (B, T) batch in their one fixed order (j = 0, 1, ...): the
// launches follow it, so each row's sum over chunks has a fixed order too, and so does a plan's
// list of regions.
template <typename Fn>
void for_each_chunk(int B, int T, ChunkShape cs, Fn fn) {
    long long j = 0;
    for (int b0 = 0; b0 < B; b0 += cs.Bc)
        for (int t0 = 0; t0 < T; t0 += cs.Tc, j++)
            fn(Chunk{b0 * T + t0, t0, std::min(cs.Bc, B - b0), std::min(cs.Tc, T - t0)}, j);
}

// Offsets of consecutive 256-byte aligned regions in an int32 buffer: take(n) places n elements.
struct Regions {
    long long total = 0;
    long long operator()(long long n) {
        const long long at = total;
        total = round_up(total + n, 64);
        return at;
    }
};

// The backward kernel's block: blockDim.x threads across a slice of the row (64 when the row has
// that many vectors), kGroups groups of rows; small blocks, several per SM.
struct Slicing {
    int threads, slices;
};
inline Slicing slicing(int C, int vec) {
    const int cv = C / vec;  // vectors per row
    const int threads = std::min(64, (cv + 31) / 32 * 32);
    const int slices = ceil_div(cv, threads);
    if (slices > 65535) throw std::invalid_argument("encoder_backward: C too large for the grid");
    return {threads, slices};
}

// A host plan, int32 elements: the B*T ids, then one region per chunk (in launch order) at
// these offsets. head[kLongCount]: entries in the long-run list, head[kOwnerCount]: runs that
// cross tiles; run: per local position {index in order of its run's first entry, its length,
// negated unless the position is the run's last};
// order: the local positions sorted by (id, position); long_keys/long_rows: (id, row) of the
// entries of runs longer than kShortRun, in that order; owners: the tile where each crossing run
// begins; tile_done, runs_past: per channel slice, counters the kernel uses and leaves at zero.
struct PlanLayout {
    int Bc, Tc;
    long long ids, region, total;  // ints before the first region, per region, in all
    long long head, run, order, long_keys, long_rows, owners, tile_done, runs_past;
};

PlanLayout plan_layout(const char* op, int B, int T, int C) {
    if (B <= 0 || T <= 0 || C <= 0)
        throw std::invalid_argument(std::string(op) + ": B, T, C must be positive");
    if ((long long)B * T > (1LL << 30))
        throw std::invalid_argument(std::string(op) + ": B*T must be at most 2^30");
    const ChunkShape cs = chunk_shape(B, T);
    const long long S = (long long)cs.Bc * cs.Tc;
    const int slices = slicing(C, 1).slices;  // the most either vector width uses
    PlanLayout L{};
    L.Bc = cs.Bc;
    L.Tc = cs.Tc;
    Regions take;
    L.head = take(4);
    L.run = take(2 * S);
    L.order = take(S);
    L.long_keys = take(S);
    L.long_rows = take(S);
    L.owners = take((S + kTile - 1) / kTile);
    L.tile_done = take(slices);
    L.runs_past = take(slices);
    L.region = take.total;
    L.ids = round_up((long long)B * T, 64);
    const long long chunks = (long long)ceil_div(B, cs.Bc) * ceil_div(T, cs.Tc);
    L.total = L.ids + chunks * L.region;
    return L;
}

EncoderPlan encoder_plan(const char* op, int B, int T, int C, int V) {
    if (B <= 0 || T <= 0 || C <= 0 || V <= 0)
        throw std::invalid_argument(std::string(op) + ": B, T, C, V must be positive");
    if ((long long)B * T > (1LL << 30))
        throw std::invalid_argument(std::string(op) + ": B*T must be at most 2^30");
    int dev = 0, sms = 0;
    CUDA_CHECK(op, cudaGetDevice(&dev));
    CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    EncoderPlan p{};
    p.hopper = hopper_or_later(op);
    p.sms = sms;
    p.long_blocks = std::min(kMaxLong, sms);  // few: they wait resident for the counts
    const ChunkShape cs = chunk_shape(B, T);
    p.Bc = cs.Bc;
    p.Tc = cs.Tc;
    const long long S = (long long)p.Bc * p.Tc;
    const long long ntiles = (S + kTile - 1) / kTile;
    Regions take;
    p.id_count = take(V);
    p.bucket = take((long long)V * kShortRun);
    p.long_ids = take(kMaxLong);
    p.long_keys = take(S);
    p.long_rows = take(S);
    p.counts = take(4);
    p.tile_done = take(C);  // one per channel slice, and there are at most C
    p.owners = take(ntiles);
    p.partials = take(2 * ntiles * C);
    p.total = take.total;
    return p;
}

struct Plus {
    __device__ int operator()(int a, int b) const { return a + b; }
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

// ---- backward, 1: group one chunk's positions by id --------------------------------------------
// A counting pass in two small kernels (the kernel boundary is its grid-wide barrier; launched
// as dependents, the kernels cost little more than their work):
//   zero:  reset the counters of the chunk's ids;
//   count: count each id's positions with integer atomics, which are exact in any order; each
//          arrival drops its position in the id's bucket of kShortRun slots (in an order that
//          varies), the first arrival past the bucket lists the id as long.
// Nothing summed later depends on the arrival order: the backward kernel ranks a short run's
// positions before it adds them, and long_sort lists the long runs' entries in position order.

// The first kernel of the op waits for whatever came before it in the stream (dout and idx may
// be its outputs) before it lets the next ones launch: they read the inputs before waiting. It
// also resets the arrival counters that the backward kernel polls (count's, the tiles'), and
// does so before it lets anything launch, since the backward kernel's blocks may read them
// while count is still running.
__global__ void __launch_bounds__(kGroupThreads)
encoder_zero_kernel(int* __restrict__ id_count, int* __restrict__ counts,
                    int* __restrict__ tile_done, int slices, const int* __restrict__ idx,
                    Chunk chunk, int V) {
    pdl_wait();
    if (blockIdx.x == 0) {
        for (int i = threadIdx.x; i < slices; i += kGroupThreads) tile_done[i] = 0;
        if (threadIdx.x == 0) {
            counts[kLongIds] = 0;
            counts[kCountDone] = 0;
        }
        __threadfence();
        __syncthreads();
    }
    pdl_launch_dependents();
    const int p = blockIdx.x * kGroupThreads + threadIdx.x;
    if (p < chunk.size()) {
        const int id = idx[chunk.base + p];
        if (id >= 0 && id < V) id_count[id] = 0;
    }
}

// Each block adds one to counts[kCountDone] once its counts and buckets are stored (and fenced):
// the backward kernel's position blocks wait for that instead of for long_sort to end.
__global__ void __launch_bounds__(kGroupThreads)
encoder_count_kernel(int* __restrict__ id_count, int* __restrict__ bucket,
                     int* __restrict__ long_ids, int* __restrict__ counts,
                     const int* __restrict__ idx, Chunk chunk, int V) {
    // The backward kernel launches only once every block here has started, so its blocks that
    // wait for counts[kCountDone] cannot keep these from running.
    pdl_launch_dependents();
    const int p = blockIdx.x * kGroupThreads + threadIdx.x;
    const int id = p < chunk.size() ? idx[chunk.base + p] : -1;
    pdl_wait();  // the counters are zero
    // One atomic per id and warp: the lanes holding the same id take consecutive slots (text
    // repeats a few ids a lot, and atomics on one address are served one at a time).
    const int lane = threadIdx.x % 32;
    const unsigned peers = __match_any_sync(kFullMask, id);
    const int leader = __ffs(peers) - 1;
    if (id >= 0 && id < V) {  // the whole group of peers
        int base = 0;
        if (lane == leader) base = atomicAdd(id_count + id, __popc(peers));
        base = __shfl_sync(peers, base, leader);
        const int slot = base + __popc(peers & ((1u << lane) - 1u));
        if (slot < kShortRun)
            bucket[(long long)id * kShortRun + slot] = p;
        else if (slot == kShortRun)  // the first arrival past the bucket lists the id, once
            long_ids[atomicAdd(counts + kLongIds, 1)] = id;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();  // the block's counts and buckets before its arrival
        atomicAdd(counts + kCountDone, 1);
    }
}

// L2 prefetches: a bulk range (16-byte aligned, a multiple of 16 bytes; sm_90), and one line
// marked to stay (evict_last) until it is read again.
__device__ __forceinline__ void prefetch_l2_bulk(const void* p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void keep_in_l2(const void* p) {
    asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(p));
}

__device__ __forceinline__ int load_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// One thread waits until *done >= target; the rest of its block, after a barrier, then sees
// everything the arrivals stored before them. The caller must know that the blocks it waits for
// are running or done (a waiting block holds its place on the SM).
__device__ __forceinline__ void wait_until(const int* done, int target) {
    while (load_acquire(done) < target) __nanosleep(100);
}

// The tiles of the backward kernel need the entries of the long runs as one list sorted by (id,
// position). Each block orders the (few) long ids and takes their offsets in the list, then
// takes ids in turn: a ballot over the chunk's ids in position order gives a bitmask of the id's
// positions, and a scan of the mask's popcounts gives each position its place.
__device__ void sort_long_runs(int* __restrict__ long_keys, int* __restrict__ long_rows,
                               int* __restrict__ counts, const int* __restrict__ id_count,
                               const int* __restrict__ long_ids, const int* ids, Chunk chunk,
                               int block, int nblocks) {
    __shared__ int arrived[kMaxLong], sorted[kMaxLong], offset[kMaxLong], buf[32];
    const int L = counts[kLongIds];
    for (int i = threadIdx.x; i < L; i += kGroupThreads) arrived[i] = long_ids[i];
    __syncthreads();
    for (int i = threadIdx.x; i < L; i += kGroupThreads) {  // distinct ids: rank = smaller ones
        const int id = arrived[i];
        int rank = 0;
        for (int j = 0; j < L; j++) rank += arrived[j] < id;
        sorted[rank] = id;
    }
    __syncthreads();
    // offsets: an exclusive scan of the counts, two ids per thread (kMaxLong <= 2 * threads)
    const int i0 = 2 * threadIdx.x;
    const int c0 = i0 < L ? id_count[sorted[i0]] : 0;
    const int c1 = i0 + 1 < L ? id_count[sorted[i0 + 1]] : 0;
    int total;
    const int before = block_exclusive_scan(c0 + c1, 0, Plus(), buf, &total);
    if (i0 < L) offset[i0] = before;
    if (i0 + 1 < L) offset[i0 + 1] = before + c0;
    if (block == 0 && threadIdx.x == 0) {
        counts[kLongCount] = total;
        counts[kOwnerCount] = 0;
    }
    __syncthreads();
    const int S = chunk.size();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int j = block; j < L; j += nblocks) {
        const int id = sorted[j];
        // word i of warp w: the positions w * 1024 + 32 i + (0..31) holding id; lane i keeps it
        unsigned mine = 0;
#pragma unroll 8
        for (int i = 0; i < 32; i++) {
            const int p = warp * 1024 + i * 32 + lane;
            const unsigned word = __ballot_sync(kFullMask, p < S && ids[p] == id);
            if (lane == i) mine = word;
        }
        const int at = offset[j] + block_exclusive_scan(__popc(mine), 0, Plus(), buf, nullptr);
#pragma unroll 4
        for (int i = 0; i < 32; i++) {
            const unsigned word = __shfl_sync(kFullMask, mine, i);
            const int word_at = __shfl_sync(kFullMask, at, i);
            if (word >> lane & 1u) {
                const int dst = word_at + __popc(word & lanes_below);
                long_keys[dst] = id;
                long_rows[dst] = chunk.base + warp * 1024 + i * 32 + lane;
            }
        }
    }
}

// Each block copies the chunk's ids to shared memory while count runs, so that its ballots read
// them from there instead of from L2 (which the backward kernel's first blocks keep busy).
__global__ void __launch_bounds__(kGroupThreads)
encoder_long_sort_kernel(int* __restrict__ long_keys, int* __restrict__ long_rows,
                         int* __restrict__ counts, const int* __restrict__ id_count,
                         const int* __restrict__ long_ids, const int* __restrict__ idx,
                         Chunk chunk) {
    extern __shared__ int ids[];  // [chunk.size()]
    pdl_launch_dependents();  // the backward kernel's dwpe half needs nothing from here
    for (int i = threadIdx.x; i < chunk.size(); i += kGroupThreads) ids[i] = idx[chunk.base + i];
    pdl_wait();  // the counts
    sort_long_runs(long_keys, long_rows, counts, id_count, long_ids, ids, chunk, blockIdx.x,
                   gridDim.x);
}

// Adds to sum the shares of thread groups 1..groups-1 (shared memory, [group][blockDim.x * VEC]),
// in group order: the fixed order that keeps the result the same bits on every run.
template <int VEC>
__device__ __forceinline__ void add_group_shares(float (&sum)[VEC], const float* shares, int groups) {
    for (int y2 = 1; y2 < groups; y2++) {
        const float* other = shares + (y2 * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; k++) sum[k] += other[k];
    }
}

// ---- backward, 2: dwpe and short runs by position, long runs by tile ---------------------------

// Where the backward kernel finds its chunk's grouping: in the scratch, where the group kernels
// are making it while the kernel starts (kPlanned false), or in a host plan (kPlanned true).
struct Grouping {
    const int* id_count;   // scratch: per id, its positions in the chunk
    const int* bucket;     // scratch: per id, up to kShortRun of them, in arrival order
    const int2* run;       // plan: per position, {its run's first entry in order, +-length}
    const int* order;      // plan: the chunk's positions sorted by (id, position)
    const int* long_keys;  // both: the entries of the long runs, sorted by (id, position)
    const int* long_rows;
    int* owners;           // the tiles where a crossing run begins (scratch: the tiles list them)
    int* counts;           // [kLongCount], [kOwnerCount] (and, scratch, [kCountDone])
    int* tile_done;        // per channel slice: tile blocks that stored their partials
    int* runs_past;        // plan: per channel slice: run blocks past their wait
    float* partials;       // scratch: two per tile and channel
};

// One block per local position t (and channel slice); thread group y = threadIdx.y holds the
// rows b = y * kRowsPerThread + u. dwpe first, then the short runs that end at this position.
// A block's time is mostly waiting for memory, so its loads are issued in three rounds with
// everything that can go together in one: dout, idx and the dwpe row; then the counts and the
// buckets of its ids; then the dwte rows it adds to and the other rows of its runs.
// With a plan the runs are known from the start: each row's run is loaded beside its dout row,
// and nothing waits.
template <typename T, int VEC, bool kPlanned>
__device__ __forceinline__ void backward_position(T* __restrict__ dwte, T* __restrict__ dwpe,
                                                  const T* __restrict__ dout,
                                                  const int* __restrict__ idx,
                                                  const Grouping& gr, const Chunk& chunk,
                                                  int t, int c, int C, int V, int wave) {
    extern __shared__ float part[];  // [kGroups][blockDim.x * VEC]: each group's dwpe share
    const int y = threadIdx.y, b0 = y * kRowsPerThread;
    const int lane = threadIdx.x % 32;
    const bool active = c < C;
    float g[kRowsPerThread][VEC];  // dout[b0 + u, t0 + t], kept from the dwpe sum to dwte
    int id[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++) {
        const int b = b0 + u;
        id[u] = -1;
#pragma unroll
        for (int k = 0; k < VEC; k++) g[u][k] = 0.0f;
        if (b < chunk.Bc) {
            const int row = chunk.base + b * chunk.Tc + t;
            id[u] = idx[row];
            if (active) load_vec<T, VEC>(g[u], dout + (long long)row * C + c);
        }
    }
    T* prow = dwpe + (long long)(chunk.t0 + t) * C + c;
    float pw[VEC];
    if (y == 0 && active) load_vec<T, VEC>(pw, prow);
    // Has count finished? Asked while dout is on its way (an acquire load holds back only the
    // loads after it, and those need dout anyway). Only the first blocks find it has not.
    const int count_blocks = (chunk.size() + kGroupThreads - 1) / kGroupThreads;
    const int arrived = kPlanned ? 0 : load_acquire(gr.counts + kCountDone);
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
    bool counted = true;
    if constexpr (kPlanned) __syncthreads();
    else counted = __syncthreads_and(arrived >= count_blocks);
    if (y == 0 && active) {  // the groups holding rows, in group order
        add_group_shares<VEC>(sum, part,
                              min(kGroups, (chunk.Bc + kRowsPerThread - 1) / kRowsPerThread));
#pragma unroll
        for (int k = 0; k < VEC; k++) pw[k] += sum[k];
        store_vec<T, VEC>(prow, pw);
    }
    if (!kPlanned && !counted) {  // count's blocks are running: the grid launched after all of them started
        // Meanwhile, bring to L2 this block's dwte rows and the dout rows of the blocks that
        // will take its place in the next waves, so that the wait moves bytes too.
        if (VEC * sizeof(T) == 16) {
            const int c0 = blockIdx.y * blockDim.x * VEC;
            const int bytes = min((int)blockDim.x * VEC, C - c0) * (int)sizeof(T);
            if (threadIdx.x == 0) {
#pragma unroll
                for (int u = 0; u < kRowsPerThread; u++)
                    if (id[u] >= 0 && id[u] < V)
                        prefetch_l2_bulk(dwte + (long long)id[u] * C + c0, bytes);
            }
            const int lin = y * blockDim.x + threadIdx.x;
            if (lin < kPrefetchWaves * kMaxRows) {
                const int b = lin % kMaxRows;
                const long long L = blockIdx.x + (long long)blockIdx.y * gridDim.x +
                                    (long long)(1 + lin / kMaxRows) * wave;
                const int tx = (int)(L % gridDim.x), ty = (int)(L / gridDim.x);
                const int c1 = ty * blockDim.x * VEC;
                if (ty < (int)gridDim.y && tx < chunk.Tc && b < chunk.Bc)
                    prefetch_l2_bulk(dout + (long long)(chunk.base + b * chunk.Tc + tx) * C + c1,
                                     min((int)blockDim.x * VEC, C - c1) * (int)sizeof(T));
            }
        }
        if (y == 0 && threadIdx.x == 0) wait_until(gr.counts + kCountDone, count_blocks);
        __syncthreads();
    }

    // Short runs: the block holding a run's last position adds the run, in position order. The
    // bucket lists the run's positions in arrival order (lane j reads the j-th, read before the
    // count says how many are real); each warp ranks them into its own `order` rows. Every dwte
    // row written here belongs to one run, and no other block writes it, so all the rows' loads
    // go before the stores. The values are the same for every thread of a group, so its warps
    // stay converged. Counts and buckets come from L2 (__ldcg): count wrote them during this grid.
    __shared__ int order[kGroups * 64 / 32][kRowsPerThread][kShortRun];
    int (*ord)[kShortRun] = order[(y * blockDim.x + threadIdx.x) / 32];
    unsigned others = 0;  // 5 bits per row: 1 + the other positions of its run; 0: not added here
    if constexpr (kPlanned) {
        // The plan says which position is its run's last and lists the run's positions in
        // order: lane j copies the j-th to the warp's `order` row.
#pragma unroll
        for (int u = 0; u < kRowsPerThread; u++) {
            if (b0 + u >= chunk.Bc) break;
            const int2 r = gr.run[(b0 + u) * chunk.Tc + t];  // {first, +-length: + if last}
            const int m = abs(r.y);
            if (m == 1) others |= 1u << (5 * u);
            if (m < 2 || m > kShortRun) continue;  // a long run: the tiles add it
            if (r.y < 0) {  // the run's last position will read this row again
                const long long row = chunk.base + (b0 + u) * chunk.Tc + t;
                if (active) keep_in_l2(dout + row * C + c);
                continue;
            }
            if (lane < m - 1) ord[u][lane] = gr.order[r.x + lane];
            others |= (unsigned)m << (5 * u);
        }
    } else {
        // each row's run: its length, and (lane j) the j-th of its positions, in any order
        int n[kRowsPerThread], pos[kRowsPerThread];
#pragma unroll
        for (int u = 0; u < kRowsPerThread; u++) {
            const bool valid = id[u] >= 0 && id[u] < V;
            n[u] = valid ? __ldcg(gr.id_count + id[u]) : 0;
            pos[u] = valid && lane < kShortRun
                         ? __ldcg(gr.bucket + (long long)id[u] * kShortRun + lane)
                         : -1;
        }
#pragma unroll
        for (int u = 0; u < kRowsPerThread; u++) {
            if (n[u] == 1) others |= 1u << (5 * u);
            if (n[u] < 2 || n[u] > kShortRun) continue;  // a long run: the tiles add it
            const int p = lane < n[u] ? pos[u] : -1;
            if (__reduce_max_sync(kFullMask, p) != (b0 + u) * chunk.Tc + t) {
                // the run's last position will read this row again: keep it in L2 till then
                const long long row = chunk.base + (b0 + u) * chunk.Tc + t;
                if (active) keep_in_l2(dout + row * C + c);
                continue;
            }
            int rank = 0;  // the positions are distinct
            for (int i = 0; i < n[u]; i++) rank += __shfl_sync(kFullMask, p, i) < p;
            if (lane < n[u]) ord[u][rank] = p;
            others |= (unsigned)n[u] << (5 * u);
        }
    }
    __syncwarp();
    float w[kRowsPerThread][VEC];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++)
        if (active && (others >> (5 * u) & 31u))
            load_vec<T, VEC>(w[u], dwte + (long long)id[u] * C + c);
#pragma unroll
    for (int u = 0; u < kRowsPerThread; u++) {
        const int m = others >> (5 * u) & 31u;
        if (m == 0 || !active) continue;
        float acc[VEC];
#pragma unroll
        for (int k = 0; k < VEC; k++) acc[k] = 0.0f;
#pragma unroll 4
        for (int j = 0; j < m - 1; j++) {  // the others; rank m-1 is this position
            float h[VEC];
            load_vec<T, VEC>(h, dout + (long long)(chunk.base + ord[u][j]) * C + c);
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
// next tile ("tail"); the tile that holds a run's tail registers as the run's owner.
template <typename T, int VEC, bool kPlanned>
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
    // (A plan lists these owners already.)
    if (!kPlanned && blockIdx.y == 0 && threadIdx.x == 0 && skey[n] == next_key &&
        skey[n] != prev_key)
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

// A crossing run's partial slots (the owner tile's tail, then the heads of the tiles after it)
// are split into kGroups contiguous ranges, one per thread group, and the groups' sums are added
// in group order: a fixed order. Runs are taken in turn by the run blocks of the slice.
template <typename T, int VEC>
__device__ __forceinline__ void backward_crossing_runs(T* __restrict__ dwte, const Grouping& gr,
                                                       int M, int block, int nblocks, int c,
                                                       int C) {
    extern __shared__ float red[];  // [kGroups][blockDim.x * VEC]
    const int lane = threadIdx.x % 32, y = threadIdx.y;
    const int* keys = gr.long_keys;
    const int count = __ldcg(gr.counts + kOwnerCount);  // (L2: the tiles may have written it)
    const float* partials = gr.partials;
    for (int o = block; o < count; o += nblocks) {
        const int tile = __ldcg(gr.owners + o);
        const int k_last = (tile + 1) * kTile - 1;  // an owner tile is full: its run goes on
        const int end = run_end(keys, M, k_last, lane);
        const int nslots = (end - 1) / kTile - tile + 1;
        const int s0 = (int)((long long)y * nslots / kGroups);
        const int s1 = (int)((long long)(y + 1) * nslots / kGroups);
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
        float* mine = red + (y * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
        for (int k = 0; k < VEC; k++) mine[k] = sum[k];
        __syncthreads();
        if (y == 0 && c < C) {
            T* row = dwte + (long long)keys[k_last] * C + c;
            float r[VEC];
            load_vec<T, VEC>(r, row);
            add_group_shares<VEC>(sum, red, kGroups);
#pragma unroll
            for (int k = 0; k < VEC; k++) r[k] += sum[k];
            store_vec<T, VEC>(row, r);
        }
        __syncthreads();  // red is reused by the next run
    }
}

// blockIdx.x < Tc: a position. Then tile_blocks blocks of kGroups tiles of the long-run list,
// then run_blocks blocks that add up the runs crossing tiles (both usually idle).
// blockIdx.y: a slice of blockDim.x * VEC channels.
template <typename T, int VEC, bool kPlanned>
__global__ void __launch_bounds__(kGroups * 64, 4)
encoder_backward_kernel(T* __restrict__ dwte, T* __restrict__ dwpe, Grouping gr,
                        const T* __restrict__ dout, const int* __restrict__ idx, Chunk chunk,
                        int tile_blocks, int wave, int C, int V) {
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    const int bx = blockIdx.x;
    if (bx < chunk.Tc) {
        backward_position<T, VEC, kPlanned>(dwte, dwpe, dout, idx, gr, chunk, bx, c, C, V, wave);
        return;
    }
    pdl_wait();  // long_sort's list
    const int M = gr.counts[kLongCount];
    // With a plan the slice counters are touched only where a run crosses tiles, and the last
    // run block leaves them at zero for the next call; in the scratch the zero kernel resets them.
    const bool crossing = kPlanned ? gr.counts[kOwnerCount] > 0 : M > kTile;
    int* tile_done = gr.tile_done + blockIdx.y;
    const int busy_tile_blocks = (M + kTile * kGroups - 1) / (kTile * kGroups);  // with a tile
    if (bx < chunk.Tc + tile_blocks) {
        const int tile0 = (bx - chunk.Tc) * kGroups;
        if (tile0 * kTile >= M) return;  // the whole block: no tile here
        backward_long_tile<T, VEC, kPlanned>(dwte, gr.partials, gr.owners, gr.counts, dout,
                                             gr.long_keys, gr.long_rows, M, tile0 + threadIdx.y,
                                             c, C);
        __syncthreads();
        if (crossing && threadIdx.x == 0 && threadIdx.y == 0) {
            __threadfence();  // the block's partials and owners before its arrival
            atomicAdd(tile_done, 1);
        }
        return;
    }
    if (!crossing) return;
    // A run block waits for the slice's tile blocks. At most one run block per SM is launched
    // (on average), so the tile blocks always find room even if blocks start out of order.
    const int run_blocks = gridDim.x - chunk.Tc - tile_blocks;
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        wait_until(tile_done, busy_tile_blocks);
        if constexpr (kPlanned) {  // every run block of the slice has seen the tiles: reset
            int* past = gr.runs_past + blockIdx.y;
            if (atomicAdd(past, 1) == run_blocks - 1) {
                *tile_done = 0;
                *past = 0;
            }
        }
    }
    __syncthreads();
    backward_crossing_runs<T, VEC>(dwte, gr, M, bx - chunk.Tc - tile_blocks, run_blocks, c, C);
}

void launch_group(const EncoderPlan& p, const Chunk& chunk, int* s, const int* ids, int V,
                  int slices, cudaStream_t st) {
    const char* op = "encoder_backward";
    const int blocks = ceil_div(chunk.size(), kGroupThreads);
    const dim3 threads(kGroupThreads);
    const int* cs = s;
    launch_ex(op, encoder_zero_kernel, dim3(blocks), threads, 0, st, 1, p.hopper, s + p.id_count,
              s + p.counts, s + p.tile_done, slices, ids, chunk, V);
    launch_ex(op, encoder_count_kernel, dim3(blocks), threads, 0, st, 1, p.hopper,
              s + p.id_count, s + p.bucket, s + p.long_ids, s + p.counts, ids, chunk, V);
    set_smem(op, encoder_long_sort_kernel, kChunkCap * sizeof(int));
    launch_ex(op, encoder_long_sort_kernel, dim3(p.long_blocks), threads,
              chunk.size() * sizeof(int), st, 1, p.hopper,
              s + p.long_keys, s + p.long_rows, s + p.counts, cs + p.id_count, cs + p.long_ids,
              ids, chunk);
}

// The grouping the group kernels make in the scratch, or the one in a plan's region `r`.
Grouping scratch_grouping(int* s, const EncoderPlan& p) {
    Grouping g{};
    g.id_count = s + p.id_count;
    g.bucket = s + p.bucket;
    g.long_keys = s + p.long_keys;
    g.long_rows = s + p.long_rows;
    g.owners = s + p.owners;
    g.counts = s + p.counts;
    g.tile_done = s + p.tile_done;
    g.partials = reinterpret_cast<float*>(s + p.partials);
    return g;
}
Grouping plan_grouping(int* r, const PlanLayout& L, int* s, const EncoderPlan& p) {
    Grouping g{};
    g.run = reinterpret_cast<const int2*>(r + L.run);
    g.order = r + L.order;
    g.long_keys = r + L.long_keys;
    g.long_rows = r + L.long_rows;
    g.owners = r + L.owners;
    g.counts = r + L.head;
    g.tile_done = r + L.tile_done;
    g.runs_past = r + L.runs_past;
    g.partials = reinterpret_cast<float*>(s + p.partials);
    return g;
}

// With a plan the backward kernel is the op's only one, so it is an ordinary launch: it starts
// once the kernel before it (which wrote dout) is done.
template <typename T, int VEC, bool kPlanned>
void launch_backward(T* dwte, T* dwpe, const Grouping& gr, const EncoderPlan& p,
                     const Chunk& chunk, const T* dout, const int* idx, int C, int V,
                     cudaStream_t st) {
    const Slicing sl = slicing(C, VEC);
    const int tiles = ceil_div(chunk.size(), kTile);
    const int tile_blocks = ceil_div(tiles, kGroups);
    // about one run block per SM in all (they wait for the tiles), and no more than the runs
    const int run_blocks = std::max(1, std::min(ceil_div(tiles, 2), p.sms / sl.slices));
    const size_t smem = sizeof(float) * kGroups * sl.threads * VEC;
    launch_ex("encoder_backward", encoder_backward_kernel<T, VEC, kPlanned>,
              dim3(chunk.Tc + tile_blocks + run_blocks, sl.slices), dim3(sl.threads, kGroups),
              smem, st, 1, p.hopper && !kPlanned, dwte, dwpe, gr, dout, idx, chunk, tile_blocks,
              4 * p.sms, C, V);
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
                      uintptr_t idx, uintptr_t plan, int B, int T, int C, int V, int dtype,
                      uintptr_t stream) {
    const char* op = "encoder_backward";
    const EncoderPlan p = encoder_plan(op, B, T, C, V);
    PlanLayout L{};
    if (plan) L = plan_layout(op, B, T, C);
    cudaStream_t st = as_stream(stream);
    int* s = as_ptr<int>(scratch);
    // with a plan, the ids it was made from (its head), whatever idx holds
    const int* ids = plan ? as_ptr<const int>(plan) : as_ptr<const int>(idx);
    DISPATCH_STORAGE(op, dtype, [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vec = C % kVec == 0 && aligned16(dwte) && aligned16(dwpe) && aligned16(dout) &&
                         aligned16(scratch);
        scalar_t* w = as_ptr<scalar_t>(dwte);
        scalar_t* pe = as_ptr<scalar_t>(dwpe);
        const scalar_t* d = as_ptr<const scalar_t>(dout);
        for_each_chunk(B, T, {p.Bc, p.Tc}, [&](const Chunk& chunk, long long j) {
            if (plan) {
                const Grouping g = plan_grouping(as_ptr<int>(plan) + L.ids + j * L.region, L, s, p);
                if (vec) launch_backward<scalar_t, kVec, true>(w, pe, g, p, chunk, d, ids, C, V, st);
                else launch_backward<scalar_t, 1, true>(w, pe, g, p, chunk, d, ids, C, V, st);
                return;
            }
            launch_group(p, chunk, s, ids, V, slicing(C, vec ? kVec : 1).slices, st);
            check_launch(op);
            const Grouping g = scratch_grouping(s, p);
            if (vec) launch_backward<scalar_t, kVec, false>(w, pe, g, p, chunk, d, ids, C, V, st);
            else launch_backward<scalar_t, 1, false>(w, pe, g, p, chunk, d, ids, C, V, st);
        });
    });
    check_launch(op);
}

long long encoder_backward_plan_size(int B, int T, int C) {
    return plan_layout("encoder_backward_plan_size", B, T, C).total;
}

void encoder_backward_plan_layout(uintptr_t out, int B, int T, int C) {
    const PlanLayout L = plan_layout("encoder_backward_plan_layout", B, T, C);
    const long long v[] = {L.Bc,        L.Tc,      L.ids,   L.region,
                           L.head,      L.run,     L.order, L.long_keys,
                           L.long_rows, L.owners,  L.tile_done, L.runs_past};
    std::copy(std::begin(v), std::end(v), reinterpret_cast<long long*>(out));
}

// Host code. Per chunk: a stable LSD radix sort of the positions by id (16-bit digits, one or
// two passes), then one scan over the sorted positions for the runs, the long-run list and the
// tiles where a long run crosses into the next tile (the tile holding its first entry owns it).
void encoder_backward_plan(uintptr_t plan, uintptr_t ids, int B, int T, int C, int V) {
    const char* op = "encoder_backward_plan";
    if (V <= 0) throw std::invalid_argument(std::string(op) + ": V must be positive");
    const PlanLayout L = plan_layout(op, B, T, C);
    int* out = reinterpret_cast<int*>(plan);
    const int* in = reinterpret_cast<const int*>(ids);
    const long long N = (long long)B * T;
    for (long long n = 0; n < N; n++) {
        if (in[n] < 0 || in[n] >= V)
            throw std::invalid_argument(std::string(op) + ": ids[" + std::to_string(n / T) + ", " +
                                        std::to_string(n % T) + "] = " + std::to_string(in[n]) +
                                        " is outside [0, V = " + std::to_string(V) + ")");
    }
    std::fill(out, out + L.total, 0);
    std::copy(in, in + N, out);
    const long long S = (long long)L.Bc * L.Tc;
    std::vector<int> tmp(S), hist(1 << 16);
    auto sort_pass = [&](const int* src, int* dst, int count, const int* key_of, int shift) {
        std::fill(hist.begin(), hist.end(), 0);
        for (int k = 0; k < count; k++) hist[key_of[src[k]] >> shift & 0xffff]++;
        int at = 0;
        for (int& h : hist) {
            const int c = h;
            h = at;
            at += c;
        }
        for (int k = 0; k < count; k++) dst[hist[key_of[src[k]] >> shift & 0xffff]++] = src[k];
    };
    for_each_chunk(B, T, {L.Bc, L.Tc}, [&](const Chunk& chunk, long long j) {
        const int size = chunk.size();
        const int* key = in + chunk.base;  // the id of local position p is key[p]
        int* r = out + L.ids + j * L.region;
        int* order = r + L.order;
        for (int q = 0; q < size; q++) tmp[q] = q;
        sort_pass(tmp.data(), order, size, key, 0);
        if (V > (1 << 16)) {  // the high digit
            sort_pass(order, tmp.data(), size, key, 16);
            std::copy(tmp.data(), tmp.data() + size, order);
        }
        int M = 0, crossing = 0;
        for (int k = 0; k < size;) {
            int e = k + 1;
            while (e < size && key[order[e]] == key[order[k]]) e++;
            const int len = e - k;
            for (int q = k; q < e; q++) {  // + the length at the last position, - before
                r[L.run + 2LL * order[q]] = k;
                r[L.run + 2LL * order[q] + 1] = q == e - 1 ? len : -len;
            }
            if (len > kShortRun) {
                if (M / kTile != (M + len - 1) / kTile) r[L.owners + crossing++] = M / kTile;
                for (int q = k; q < e; q++, M++) {
                    r[L.long_keys + M] = key[order[q]];
                    r[L.long_rows + M] = chunk.base + order[q];
                }
            }
            k = e;
        }
        r[L.head + kLongCount] = M;
        r[L.head + kOwnerCount] = crossing;
    });
}
