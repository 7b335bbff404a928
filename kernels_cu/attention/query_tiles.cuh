// Compile-time shape of the query-parallel kernels (forward, deterministic dQ): CF_BLOCK_M query rows per
// CTA split over CF_WARPS warps in m16 slabs, key tiles of CF_BLOCK_N rows, head dim CF_HEAD_DIM.
#pragma once
#include "attention/smem_tile.cuh"

namespace {
constexpr int kD = CF_HEAD_DIM;
constexpr int kBM = CF_BLOCK_M;
constexpr int kBN = CF_BLOCK_N;
constexpr int kWarps = CF_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kMS = kBM / (16 * kWarps);  // m16 slabs per warp
constexpr int kNT8 = kBN / 8;             // n8 tiles of a score row
constexpr int kDT8 = kD / 8;              // n8 tiles of an output row
static_assert(kBM % (16 * kWarps) == 0, "BLOCK_M must be a multiple of 16 * warps");
static_assert(kBN % 16 == 0 && kD % 16 == 0, "tile sizes must be multiples of 16");
static_assert(kBM * (kD / 8) % kThreads == 0, "epilogue copy must split evenly");

using QTile = SmemTile<kBM, kD>;
using KVTile = SmemTile<kBN, kD>;
}  // namespace
