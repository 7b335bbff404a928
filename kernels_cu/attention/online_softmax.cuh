// Online softmax over the score tiles of one warp, in registers.
//
// Each thread holds, per m16 slab, two query rows (g and g + 8) of the mma accumulator layout; the four
// threads of a quad share a row, so row reductions are two xor-shuffles. Scores are kept in their raw
// unit x and exponentiated as 2^(x*c - E) with c = scale_log2 and E the row's offset.
// The row sum l is kept per thread (partial over that thread's columns) and reduced across the quad only
// once, in finalize(): the rescale factor alpha is identical within a quad, so this is exact.
//
// The offset. The fast form takes E = fl(m*c) (m the row max) and folds it into one FMA per element,
// fma(x, c, -E): exact for every element, but the row's largest probability is 2^(m*c - fl(m*c)), up to
// 2^(ulp(m*c) / 2), which overflows fp16 P and the row sum once |m*c| passes ~2^31 (a constant bf16 input
// of 133120 at head dim 64 gives m*c = 2e11: NaN). A warp whose offsets reach kFastOffsetLimit switches
// for the rest of its rows' key tiles to the exact form E = m*c: it subtracts m from the raw scores (one
// FADD per element, exact near m) and runs the same loop with offset 0, 2^((x - m)*c). The switch is a
// warp-uniform vote per tile, and the exact form adds only that subtraction loop to the code, so ordinary
// inputs run the fast form's instructions (and instruction cache footprint) nearly unchanged.
#pragma once
#include "ptx/math.cuh"

// |fl(m*c)| below 2^24 keeps the fast form's largest probability at most 2^(ulp/2) = 2^0.5 (well inside
// fp16 P); real attention scores stay orders of magnitude below it.
constexpr float kFastOffsetLimit = 16777216.f;

// The fast form's offset fl(m*c); 0 for a row that has seen no key (max -inf), so that -inf - -inf never
// produces NaN and its probabilities come out exactly 0.
__device__ __forceinline__ float fast_offset(float m, float c) {
    return (m == -CF_INF) ? 0.f : m * c;
}

// The exact rounding residue m*c - fl(m*c) of the fast offset (0 for an empty row).
__device__ __forceinline__ float offset_residue(float m, float c) {
    return (m == -CF_INF) ? 0.f : fmaf(m, c, -(m * c));
}

template <int MS, int NT8>
struct OnlineSoftmax {
    float row_max[MS][2];
    float row_sum[MS][2];
    bool exact = false;  // warp-uniform: the rows' offsets are E = m*c exactly (sticky once set)

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
        // The new row maxima and the fast form's offsets and rescale exponents; whether any offset leaves the
        // fast form's range (or an earlier tile already did) is one vote for the warp. The exact form
        // rewrites offset and alpha in place, so the common loop below has no select on the form.
        float old_max[MS][2], offset[MS][2];
        float largest = 0.f;  // the largest |offset| of this thread's rows
#pragma unroll
        for (int s = 0; s < MS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float m = row_max[s][h];
#pragma unroll
                for (int n = 0; n < NT8; ++n) m = fmaxf(m, fmaxf(sc[s][n][2 * h], sc[s][n][2 * h + 1]));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                old_max[s][h] = row_max[s][h];
                row_max[s][h] = m;
                offset[s][h] = fast_offset(m, c);
                alpha[s][h] = old_max[s][h] * c - offset[s][h];
                largest = fmaxf(largest, fabsf(offset[s][h]));
            }
        }
        // fmaxf drops a NaN offset (it comes from a NaN score, which the loop spreads as NaN either way).
        if (__any_sync(0xffffffffu, exact || !(largest < kFastOffsetLimit))) shift_to_row_max(sc, alpha, offset, old_max, c);
#pragma unroll
        for (int s = 0; s < MS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                alpha[s][h] = exp2_approx(alpha[s][h]);
                float sum = 0.f;
#pragma unroll
                for (int n = 0; n < NT8; ++n) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float p = exp2_approx(fmaf(sc[s][n][2 * h + e], c, -offset[s][h]));
                        sc[s][n][2 * h + e] = p;
                        sum += p;
                    }
                }
                row_sum[s][h] = row_sum[s][h] * alpha[s][h] + sum;
            }
        }
    }

    // The exact form (see the top of the file): the offset is E = m*c exactly, applied by subtracting m from
    // the raw scores (exact for every score near m, by Sterbenz's lemma) before the common loop runs with
    // offset 0. alpha becomes the rescale exponent E_old - E_new, where E_old carried the fast offset's
    // rounding if the previous tile ran fast: the switch rescales exactly too.
    __device__ __forceinline__ void shift_to_row_max(float (&sc)[MS][NT8][4], float (&alpha)[MS][2],
                                                     float (&offset)[MS][2], const float (&old_max)[MS][2], float c) {
#pragma unroll
        for (int s = 0; s < MS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float m = row_max[s][h], old = old_max[s][h];
                offset[s][h] = 0.f;
                if (m == -CF_INF) {  // nothing visible yet: the scores stay -inf, p = 0
                    alpha[s][h] = -CF_INF;
                    continue;
                }
                // An old max of -inf has nothing to rescale: 0 (its -inf * c - m * c could be +inf).
                alpha[s][h] = old == -CF_INF ? -CF_INF : exact ? (old - m) * c : fmaf(-m, c, fast_offset(old, c));
#pragma unroll
                for (int n = 0; n < NT8; ++n) {
                    sc[s][n][2 * h] -= m;
                    sc[s][n][2 * h + 1] -= m;
                }
            }
        }
        exact = true;
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
    // score_scale turns the values the softmax saw into natural-log scores (softmax_scale for raw
    // products, 1 after softcap/ALiBi). LSE = m * score_scale + ln(l), less the fast offset's residue
    // (which l absorbed): formed from m directly, so that the backward's exp(s * score_scale - LSE) is
    // exact wherever the fp32 LSE can hold the true value (one key: P = 1 exactly, however large s is).
    template <int DT8>
    __device__ __forceinline__ void finalize(float (&acc_o)[MS][DT8][4], float (&lse)[MS][2], float c,
                                             float score_scale) {
#pragma unroll
        for (int s = 0; s < MS; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float l = row_sum[s][h];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const bool empty = !(l > 0.f);
                const float inv = empty ? 0.f : 1.f / l;
                const float absorbed = exact ? 0.f : offset_residue(row_max[s][h], c);
                lse[s][h] = empty ? CF_INF
                                  : fmaf(row_max[s][h], score_scale, fmaf(-absorbed, 0.6931471805599453f, logf(l)));
#pragma unroll
                for (int d = 0; d < DT8; ++d) {
                    acc_o[s][d][2 * h] *= inv;
                    acc_o[s][d][2 * h + 1] *= inv;
                }
            }
        }
    }
};
