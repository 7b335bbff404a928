"""A Hugging Face Llama training step with SDPA and with cuflash, in one process.

    python bench/bench_e2e.py [--steps 10] [--configs hd64-2k,hd128-4k] [--out bench/results]

The model is built from a config (random weights, no download): LlamaConfig's defaults (vocabulary 32000,
MLP 11008) with 8 layers of hidden 2048, bf16, AdamW, trained on random tokens. Two copies with the same initial weights run the same
batches, one with ``attn_implementation="sdpa"`` (cuDNN on Hopper by default) and one with cuflash through
``cuflash.integrations.transformers``; their steps alternate so that clocks and neighbours weigh on both.
A step is forward, backward and the optimizer step, timed with CUDA events (median over --steps steps
after 3 warm-up steps). Loss agreement: max |loss_sdpa - loss_cuflash| over the timed steps (the copies
drift apart slowly: bf16 rounding differs between the two attentions).

Configs (batch x seqlen = 8192 tokens):

    hd64-2k    32 query / 8 KV heads of 64, batch 4 x 2048
    hd64-4k    the same heads, batch 2 x 4096
    hd128-2k   16 query / 4 KV heads of 128, batch 4 x 2048
    hd128-4k   the same heads, batch 2 x 4096

Attention's share of a step, and the ceiling it puts on any attention kernel (Amdahl): one more step of each
copy runs under torch.profiler, which sums the device time of the attention kernels (names matching
ATTENTION_KERNELS: cuDNN's and FlashAttention's SDPA kernels, cuflash's ``attention_*`` and layout copies)
against all kernels. ``ceiling_free`` is the step speedup over SDPA if cuflash's attention kernels took no
time at all (cuflash's step less their time); ``ceiling_peak`` if they ran at --peak-tflops (the chip's
dense 16-bit tensor peak: 989 for H100 / H200 SXM, from NVIDIA's datasheets) on their FLOPs (4 B H S^2 D per
layer, halved for causal, x3.5 for forward plus backward, as bench_attention.py counts them). A kernel
cannot beat ``ceiling_peak``. Kernel time is subtracted from the step's wall time, which holds while
attention does not overlap other kernels (one stream).

Prints a table, writes ``e2e-<stamp>.json`` and a PNG under ``<out>/<gpu-slug>/``. Skips (exit 0, a line
saying why) without transformers or a CUDA GPU.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import results_io

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "hd64-2k": dict(heads=32, kv_heads=8, batch=4, seqlen=2048),
    "hd64-4k": dict(heads=32, kv_heads=8, batch=2, seqlen=4096),
    "hd128-2k": dict(heads=16, kv_heads=4, batch=4, seqlen=2048),
    "hd128-4k": dict(heads=16, kv_heads=4, batch=2, seqlen=4096),
}
HIDDEN, LAYERS, VOCAB = 2048, 8, 32000
ATTENTION_KERNELS = re.compile(r"attention_|strided_copy|flash|fmha|sdpa", re.IGNORECASE)


def build(transformers, torch, cfg: dict, attn: str, state=None):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=cfg["heads"],
                                      num_key_value_heads=cfg["kv_heads"], max_position_embeddings=cfg["seqlen"])
    config._attn_implementation = attn
    model = transformers.LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run_config(transformers, torch, name: str, cfg: dict, attn_cf: str, steps: int, peak_tflops: float) -> dict:
    torch.manual_seed(0)
    sdpa, opt_sdpa = build(transformers, torch, cfg, "sdpa")
    ours, opt_ours = build(transformers, torch, cfg, attn_cf, sdpa.state_dict())
    gen = torch.Generator(device="cuda").manual_seed(1)
    times = {"sdpa": [], "cuflash": []}
    diffs = []
    for i in range(steps + 3):
        ids = torch.randint(0, VOCAB, (cfg["batch"], cfg["seqlen"]), device="cuda", generator=gen)
        losses = {}
        for label, model, opt in (("sdpa", sdpa, opt_sdpa), ("cuflash", ours, opt_ours))[:: 1 if i % 2 else -1]:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stop.record()
            stop.synchronize()
            losses[label] = loss.item()
            if i >= 3:
                times[label].append(start.elapsed_time(stop))
        if i >= 3:
            diffs.append(abs(losses["sdpa"] - losses["cuflash"]))
    attn_ms = {label: attention_ms(torch, model, opt, ids)
               for label, model, opt in (("sdpa", sdpa, opt_sdpa), ("cuflash", ours, opt_ours))}
    del sdpa, ours, opt_sdpa, opt_ours
    torch.cuda.empty_cache()
    ms = {k: statistics.median(v) for k, v in times.items()}
    head_dim = HIDDEN // cfg["heads"]
    flops = LAYERS * 4 * cfg["batch"] * cfg["heads"] * cfg["seqlen"] ** 2 * head_dim * 0.5 * 3.5
    at_peak = flops / (peak_tflops * 1e9)
    rest = ms["cuflash"] - attn_ms["cuflash"][0]  # cuflash's step without its attention kernels
    return {"config": name, **cfg, "head_dim": head_dim, "ms_sdpa": round(ms["sdpa"], 2),
            "ms_cuflash": round(ms["cuflash"], 2), "speedup": round(ms["sdpa"] / ms["cuflash"], 3),
            "max_loss_diff": round(max(diffs), 5),
            "attn_ms_sdpa": round(attn_ms["sdpa"][0], 3), "attn_ms_cuflash": round(attn_ms["cuflash"][0], 3),
            "kernel_ms_sdpa": round(attn_ms["sdpa"][1], 2), "kernel_ms_cuflash": round(attn_ms["cuflash"][1], 2),
            "attn_ms_at_peak": round(at_peak, 3), "ceiling_free": round(ms["sdpa"] / rest, 3),
            "ceiling_peak": round(ms["sdpa"] / (rest + at_peak), 3)}


def attention_ms(torch, model, opt, ids) -> tuple:
    """(attention kernels, all kernels) device milliseconds of one training step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    attn = total = 0.0
    for e in prof.key_averages():
        us = e.self_device_time_total
        if e.device_type == torch.autograd.DeviceType.CUDA and us > 0:
            total += us
            if ATTENTION_KERNELS.search(e.key):
                attn += us
    return attn / 1e3, total / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense 16-bit tensor peak of the GPU (TFLOP/s) for ceiling_peak; 989: H100 / H200 SXM")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"bench_e2e: skipped, {e.name} is not installed")
        return
    if not torch.cuda.is_available():
        print("bench_e2e: skipped, no CUDA GPU")
        return
    import cuflash.integrations.transformers as cf_hf
    attn_cf = cf_hf.register()
    rows = []
    print(f"{'config':<10} {'batch x seqlen':>15} {'SDPA ms':>9} {'cuflash ms':>11} {'speedup':>8} {'max |dloss|':>12}"
          f" {'attn ms SDPA':>13} {'attn ms ours':>13} {'at peak':>8} {'ceiling free':>13} {'ceiling peak':>13}")
    for name in args.configs.split(","):
        r = run_config(transformers, torch, name, CONFIGS[name], attn_cf, args.steps, args.peak_tflops)
        rows.append(r)
        print(f"{name:<10} {r['batch']:>7} x {r['seqlen']:<5} {r['ms_sdpa']:>9.2f} {r['ms_cuflash']:>11.2f} "
              f"{r['speedup']:>7.3f}x {r['max_loss_diff']:>12.5f} {r['attn_ms_sdpa']:>13.2f} {r['attn_ms_cuflash']:>13.2f}"
              f" {r['attn_ms_at_peak']:>8.2f} {r['ceiling_free']:>12.3f}x {r['ceiling_peak']:>12.3f}x", flush=True)
    gpu = torch.cuda.get_device_name()
    path = results_io.result_path(args.out, gpu, "e2e")
    results_io.write_json(path, {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                                 "layers": LAYERS, "hidden": HIDDEN, "vocab": VOCAB, "steps": args.steps,
                                 "peak_tflops": args.peak_tflops,
                                 "rows": rows})
    plt = results_io.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ms_sdpa"] for r in rows], 0.4, label="SDPA (default backend)")
    ax.bar([i + 0.2 for i in x], [r["ms_cuflash"] for r in rows], 0.4, label="cuflash")
    ax.set_xticks(list(x), [r["config"] for r in rows])
    ax.set_ylabel("ms per training step")
    ax.set_title(f"Llama, {LAYERS} layers, hidden {HIDDEN}, bf16, AdamW: {gpu}", fontsize=9)
    ax.legend()
    results_io.save_png(fig, path)


if __name__ == "__main__":
    main()
