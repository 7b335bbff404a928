"""Per-call host cost of cuflash against SDPA's flash and cuDNN backends, in one process.

    python bench/bench_host_cost.py [--calls 2000] [--profile] [--out bench/results]

At tiny shapes a call's GPU work takes a few microseconds, so back-to-back calls run at the speed of the
host: the wall clock per call (time.perf_counter over --calls calls, then one synchronize; warm-up excluded)
is the host cost a decode loop or a small model's eager step pays per attention. The cases of a shape take
turns (--rounds rounds, each case timed once a round; the median per case), so that a host whose speed
drifts during the run (the lent machines' do, by up to 2x between leases) shifts every case alike and the
ratios stay comparable. Rows:

    forward            cuflash.attention on CuPy arrays and on torch tensors, cuflash.torch.flash_attn_func,
                       F.scaled_dot_product_attention with the flash and the cuDNN backend
    backward           cuflash.attention_backward (CuPy), the op behind flash_attn_func's backward (torch)
    fwd + bwd autograd flash_attn_func / SDPA forward, then torch.autograd.grad; and a do-nothing
                       autograd.Function (a copy each way): what any Python autograd node costs
    JAX (--jax)        under jax.jit: cuflash.jax.attention against jax.nn.dot_product_attention's cuDNN
                       implementation; one jitted call, 16 calls chained inside one jitted function (the
                       cost per attention a JAX model pays, XLA's own launch included), and jax.grad of
                       the forward

Shapes (batch, seqlen, heads, head_dim): (1, 128, 8, 64) and (4, 256, 16, 128), bf16, causal. ``--profile``
adds a cProfile of cuflash's torch forward (the top functions by own time), which says where the host time
goes. Writes ``host-cost-<stamp>.json`` under ``<out>/<gpu-slug>/`` and prints a table.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import results_io

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(1, 128, 8, 64), (4, 256, 16, 128)]


def timed_us(fn, sync, calls: int) -> float:
    """Wall clock per call of ``calls`` back-to-back calls and one synchronize, in microseconds."""
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls * 1e6


def interleaved_us(cases: dict, calls_of, rounds: int) -> dict:
    """{name: median us per call} of ``cases`` ({name: (call, synchronize)}) timed in turns, ``rounds``
    times each after a warm-up; a case that raises RuntimeError on its warm-up (a backend this build or
    GPU lacks) is reported as its message instead."""
    live, res = {}, {}
    for name, (fn, sync) in cases.items():
        try:
            for _ in range(20):
                fn()
            sync()
        except RuntimeError as e:
            res[name] = str(e).splitlines()[0][:80]
            continue
        live[name] = (fn, sync)
    samples = {name: [] for name in live}
    for _ in range(rounds):
        for name, (fn, sync) in live.items():
            samples[name].append(timed_us(fn, sync, calls_of(name)))
    res.update({name: statistics.median(v) for name, v in samples.items()})
    return res


CHAIN = 16  # attention calls inside one jitted function ("chained" rows report the time per attention)


def _jax_cases(tq, tk, tv) -> dict:
    """JAX rows on DLPack views of the torch inputs, as {name: (call, synchronize)}: JAX dispatches
    asynchronously, so the synchronize waits on the last call's result rather than on the device."""
    import os
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.dlpack
    import jax.numpy as jnp

    import cuflash.jax as cfj
    q, k, v = (jax.dlpack.from_dlpack(x) for x in (tq, tk, tv))
    impls = {"cuflash.jax": lambda q, k, v: cfj.attention(q, k, v, causal=True),
             "JAX cuDNN": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="cudnn")}
    cases = {}
    for name, attn in impls.items():
        one = jax.jit(attn)

        def chain(q, k, v, attn=attn):
            for _ in range(CHAIN):
                q = attn(q, k, v)
            return q
        chained = jax.jit(chain)
        grad = jax.jit(jax.grad(lambda q, k, v, attn=attn: attn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))
        for label, f in ((f"jax.jit forward: {name}", one), (f"jax.jit forward, {CHAIN} chained: {name}", chained),
                         (f"jax.jit grad: {name}", grad)):
            case = _LastResult(lambda f=f: f(q, k, v), jax.block_until_ready)
            cases[label] = (case.call, case.wait)
    return cases


def _null_function():
    import torch

    class NullAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return q.clone()

        @staticmethod
        def backward(ctx, g):
            return g, g, g
    return NullAttention


class _LastResult:
    """A call that keeps its latest result, and a synchronize that blocks on it."""

    def __init__(self, fn, block):
        self.fn, self.block, self.last = fn, block, None

    def call(self):
        self.last = self.fn()

    def wait(self):
        self.block(self.last)


def _print_ratios(rows: list, shape: str) -> None:
    """Issue 14's two ratios for ``shape``: cuflash's forward calls and flash_attn_func forward + backward
    against SDPA flash's."""
    us = {r["case"]: r["us_per_call"] for r in rows if r["shape"] == shape}
    for ours, theirs in (("forward: cuflash.attention (torch)", "forward: SDPA flash"),
                         ("forward: cuflash.attention (CuPy)", "forward: SDPA flash"),
                         ("forward: flash_attn_func", "forward: SDPA flash"),
                         ("fwd+bwd autograd: flash_attn_func", "fwd+bwd autograd: SDPA flash")):
        if ours in us and theirs in us:
            print(f"{shape:>20}  ratio {ours.split(': ')[1]} / SDPA flash ({ours.split(':')[0]}): "
                  f"{us[ours] / us[theirs]:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing (autograd and JAX rows: a quarter)")
    ap.add_argument("--rounds", type=int, default=7, help="timings per case, in turns with the other cases")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--jax", action="store_true", help="add the JAX rows (cuflash.jax against JAX's cuDNN)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import cupy
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    import cuflash.torch as ct
    null_attention = _null_function()

    rows = []
    sync_t = torch.cuda.synchronize
    for b, s, h, d in SHAPES:
        shape = f"({b}, {s}, {h}, {d})"
        tq, tk, tv = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cq, ck, cv = (cupy.from_dlpack(x) for x in (tq, tk, tv))
        sq, sk, sv = (x.transpose(1, 2) for x in (tq, tk, tv))  # SDPA's (b, h, s, d) views
        out, lse = cuflash.attention(cq, ck, cv, causal=True, return_lse=True)
        dout = cupy.from_dlpack(torch.randn_like(tq))
        plan_c, plan_t = cuflash.plan(cq, ck, cv, causal=True), cuflash.plan(tq, tk, tv, causal=True)
        cases = {
            "forward: cuflash.attention (CuPy)": lambda: cuflash.attention(cq, ck, cv, causal=True),
            "forward: cuflash.attention (torch)": lambda: cuflash.attention(tq, tk, tv, causal=True),
            "forward: cuflash.plan(...).run (CuPy)": lambda: plan_c.run(cq, ck, cv),
            "forward: cuflash.plan(...).run (torch)": lambda: plan_t.run(tq, tk, tv),
            "forward: flash_attn_func": lambda: ct.flash_attn_func(tq, tk, tv, causal=True),
            "backward: cuflash.attention_backward (CuPy)":
                lambda: cuflash.attention_backward(dout, cq, ck, cv, out, lse, causal=True),
            "backward: cuflash.plan(...).run_backward (CuPy)": lambda: plan_c.run_backward(dout, cq, ck, cv, out, lse),
        }
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(sq, sk, sv, is_causal=True)
            cases[f"forward: SDPA {name}"] = sdpa
        gq, gk, gv = (x.detach().clone().requires_grad_(True) for x in (tq, tk, tv))
        gsq, gsk, gsv = (x.detach().clone().transpose(1, 2).requires_grad_(True) for x in (tq, tk, tv))
        grad_out = torch.randn_like(tq)

        def fa_train():
            o = ct.flash_attn_func(gq, gk, gv, causal=True)
            return torch.autograd.grad(o, (gq, gk, gv), grad_out)
        cases["fwd+bwd autograd: flash_attn_func"] = fa_train

        def null_train():
            # The floor of any Python autograd node: an autograd.Function whose forward and backward do only
            # a copy, through the same engine (its CUDA backward on the engine's device thread).
            return torch.autograd.grad(null_attention.apply(gq, gk, gv), (gq, gk, gv), grad_out)
        cases["fwd+bwd autograd: a do-nothing autograd.Function"] = null_train
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa_train(backend=backend):
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(gsq, gsk, gsv, is_causal=True)
                return torch.autograd.grad(o, (gsq, gsk, gsv), grad_out.transpose(1, 2))
            cases[f"fwd+bwd autograd: SDPA {name}"] = sdpa_train
        if args.jax:
            cases.update(_jax_cases(tq, tk, tv))
        cases = {name: fn if isinstance(fn, tuple) else (fn, sync_t) for name, fn in cases.items()}
        timed = interleaved_us(cases, lambda name: args.calls // 4 if "grad" in name or "chained" in name
                               else args.calls, args.rounds)
        for name, us in timed.items():
            if isinstance(us, str):  # a backend this build or GPU lacks
                print(f"{name}: unavailable ({us})")
                continue
            us /= CHAIN if "chained" in name else 1
            rows.append({"case": name, "shape": shape, "us_per_call": round(us, 1)})
            print(f"{shape:>20}  {name:<46} {us:8.1f} us", flush=True)
        _print_ratios(rows, shape)
        if args.profile and (b, s, h, d) == SHAPES[0]:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                cuflash.attention(tq, tk, tv, causal=True)
            prof.disable()
            sync_t()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
            print(text.getvalue()[:6000])
    gpu = torch.cuda.get_device_name()
    results_io.write_json(results_io.result_path(args.out, gpu, "host-cost"),
                          {"gpu": gpu, "torch": torch.__version__, "calls": args.calls, "rounds": args.rounds,
                           "rows": rows})

if __name__ == "__main__":
    main()
