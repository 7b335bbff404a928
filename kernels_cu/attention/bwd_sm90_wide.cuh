// The consumer warpgroups of attention_bwd_sm90 at head dims 192 and 256 (kWide), included by bwd_sm90.cu
// after its shared pieces (constants, SmemLayout, QueryWalk, the producer and the dQ drain).
//
// The head-dim-128 partition (each warpgroup owns 64 keys and all D columns of dK and dV) needs 2 x 64 x D
// fp32 accumulators a warpgroup: 256 registers a thread at D = 256 against 240 for everything. So here a CTA
// owns kBN = 64 keys, a step takes kBM = 64 queries, and the work of a step splits as follows (per warpgroup
// w; its 128 threads hold m64 accumulator fragments):
//   S^T = K.Q_w^T, dP^T = V.dO_w^T    (wgmma SS, m64n32: the 64 keys x queries [32 w, 32 w + 32) of the
//                                       step, 16 + 16 registers; rows are keys as in bwd_sm90.cu)
//   P^T, dS^T elementwise             (bwd_probability / bwd_score_element, the forward's keep mask drawn again
//                                       with dropout), stored 16-bit to shared memory, rows keys and queries
//                                       contiguous, 128-byte swizzled; a named barrier of both warpgroups
//   w = 0: dV^T += dO^T.P               (wgmma SS, M = head dim in D / 64 m64 blocks of 32 registers: A = the
//   w = 1: dK^T += Q^T.dS                dO or Q tile read MN-major, B = the P^T or dS^T tile, K-major).
//                                       Each warpgroup takes one whole product: D / 64 blocks, 128 registers
//                                       at D = 256, and the two products are the same size.
//   dQ = dS.K, columns [0, 128) for w = 0 and [128, D) for w = 1 (wgmma SS, both operands MN-major, as in
//                                       bwd_sm90.cu; an MN-major operand cannot start inside a 128-byte
//                                       swizzle row, so at D = 192 the split is 128 / 64 columns, not 96 / 96)
//     -> the fp32 block in shared memory, which the drain thread adds into dq_accum.
// The stage (Q, dO, LSE and delta rows) is released once dV^T / dK^T have retired, while dQ still runs.
//
// Shared memory at D = 256 (the case that decides): K and V 64 KB, Q and dO 64 KB a stage, two dS^T buffers
// and one P^T buffer 24 KB, the dQ blocks 64 KB: 223,336 bytes with one stage and the alignment slack, of the
// 232,448 a CTA may use; a second stage does not fit. D = 192 fits two stages (224,384 bytes), but not with a
// second P^T buffer as well (128 bytes over). So P^T has one buffer, which warpgroup 1 rewrites for step
// it + 1 only after warpgroup 0's dV^T product of step it, its reader, has retired (pt_free; by then warpgroup
// 1 has run its dK^T, dQ and the next scores, so the wait rarely blocks); warpgroup 0 itself writes it after
// its own product. dS^T is read by both warpgroups and keeps two buffers: a warpgroup writes buffer it % 2
// after the barrier of step it - 1, which the other passes only after its products of step it - 2 have
// retired.
#pragma once

namespace {
// dV^T or dK^T: m64 blocks of head-dim rows.
constexpr int kWideBlocks = kD / 64;
// A warpgroup's share of the step's queries in S^T and dP^T.
constexpr int kWideQueries = kBM / 2;
constexpr int kWideNT8 = kWideQueries / 8;
constexpr int kWideBarrier = 1;  // named barrier: both warpgroups' P^T and dS^T rows are stored
// P from S^T while dP^T still runs, as kEarlyP in bwd_sm90.cu; softcap's dS needs 1 - tanh^2 of each element.
constexpr bool kWideEarlyP = !CF_SOFTCAP;
// The element loop's lean copy (below): H200, same process, +2-5% at head dims 192 / 256 (bench/NOTES.md, hb11);
// the deterministic builds measured 0.97-1.01x with it at head dim 256 and keep one loop.
constexpr bool kWideLean = !CF_DETERMINISTIC;
static_assert(kBN == 64 && kBM == 64, "the wide partition: 64 keys a CTA, 64 queries a step");
}  // namespace

// dQ of step `it` over warpgroup cw's N head-dim columns (from column dq_col0(cw)), issued after its dV^T / dK^T
// product (`acc`): once that has retired the stage goes back to the producer (and, for warpgroup 0, the P^T
// buffer to warpgroup 1), once dQ has, its block goes to the drain thread (hand_over_dq, bwd_sm90.cu).
template <int N>
__device__ __forceinline__ void wide_dq_and_release(const SmemLayout& sm, float (&acc)[kWideBlocks][kBN / 8][4],
                                                    int cw, int warp_in_wg, int lane, int it, int s) {
    float acc_dq[N / 8][4];
    const u64 a_desc = wgmma::desc_sw128(sm.ds(it & 1), kDSBlock, 1024);
    const u64 b_desc = wgmma::desc_sw128(sm.k() + cw * 2 * kKBlock, kKBlock, 1024);  // column 128 cw of K
    wgmma::fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk)
        WgmmaShape<N>::ss_tt(reinterpret_cast<float(&)[N / 2]>(acc_dq), wgmma::desc_advance(a_desc, kk * 16 * 128),
                             wgmma::desc_advance(b_desc, kk * 16 * 128), kk > 0);
    wgmma::commit();
    wgmma::wait<1>();  // dV^T / dK^T retired: the stage's Q and dO, and P^T, are read
    wgmma::fence_operand(reinterpret_cast<float(&)[kWideBlocks * kBN / 2]>(acc));
    if (cw == 0) {
        __syncwarp();
        if (lane == 0) mbar_arrive(sm.pt_free());
    }
    mbar_arrive(sm.empty(s));
    wgmma::wait<0>();
    wgmma::fence_operand(reinterpret_cast<float(&)[N / 2]>(acc_dq));
    hand_over_dq<N>(sm, acc_dq, cw, it, warp_in_wg, lane);
}

__device__ __forceinline__ void consume_wide(const BackwardSm90Params& p, const SmemLayout& sm, const QueryWalk& qw,
                                             const BwdCoords& bc, const SeqRows& sr, const Visibility& vis, int cw,
                                             int warp_in_wg, int lane) {
    const AttentionParams& a = p.a;
    const int n_start = bc.n_block * kBN;
    const int g = lane >> 2, t = lane & 3;
    const int key_row0 = n_start + warp_in_wg * 16;  // key of this warp's S^T accumulator row 0

    // dV^T (warpgroup 0) or dK^T (warpgroup 1): element (b, n, e) is head-dim row 64 b + 16 warp + g + 8 (e / 2),
    // key column n_start + 8 n + 2 t + e % 2.
    float acc[kWideBlocks][kBN / 8][4];
    zero_fill(acc);
    mbar_wait(sm.kv_full(), 0);
#if CF_VARLEN
    const int wg_tid = warp_in_wg * 32 + lane;
    zero_key_tail(sm, n_start, sr.seqlen_k, cw, wg_tid);  // rows past the sequence's keys (bwd_sm90.cu's top)
#endif

    const float pre = CF_SOFTCAP ? a.softmax_scale / a.softcap : a.softmax_scale;
    const float score_scale = natural_score_scale<CF_SOFTCAP, CF_ALIBI, false>(a.softmax_scale);
    using Exponent = BwdExponent<!kChooseExponent>;

#pragma unroll 1
    for (int it = 0; it < qw.n_iters; ++it) {
        const int s = stage_of(it);
        const u32 ph = parity_of(it);
        const int h = qw.head(bc.hk, it), m0 = qw.m_start(it);
#if CF_DROPOUT
        const int q0 = m0 + cw * kWideQueries;  // this warpgroup's first query
#endif

        // S^T and dP^T of this warpgroup's queries (issue_score_product), which start 32 rows (4096 bytes, a
        // whole number of 8-row swizzle groups) into each column block of the stage.
        float sc[kWideNT8][4], dp[kWideNT8][4];
        auto issue_scores = [&](float (&acc_s)[kWideNT8][4], u32 key_tile, u32 query_tile) {
            issue_score_product<kWideQueries>(acc_s, key_tile, query_tile + cw * kWideQueries * 128);
        };
        mbar_wait(sm.q_full(s), ph);
#if CF_VARLEN
        int tile_seqlen_q, tile_seqlen_k;  // re-read per tile, as bwd_sm90.cu's consumer does
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n"
                     : "=r"(tile_seqlen_q), "=r"(tile_seqlen_k) : "r"(sm.seq_lengths()) : "memory");
        const Visibility tv(tile_seqlen_q, tile_seqlen_k, a.window_left, a.window_right);
        zero_query_tail(sm.q(s), m0, tile_seqlen_q, cw, wg_tid);
#else
        const int tile_seqlen_q = a.seqlen_q;
        const Visibility& tv = vis;
#endif
        issue_scores(sc, sm.k(), sm.q(s));
#if CF_DROPOUT
        // This lane's keep bits (TransposedKeep, bwd_sm90.cu), drawn while S^T runs.
        TransposedKeep<kWideNT8> keep;
        keep.draw(a, bc.b, h, q0, key_row0, lane);
        auto kept = [&](int n, int e) { return keep.kept(n, e); };
#endif
        bool exact_tile = false;
        if (kChooseExponent) {
            u32 form;
            asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(form) : "r"(sm.tile_form(s)));
            exact_tile = form != 0;
        }
        const Exponent ex = kChooseExponent ? Exponent{exact_tile ? kLog2e : a.scale_log2}
                                            : Exponent::template make<CF_SOFTCAP, CF_ALIBI, false>(a.softmax_scale,
                                                                                                   a.scale_log2);
        mbar_wait(sm.do_full(s), ph);
#if CF_VARLEN
        zero_query_tail(sm.dout(s), m0, tile_seqlen_q, cw, wg_tid);
#endif
        issue_scores(dp, sm.v(), sm.dout(s));

        // P^T and dS^T of this warpgroup's queries. Element e of n8 group n: key key_row0 + g + 8 (e / 2), query
        // q0 + 8 n + 2 t + e % 2 (stage row cw * 32 + 8 n + 2 t + e % 2). Rows past seqlen_q carry lse = +inf.
        u32 pt[kWideNT8][2], dst[kWideNT8][2];  // 16-bit pairs (e = 0, 1) and (e = 2, 3)
        {
            const int i_last = min(m0 + kBM, tile_seqlen_q) - 1;
            const bool need_mask = tv.tile_needs_mask<CF_IS_LOCAL>(m0, i_last, n_start, kBN);
            const float slope = CF_ALIBI ? a.alibi[(i64)bc.b * a.alibi_batch_stride + h] : 0.f;
            auto load2 = [&](u32 addr) {
                float2 r;
                asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(r.x), "=f"(r.y) : "r"(addr));
                return r;
            };
            wgmma::wait<kWideEarlyP ? 1 : 0>();
            wgmma::fence_operand(reinterpret_cast<float(&)[kWideQueries / 2]>(sc));
            if (!kWideEarlyP) wgmma::fence_operand(reinterpret_cast<float(&)[kWideQueries / 2]>(dp));
            if (exact_tile) {  // s <- s * softmax_scale - lse (bwd_sm90.cu's exact form)
#pragma unroll
                for (int n = 0; n < kWideNT8; ++n) {
                    const float2 lse2 = load2(sm.lse_exact(s) + (cw * kWideQueries + n * 8 + 2 * t) * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) sc[n][e] = fmaf(sc[n][e], score_scale, -((e & 1) ? lse2.y : lse2.x));
                }
            }
            // Compiled with and without the visibility test, the lean copy on tiles that need no mask (as
            // kLeanElements in bwd_sm90.cu; kWideLean).
            auto elements = [&](const bool masked) {
#pragma unroll
                for (int n = 0; n < kWideNT8; ++n) {
                    const int qc = cw * kWideQueries + n * 8 + 2 * t;
                    const float2 lse2 = load2(sm.lse(s) + qc * 4);
                    const float2 del2 = kWideEarlyP ? make_float2(0.f, 0.f) : load2(sm.delta(s) + qc * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int i = m0 + qc + (e & 1);
                        const int j = key_row0 + g + (e >> 1) * 8;
                        const bool visible = !masked || tv.visible(i, j);
                        const float row = (e & 1) ? lse2.y : lse2.x;
                        if (!kWideEarlyP) {
#if CF_DROPOUT
                            dp[n][e] = kept(n, e) ? dp[n][e] * a.dropout_scale : 0.f;
#endif
                            sc[n][e] = bwd_score_element<CF_SOFTCAP, CF_ALIBI, !kChooseExponent>(
                                sc[n][e], dp[n][e], row, (e & 1) ? del2.y : del2.x, visible, ex, pre, a.softcap, slope,
                                i + tv.off - j);
                        } else {
                            float unused;
                            sc[n][e] = bwd_probability<CF_SOFTCAP, CF_ALIBI, !kChooseExponent>(
                                sc[n][e], row, visible, ex, pre, a.softcap, slope, i + tv.off - j, unused);
                        }
                    }
                }
            };
            if (kWideLean && !need_mask) elements(false);
            else elements(need_mask);
            if (kWideEarlyP) {  // dS = P (dP - delta) once dP^T has retired
                wgmma::wait<0>();
                wgmma::fence_operand(reinterpret_cast<float(&)[kWideQueries / 2]>(dp));
#pragma unroll
                for (int n = 0; n < kWideNT8; ++n) {
                    const float2 del2 = load2(sm.delta(s) + (cw * kWideQueries + n * 8 + 2 * t) * 4);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
#if CF_DROPOUT
                        dp[n][e] = kept(n, e) ? dp[n][e] * a.dropout_scale : 0.f;
#endif
                        dp[n][e] = sc[n][e] * (dp[n][e] - ((e & 1) ? del2.y : del2.x));
                    }
                }
            }
#pragma unroll
            for (int n = 0; n < kWideNT8; ++n) {
#if CF_DROPOUT
#pragma unroll
                for (int e = 0; e < 4; ++e) sc[n][e] = kept(n, e) ? sc[n][e] * a.dropout_scale : 0.f;  // dV: P Z / (1 - p)
#endif
                pt[n][0] = pack2(sc[n][0], sc[n][1]);
                pt[n][1] = pack2(sc[n][2], sc[n][3]);
                dst[n][0] = pack2(dp[n][0], dp[n][1]);
                dst[n][1] = pack2(dp[n][2], dp[n][3]);
            }
        }
        // P^T and dS^T to shared memory (rows keys, queries contiguous: the layout TMA would write). P^T's one
        // buffer: warpgroup 1 waits for warpgroup 0's dV^T of the previous step (see the top).
        if (cw == 1 && it > 0) mbar_wait(sm.pt_free(), (it - 1) & 1);
        {
            const u32 ds_buf = sm.ds(it & 1);
#pragma unroll
            for (int n = 0; n < kWideNT8; ++n) {
                const int chunk = cw * kWideNT8 + n;  // 8-query (16-byte) chunk of a 128-byte row
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int r = warp_in_wg * 16 + g + 8 * hh;
                    const u32 off = r * 128 + ((chunk ^ (r & 7)) << 4) + t * 4;
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(sm.pt() + off), "r"(pt[n][hh]) : "memory");
                    asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(ds_buf + off), "r"(dst[n][hh]) : "memory");
                }
            }
        }
        fence_proxy_async_smem();
        named_barrier_sync(kWideBarrier, 256);

        // dV^T += dO^T.P (w = 0) or dK^T += Q^T.dS (w = 1): A = column block b of the dO / Q tile, MN-major (the
        // k16 step moves 16 query rows = 2048 bytes); B = the P^T / dS^T tile, K-major (32 bytes a step).
        {
            const u64 a_desc = wgmma::desc_sw128(cw == 0 ? sm.dout(s) : sm.q(s), kQBlock, 1024);
            const u64 b_desc = wgmma::desc_sw128(cw == 0 ? sm.pt() : sm.ds(it & 1), 16, 1024);
            wgmma::fence();
#pragma unroll
            for (int b = 0; b < kWideBlocks; ++b)
#pragma unroll
                for (int kk = 0; kk < kBM / 16; ++kk)
                    WgmmaShape<kBN>::ss_tn(reinterpret_cast<float(&)[kBN / 2]>(acc[b]),
                                           wgmma::desc_advance(a_desc, b * kQBlock + kk * 16 * 128),
                                           wgmma::desc_advance(b_desc, kk * 32), 1);
            wgmma::commit();
        }
        if (cw == 0)
            wide_dq_and_release<kDqCols0>(sm, acc, cw, warp_in_wg, lane, it, s);
        else
            wide_dq_and_release<kDqCols1>(sm, acc, cw, warp_in_wg, lane, it, s);
    }

    // Epilogue: dV = (dV^T)^T, dK = softmax_scale (dK^T)^T, 16-bit, keys < seqlen_k (the sequence's, clipped and
    // offset to its rows in the variable-length build), head-dim columns < head_dim.
    u16* out = cw == 0 ? (u16*)a.dv + (i64)bc.b * a.dv_batch_stride + (i64)bc.hk * a.dv_head_stride
                       : (u16*)a.dk + (i64)bc.b * a.dk_batch_stride + (i64)bc.hk * a.dk_head_stride;
    const i64 row_stride = cw == 0 ? a.dv_row_stride : a.dk_row_stride;
#if CF_VARLEN
    const SeqRows keys(a, bc.b);  // re-read here rather than kept live through the loop (as bwd_sm90.cu)
    out += (i64)keys.row_k * row_stride;
#endif
    const float scale = cw == 0 ? 1.f : a.softmax_scale;
#pragma unroll
    for (int b = 0; b < kWideBlocks; ++b)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int d = b * 64 + warp_in_wg * 16 + g + 8 * hh;
            if (d >= a.head_dim) continue;
#pragma unroll
            for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = n_start + n * 8 + 2 * t + e;
                    if (j < CF_SEQLEN_K(a, keys)) out[(i64)j * row_stride + d] = from_float(acc[b][n][2 * hh + e] * scale);
                }
        }
}
