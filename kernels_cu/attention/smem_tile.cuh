// Shared-memory tiles of ROWS x DIM 16-bit elements (DIM a multiple of 64).
//
// Layout: DIM/64 column blocks, each ROWS x 64 elements (128 bytes a row); inside a block the 16-byte
// chunk c of row r sits at chunk position c ^ (r % 8). An ldmatrix phase reads 8 rows of one logical
// chunk and a cp.async wave writes 8 chunks of one row; the XOR spreads both over all 32 banks, so
// neither needs padding. 64-wide blocks (not full-DIM rows) also keep a row's chunks within one
// 128-byte line, the shape of the global->shared copy FlashAttention-2 found fastest.
#pragma once
#include "ptx/cp_async.cuh"

template <int ROWS, int DIM>
struct SmemTile {
    static_assert(DIM % 64 == 0, "tile width must be a multiple of 64 elements");
    static constexpr int kElems = ROWS * DIM;
    static constexpr int kBytes = kElems * 2;
    static constexpr int kBlockBytes = ROWS * 64 * 2;  // one 64-column block

    // Per-lane ldmatrix addresses. A lane that reads 8-column half `c` (0 or 1) of k16 step `kk` in row
    // `row` hits logical chunk 2*kk + c, stored at chunk ((2*kk) % 8) ^ c ^ (row % 8) of column block kk / 4.
    // Moving by whole 8-row groups keeps row % 8, so per lane only the four values of kk % 4 differ: four
    // base registers, and every other part of every address is a compile-time immediate.
    struct LaneAddr {
        u32 base[4];
        __device__ __forceinline__ LaneAddr(u32 smem, int row, int c) {
#pragma unroll
            for (int j = 0; j < 4; ++j) base[j] = smem + (u32)((row * 64 + (((2 * j) ^ c ^ (row & 7)) << 3)) * 2);
        }
        // Address for k16 step kk (compile-time) and a row offset that is a multiple of 8 (compile-time).
        __device__ __forceinline__ u32 at(int kk, int row_offset) const {
            return base[kk & 3] + (u32)(((kk >> 2) * ROWS * 64 + row_offset * 64) * 2);
        }
    };

    // The same addresses from one register: tiles start 128-byte aligned and a row is 128 bytes, so the
    // kk % 4 phase is an XOR of bits 5-6 of the step-0 address (one LOP3 per use instead of a register).
    struct LaneAddrXor {
        u32 base;
        __device__ __forceinline__ LaneAddrXor(u32 smem, int row, int c)
            : base(smem + (u32)(row * 128 + ((c ^ (row & 7)) << 4))) {}
        __device__ __forceinline__ u32 at(int kk, int row_offset) const {
            return (base ^ (u32)((kk & 3) << 5)) + (u32)(((kk >> 2) * ROWS * 64 + row_offset * 64) * 2);
        }
    };

    // Byte offset of the 16-byte chunk holding (row, col..col+7); col is a multiple of 8.
    static __device__ __forceinline__ u32 offset(int row, int col) {
        const int chunk = col >> 3;
        return (u32)(((chunk >> 3) * ROWS * 64 + row * 64 + (((chunk & 7) ^ (row & 7)) << 3)) * 2);
    }

    // Cooperative cp.async of rows [row0, row0 + ROWS) of a (seqlen, head_dim) slice with row stride
    // `row_stride`; rows >= row_limit and columns >= head_dim are zero-filled.
    // Each thread copies chunk t % 8 of rows t / 8 + k * (NTHREADS / 8) in every 64-wide column block. The
    // row step is a multiple of 8, so the swizzle term is the same for all of a thread's rows and every
    // shared address is the thread's base plus a compile-time constant: nothing to keep in registers
    // across the main loop, where spare registers are scarce.
    template <int NTHREADS>
    static __device__ __forceinline__ void load_async(u32 smem, const u16* gmem, i64 row_stride, int row0,
                                                      int row_limit, int head_dim, int tid) {
        constexpr int kRowStep = NTHREADS / 8;
        static_assert(kRowStep % 8 == 0 && ROWS % kRowStep == 0, "rows must split evenly over the threads");
        const int r = tid >> 3, chunk = tid & 7;
        const u32 dst = smem + (u32)((r * 64 + ((chunk ^ (r & 7)) << 3)) * 2);
        const u16* src = gmem + (i64)(row0 + r) * row_stride + chunk * 8;
        const i64 src_step = (i64)kRowStep * row_stride;
#pragma unroll
        for (int i = 0; i < ROWS / kRowStep; ++i) {
            const bool row_ok = row0 + r + i * kRowStep < row_limit;
#pragma unroll
            for (int blk = 0; blk < DIM / 64; ++blk) {
                const bool valid = row_ok && (blk * 64 + chunk * 8 < head_dim);
                cp_async_16(dst + (u32)((blk * ROWS * 64 + i * kRowStep * 64) * 2), valid ? src + blk * 64 : gmem, valid);
            }
            src += src_step;
        }
    }

    // load_async for a paged K / V (fwd_sm80.cu CF_PAGED): row i of the tile is cache row `rows[i]` (the
    // tile's physical rows, staged in shared memory by PagedRows; -1 past the sequence, zero-filled) of
    // the caches at `base` with row stride `row_stride`. One shared load per row and no arithmetic beyond the
    // address: the page lookup and the division by the page size happen once per tile, not for K and V each.
    template <int NTHREADS>
    static __device__ __forceinline__ void load_async_rows(u32 smem, const u16* base, const int* rows, i64 row_stride,
                                                           int head_dim, int tid) {
        constexpr int kRowStep = NTHREADS / 8;
        static_assert(kRowStep % 8 == 0 && ROWS % kRowStep == 0, "rows must split evenly over the threads");
        const int r = tid >> 3, chunk = tid & 7;
        const u32 dst = smem + (u32)((r * 64 + ((chunk ^ (r & 7)) << 3)) * 2);
#pragma unroll
        for (int i = 0; i < ROWS / kRowStep; ++i) {
            const int row = rows[r + i * kRowStep];
            const bool row_ok = row >= 0;
            const u16* src = row_ok ? base + (i64)row * row_stride + chunk * 8 : base;
#pragma unroll
            for (int blk = 0; blk < DIM / 64; ++blk) {
                const bool valid = row_ok && (blk * 64 + chunk * 8 < head_dim);
                cp_async_16(dst + (u32)((blk * ROWS * 64 + i * kRowStep * 64) * 2), valid ? src + blk * 64 : base, valid);
            }
        }
    }
};

// The physical cache rows of a paged key tile (fwd_sm80.cu CF_PAGED), looked up in two steps so that the
// block table's latency hides under other work: fetch() loads each row's page index (a global load, an L2
// hit at best: ~300 cycles, which a decode CTA, alone on its SM, would otherwise wait out before every K and
// V load), store() later turns it into row page * page_size + row % page_size, or -1 past `row_limit`, in
// shared memory for load_async_rows. Thread t handles rows t, t + NTHREADS, ... of the ROWS.
// `page_shift` >= 0 (a power-of-two page size, vLLM's 16 among them) replaces the division by a shift.
// A page index outside [0, num_pages) is clamped, so no value in the table reads outside the caches; rows
// stay below 2**31 (the host checks the caches' row count).
template <int ROWS, int NTHREADS>
struct PagedRows {
    static constexpr int kPerThread = (ROWS + NTHREADS - 1) / NTHREADS;
    int entry[kPerThread];

    __device__ __forceinline__ void fetch(const int* pages, int page_size, int page_shift, int row0, int row_limit,
                                          int tid) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
            const int t = tid + j * NTHREADS, row = row0 + t;
            entry[j] = 0;
            if ((ROWS % NTHREADS == 0 || t < ROWS) && row < row_limit)
                entry[j] = pages[page_shift >= 0 ? row >> page_shift : row / page_size];
        }
    }

    __device__ __forceinline__ void store(int* rows, int page_size, int page_shift, int num_pages, int row0,
                                          int row_limit, int tid) const {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) {
            const int t = tid + j * NTHREADS, row = row0 + t;
            if (ROWS % NTHREADS != 0 && t >= ROWS) continue;
            const int in_page = page_shift >= 0 ? row & (page_size - 1) : row % page_size;
            rows[t] = row < row_limit ? min(max(entry[j], 0), num_pages - 1) * page_size + in_page : -1;
        }
    }
};
