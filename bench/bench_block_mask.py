"""Block-sparse attention, forward and backward (issue 18): cuflash with a BlockMask against its own dense time
and against FlexAttention on the same mask, in one process.

    python bench/bench_block_mask.py [--seqlen 16384] [--heads 16] [--hdim 128] [--runs 10] [--out bench/results]

Masks (bf16, batch 1, blocks of 128 x 128; both leave about 90% of the blocks empty):

- ``window``: causal sliding window of 1024 keys plus 4 global tokens (keys 0..3 seen by every query);
- ``documents``: causal attention inside documents of 1024 tokens (a document mask of 16 documents at 16k).

For each: the visible-block fraction f (of the (query block, key block) pairs), cuflash's time with the mask,
``f x`` cuflash's dense (unmasked, non-causal) time (the target: within 1.5x of it), and FlexAttention's
time (torch.compile'd flex_attention with create_block_mask's BlockMask; the target: cuflash >= 1.5x faster),
forward and backward (FlexAttention's backward: its forward + backward less its forward). TFLOP/s count
the attended pairs: 4 * heads * pairs * head_dim, x2.5 for the backward. CUDA events, median of --runs
samples of 4 calls after warm-up (results_io.median_ms). Prints a table and writes ``block-mask-<stamp>.json``
under ``<out>/<gpu-slug>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import results_io

REPO = Path(__file__).resolve().parent.parent


def mask_mods(window: int, doc: int):
    """name -> FlexAttention mask_mod (torch index tensors in, bool out)."""
    def sliding(b, h, q, kv):
        return ((q >= kv) & (q - kv < window)) | (kv < 4)

    def documents(b, h, q, kv):
        return (q >= kv) & (q // doc == kv // doc)
    return {"window": sliding, "documents": documents}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import cuflash
    flex = torch.compile(flex_attention)
    s, h, d = args.seqlen, args.heads, args.hdim
    gen = torch.Generator(device="cuda").manual_seed(0)
    # (batch, heads, seqlen, d) storage, FlexAttention's layout; cuflash reads the same memory through
    # (batch, seqlen, heads, d) views.
    q, k, v, do = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    qv, kv, vv, dov = (x.transpose(1, 2) for x in (q, k, v, do))
    out_d, lse_d = cuflash.attention(qv, kv, vv, return_lse=True)
    t_dense = {"fwd": results_io.median_ms(lambda: cuflash.attention(qv, kv, vv), args.runs),
               "bwd": results_io.median_ms(lambda: cuflash.attention_backward(dov, qv, kv, vv, out_d, lse_d),
                                           args.runs)}
    rows = []
    for name, mod in mask_mods(1024, 1024).items():
        flex_mask = create_block_mask(mod, None, None, s, s, device="cuda")
        ours = cuflash.BlockMask.from_flex(flex_mask)
        visible = ours.visible_fraction()
        qi = torch.arange(s, device="cuda")
        pairs = int(sum(mod(0, 0, qi[i:i + 1024, None], qi[None, :]).sum().item() for i in range(0, s, 1024)))
        out, lse = cuflash.attention(qv, kv, vv, block_mask=ours, return_lse=True)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def flex_fwd_bwd():
            o = flex(*leaves, block_mask=flex_mask)
            o.backward(do)
        ref = flex(q, k, v, block_mask=flex_mask)
        err = (out.float() - ref.transpose(1, 2).float()).abs().max().item()
        t_ours = {"fwd": results_io.median_ms(lambda: cuflash.attention(qv, kv, vv, block_mask=ours), args.runs),
                  "bwd": results_io.median_ms(lambda: cuflash.attention_backward(dov, qv, kv, vv, out, lse,
                                                                                 block_mask=ours), args.runs)}
        t_flex_fwd = results_io.median_ms(lambda: flex(q, k, v, block_mask=flex_mask), args.runs)
        t_flex = {"fwd": t_flex_fwd, "bwd": results_io.median_ms(flex_fwd_bwd, args.runs) - t_flex_fwd}
        for pass_ in ("fwd", "bwd"):
            mult = 2.5 if pass_ == "bwd" else 1.0
            flops = mult * 4 * h * pairs * d
            row = dict(mask=name, pass_=pass_, visible_blocks=visible, attended_pairs=pairs, ms=t_ours[pass_],
                       dense_ms=t_dense[pass_], flex_ms=t_flex[pass_], tflops=flops / t_ours[pass_] / 1e9,
                       flex_tflops=flops / t_flex[pass_] / 1e9, max_abs_diff_vs_flex=err)
            row["over_visible_dense"] = t_ours[pass_] / (visible * t_dense[pass_])
            row["speedup_vs_flex"] = t_flex[pass_] / t_ours[pass_]
            rows.append(row)
            print(f"{pass_} {name:9s} visible {visible:5.1%}  cuflash {t_ours[pass_]:7.3f} ms ({row['tflops']:5.1f} "
                  f"TFLOP/s)  f x dense {visible * t_dense[pass_]:7.3f} ms (ratio {row['over_visible_dense']:.2f}, "
                  f"target <= 1.5)  flex {t_flex[pass_]:7.3f} ms ({row['flex_tflops']:5.1f})  cuflash/flex "
                  f"{row['speedup_vs_flex']:.2f}x (target >= 1.5)  |out - flex| {err:.3g}", flush=True)
    gpu = torch.cuda.get_device_name()
    results_io.write_json(results_io.result_path(args.out, gpu, "block-mask"),
                          dict(gpu=gpu, seqlen=s, heads=h, head_dim=d, dense_ms=t_dense, rows=rows))


if __name__ == "__main__":
    main()
