// Online softmax over the score tiles of one warp, in registers.
//
// Each thread holds, per m16 slab, two query rows (g and g + 8) of the mma accumulator layout; the four
// threads of a quad share a row, so row reductions are two xor-shuffles. Scores are kept in their raw
// unit x and exponentiated as 2^(x*c - m*c) with c = scale_log2 folded into one FMA per element.
// The row sum l is kept per thread (partial over that thread's columns) and reduced across the quad only
// once, in finalize(): the rescale factor alpha is identical within a quad, so this is exact.
#pragma once
#include "ptx/math.cuh"

template <int MS, int NT8>
struct OnlineSoftmax {
    float row_max[MS][2];
    float row_sum[MS][2];

    __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
        for (int s = 0; s < MS; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h) { row_max[s][h] = -CF_INF; row_sum[s][h] = 0.f; }
    }

    // Replaces the scores by unnormalised probabilities and rescales the output accumulator.
    template <int DT8>
    __device__ __forceinline__ void update(float (&sc)[MS][NT8][4], float (&acc_o)[MS][DT8][4], float c) {
        float alpha[MS][2];
        exponentiate(sc, alpha, c);
        rescale(acc_o, alpha);
    }

    // The two halves of update(), for kernels whose output accumulator is still being written by an
    // asynchronous product while the scores are exponentiated (wgmma).
    // A row whose scores are all -inf so far keeps max -inf; it uses 0 as the exponent offset so that
    // -inf - -inf never produces NaN, and its probabilities come out exactly 0.
    __device__ __forceinline__ void exponentiate(float (&sc)[MS][NT8][4], float (&alpha)[MS][2], float c) {
#pragma unroll
        for (int s = 0; s < MS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = row_max[s][h];
#pragma unroll
                for (int n = 0; n < NT8; ++n) mx = fmaxf(mx, fmaxf(sc[s][n][2 * h], sc[s][n][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float offset = (mx == -CF_INF) ? 0.f : mx * c;
                alpha[s][h] = exp2_approx(row_max[s][h] * c - offset);
                row_max[s][h] = mx;
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < NT8; ++n) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = exp2_approx(fmaf(sc[s][n][2 * h + e], c, -offset));
                        sc[s][n][2 * h + e] = p;
                        sum += p;
                    }
                }
                row_sum[s][h] = row_sum[s][h] * alpha[s][h] + sum;
            }
        }
    }

    template <int DT8>
    __device__ __forceinline__ void rescale(float (&acc_o)[MS][DT8][4], const float (&alpha)[MS][2]) const {
#pragma unroll
        for (int s = 0; s < MS; ++s)
#pragma unroll
            for (int d = 0; d < DT8; ++d) {
                acc_o[s][d][0] *= alpha[s][0];
                acc_o[s][d][1] *= alpha[s][0];
                acc_o[s][d][2] *= alpha[s][1];
                acc_o[s][d][3] *= alpha[s][1];
            }
    }

    // Normalises the output and returns the natural-log LSE per row. A row that saw no key gets output 0
    // and LSE +inf, FlashAttention's convention: the backward's exp(s - lse) is then 0, not NaN.
    template <int DT8>
    __device__ __forceinline__ void finalize(float (&acc_o)[MS][DT8][4], float (&lse)[MS][2], float c) {
#pragma unroll
        for (int s = 0; s < MS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float l = row_sum[s][h];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const bool empty = !(l > 0.f);
                const float inv = empty ? 0.f : 1.f / l;
                lse[s][h] = empty ? CF_INF : row_max[s][h] * c * 0.6931471805599453f + logf(l);
#pragma unroll
                for (int d = 0; d < DT8; ++d) {
                    acc_o[s][d][2 * h] *= inv;
                    acc_o[s][d][2 * h + 1] *= inv;
                }
            }
        }
    }
};
