"""``python -m cuflash check``: small forward and backward runs on every array library present, compared with
the float64 reference.

Pass rule (the one FlashAttention's tests use): with ``ref`` the float64 result on the exact (already rounded)
inputs and ``naive`` the same attention done naively in the input dtype,

    max|ours - ref|  <=  2 * max|naive - ref|  +  eps(dtype)

"Naively in the input dtype" is emulated in NumPy: every intermediate (scaled q, scores, probabilities,
output, and in the backward dV, dP, dS, dQ, dK) is rounded to the input dtype, while each matmul or
reduction accumulates in float32, as a GPU matmul would. The log-sum-exp is checked against the reference
with a small absolute tolerance.

NumPy (the CPU path) is always checked; CuPy, torch and JAX are checked when a CUDA GPU is usable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

EPS = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-5, "bfloat16": 1e-5}
LSE_TOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-3}

# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, causal): MHA, GQA with a ragged length, MQA with
# seqlen_q < seqlen_k (bottom-right causal alignment), and a non-causal GQA with head dim 128.
CASES = (
    (2, 128, 128, 4, 4, 64, False),
    (2, 97, 97, 4, 2, 64, True),
    (1, 48, 131, 2, 1, 128, True),
    (1, 70, 150, 4, 2, 128, False),
)

LIB_DTYPES = {
    "numpy": ("float16", "float32"),
    "cupy": ("float16",),           # CuPy has no bfloat16
    "torch": ("float16", "bfloat16"),
    "jax": ("bfloat16", "float16"),
}


# ---------------------------------------------------------------------------
# Naive attention in a low-precision dtype (emulated: float32 accumulation, rounded intermediates)
# ---------------------------------------------------------------------------

def round_to(x, dtype: str):
    """``x`` (float32/64) rounded to ``dtype`` and returned as float32 (float64 for float64)."""
    x = np.asarray(x)
    if dtype == "float64":
        return x.astype(np.float64)
    if dtype == "float32":
        return x.astype(np.float32)
    if dtype == "float16":
        return x.astype(np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # Round to nearest even on the top 16 bits of the float32 pattern (inputs here are finite).
        b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.astype(np.uint32).view(np.float32)
    raise ValueError(f"unsupported dtype {dtype}")


def _acc(dtype):
    return np.float64 if dtype == "float64" else np.float32


def _mask(sq, sk, causal):
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return (j <= i + (sk - sq)) if causal else np.ones((sq, sk), dtype=bool)


def _naive_parts(q, k, v, dtype, causal, scale):
    acc = _acc(dtype)
    r = lambda x: round_to(x, dtype)  # noqa: E731
    q, k, v = (np.asarray(t, dtype=acc) for t in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    ke = np.repeat(k, hq // hk, axis=2)
    ve = np.repeat(v, hq // hk, axis=2)
    qs = r(q * acc(scale))
    s = r(np.einsum("bqhd,bkhd->bhqk", qs, ke))
    s = np.where(_mask(sq, sk, causal), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    p = r(e / e.sum(axis=-1, keepdims=True))
    out = r(np.einsum("bhqk,bkhd->bqhd", p, ve))
    return qs, ke, ve, p, out


def naive_attention(q, k, v, dtype, *, causal=False, softmax_scale=None):
    """Attention done naively in ``dtype``; float64 output ``(b, sq, hq, d)``."""
    return _naive_parts(q, k, v, dtype, causal, softmax_scale)[-1].astype(np.float64)


def naive_attention_backward(do, q, k, v, dtype, *, causal=False, softmax_scale=None):
    """Gradients of :func:`naive_attention` done naively in ``dtype``; float64 ``(dq, dk, dv)``."""
    acc = _acc(dtype)
    r = lambda x: round_to(x, dtype)  # noqa: E731
    qs, ke, ve, p, _ = _naive_parts(q, k, v, dtype, causal, softmax_scale)
    do = np.asarray(do, dtype=acc)
    b, sq, hq, d = qs.shape
    sk, hk = np.shape(k)[1], np.shape(k)[2]
    g = hq // hk
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    dv = r(np.einsum("bhqk,bqhd->bkhd", p, do).reshape(b, sk, hk, g, d).sum(axis=3))
    dp = r(np.einsum("bqhd,bkhd->bhqk", do, ve))
    ds = r(p * (dp - (dp * p).sum(axis=-1, keepdims=True)))
    dq = r(r(np.einsum("bhqk,bkhd->bqhd", ds, ke)) * acc(scale))
    dk = r(np.einsum("bhqk,bqhd->bkhd", ds, qs).reshape(b, sk, hk, g, d).sum(axis=3))
    return tuple(x.astype(np.float64) for x in (dq, dk, dv))


# ---------------------------------------------------------------------------
# Array libraries
# ---------------------------------------------------------------------------

class Lib:
    """How to move float32 NumPy data into a library's arrays (in a dtype) and results back to float64."""

    def __init__(self, name):
        self.name = name

    def make(self, x32, dtype):
        n = self.name
        if n == "numpy":
            return x32.astype(dtype)
        if n == "cupy":
            import cupy
            return cupy.asarray(x32).astype(dtype)
        if n == "torch":
            import torch
            return torch.from_numpy(x32).to(device="cuda", dtype=getattr(torch, dtype))
        if n == "jax":
            import jax
            import jax.numpy as jnp
            gpu = [d for d in jax.devices() if d.platform == "gpu"][0]
            return jax.device_put(jnp.asarray(x32, dtype=getattr(jnp, dtype)), gpu)
        raise ValueError(n)

    def to64(self, x):
        n = self.name
        if n == "numpy":
            return np.asarray(x, dtype=np.float64)
        if n == "cupy":
            import cupy
            return cupy.asnumpy(x).astype(np.float64)
        if n == "torch":
            return x.detach().float().cpu().numpy().astype(np.float64)
        if n == "jax":
            import jax.numpy as jnp
            return np.asarray(x.astype(jnp.float32)).astype(np.float64)
        raise ValueError(n)


def gpu_status() -> tuple:
    """(whether a usable CUDA GPU was found, the sentence saying why not). A missing CuPy is named as the
    cause, with the extra that installs it: "no GPU" would send the user looking at drivers instead."""
    try:
        import cupy
    except ImportError:
        from .jit import INSTALL_HINT
        return False, f"CuPy is not installed, so no GPU can be used (for the GPU path: {INSTALL_HINT})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no driver, CUDA_VISIBLE_DEVICES="", ...
        first = str(e).splitlines()[0] if str(e) else ""
        return False, f"No CUDA GPU found ({type(e).__name__}: {first})"
    if n < 1:
        return False, "No CUDA GPU found"
    try:
        cc = int(cupy.cuda.Device(0).compute_capability)
    except Exception as e:  # noqa: BLE001
        return False, f"No usable CUDA GPU found ({type(e).__name__}: {e})"
    if cc < 80:
        return False, f"No CUDA GPU of compute capability 8.0 or newer found (GPU 0 is {cc // 10}.{cc % 10})"
    return True, ""


def gpu_found() -> bool:
    return gpu_status()[0]


def libraries_present(gpu: bool) -> list:
    libs = ["numpy"]
    if not gpu:
        return libs
    for name in ("cupy", "torch", "jax"):
        try:
            mod = __import__(name)
            if name == "torch" and not mod.cuda.is_available():
                continue
            if name == "jax" and not any(d.platform == "gpu" for d in mod.devices()):
                continue
            libs.append(name)
        except Exception:  # noqa: BLE001
            continue
    return libs


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

@dataclass
class CheckResult:
    name: str
    status: str          # PASS, FAIL or SKIP
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


def _compare(name, ours, ref, naive, dtype):
    eps = EPS[dtype]
    parts, ok = [], True
    for label, o, rf, nv in zip(name, ours, ref, naive):
        err = float(np.max(np.abs(o - rf))) if o.size else 0.0
        nerr = float(np.max(np.abs(nv - rf))) if nv.size else 0.0
        bound = 2 * nerr + eps
        good = bool(np.all(np.isfinite(o))) and err <= bound
        ok &= good
        parts.append(f"{label} err {err:.2e} {'<=' if good else '>'} {bound:.2e} (naive {nerr:.2e})")
    return ok, "; ".join(parts)


def _case_label(case):
    b, sq, sk, hq, hk, d, causal = case
    return f"b{b} sq{sq} sk{sk} h{hq}/{hk} d{d} {'causal' if causal else 'full'}"


def check_case(lib: Lib, dtype, case, attention, attention_backward, rng, torch_autograd=None):
    b, sq, sk, hq, hk, d, causal = case
    q32 = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    k32 = rng.standard_normal((b, sk, hk, d)).astype(np.float32)
    v32 = rng.standard_normal((b, sk, hk, d)).astype(np.float32)
    do32 = rng.standard_normal((b, sq, hq, d)).astype(np.float32)
    q, k, v, do = (lib.make(x, dtype) for x in (q32, k32, v32, do32))
    # The exact values the library holds, so the reference sees the same rounded inputs.
    q64, k64, v64, do64 = (lib.to64(x) for x in (q, k, v, do))
    from .reference import attention_backward_reference, attention_reference

    ref_out, ref_lse = attention_reference(q64, k64, v64, causal=causal)
    label = f"{lib.name:<6} {dtype:<9} {_case_label(case)}"
    results = []

    try:
        out, lse = attention(q, k, v, causal=causal, return_lse=True)
        out64, lse64 = lib.to64(out), lib.to64(lse)
        ok, detail = _compare(("out",), (out64,), (ref_out,),
                              (naive_attention(q64, k64, v64, dtype, causal=causal),), dtype)
        lse_err = float(np.max(np.abs(lse64 - ref_lse)))
        lse_ok = out64.shape == ref_out.shape and lse64.shape == ref_lse.shape and lse_err <= LSE_TOL[dtype]
        detail += f"; lse err {lse_err:.2e} {'<=' if lse_ok else '>'} {LSE_TOL[dtype]:.0e}"
        results.append(CheckResult(f"fwd  {label}", "PASS" if ok and lse_ok else "FAIL", detail))
    except Exception as e:  # noqa: BLE001
        results.append(CheckResult(f"fwd  {label}", "FAIL", f"{type(e).__name__}: {e}"))
        return results

    naive_grads = naive_attention_backward(do64, q64, k64, v64, dtype, causal=causal)
    ref_grads = attention_backward_reference(do64, q64, k64, v64, causal=causal)
    try:
        grads = attention_backward(do, q, k, v, out, lse, causal=causal)
        ok, detail = _compare(("dq", "dk", "dv"), [lib.to64(g) for g in grads], ref_grads, naive_grads, dtype)
        results.append(CheckResult(f"bwd  {label}", "PASS" if ok else "FAIL", detail))
    except NotImplementedError as e:
        results.append(CheckResult(f"bwd  {label}", "SKIP", f"backward not implemented here: {e}"))
    except Exception as e:  # noqa: BLE001
        results.append(CheckResult(f"bwd  {label}", "FAIL", f"{type(e).__name__}: {e}"))

    if torch_autograd is not None:
        try:
            import torch
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = torch_autograd(qg, kg, vg, causal=causal)
            grads = torch.autograd.grad(o, (qg, kg, vg), do)
            ok, detail = _compare(("dq", "dk", "dv"), [lib.to64(g) for g in grads], ref_grads, naive_grads,
                                  dtype)
            results.append(CheckResult(f"grad {label} (cuflash.torch autograd)", "PASS" if ok else "FAIL",
                                       detail))
        except NotImplementedError as e:
            results.append(CheckResult(f"grad {label} (cuflash.torch autograd)", "SKIP",
                                       f"backward not implemented here: {e}"))
        except Exception as e:  # noqa: BLE001
            results.append(CheckResult(f"grad {label} (cuflash.torch autograd)", "FAIL",
                                       f"{type(e).__name__}: {e}"))
    return results


def _missing_backward(*args, **kwargs):
    raise NotImplementedError("cuflash.attention_backward is not present in this build")


def run_checks(libs=None, *, attention=None, attention_backward=None, cases=CASES, seed=0, out=print):
    """Run every check; returns the list of :class:`CheckResult`.

    ``attention`` / ``attention_backward`` default to ``cuflash.attention`` / ``cuflash.attention_backward``;
    passing others lets a caller (or a test) check any implementation with the cuflash calling convention.
    """
    if attention is None or attention_backward is None:
        import cuflash
        if attention is None:
            if not hasattr(cuflash, "attention"):
                r = CheckResult("api", "FAIL", "cuflash has no attention()")
                out(f"FAIL {r.name}: {r.detail}")
                return [r]
            attention = cuflash.attention
        if attention_backward is None:
            attention_backward = getattr(cuflash, "attention_backward", None) or _missing_backward
    if libs is None:
        gpu, why = gpu_status()
        libs = libraries_present(gpu)
        if not gpu:
            out(f"{why}: checking the NumPy (CPU) path only.")
    out("rule: max|ours - ref64| <= 2 * max|naive in input dtype - ref64| + eps")
    rng = np.random.default_rng(seed)
    results = []
    for name in libs:
        lib = Lib(name)
        torch_autograd = None
        if name == "torch":
            try:
                import cuflash.torch as cft
                torch_autograd = getattr(cft, "attention", None)
            except Exception:  # noqa: BLE001
                torch_autograd = None
            if torch_autograd is None:
                out("note: cuflash.torch.attention not available; torch autograd not checked")
        for dtype in LIB_DTYPES[name]:
            for case in cases:
                for r in check_case(lib, dtype, case, attention, attention_backward, rng, torch_autograd):
                    results.append(r)
                    out(f"{r.status} {r.name}: {r.detail}")
    return results


def main(argv=None, *, attention=None, attention_backward=None, out=print) -> int:
    p = argparse.ArgumentParser(prog="python -m cuflash check", description=__doc__.split("\n\n")[0])
    p.add_argument("--libs", default=None,
                   help="comma list among numpy,cupy,torch,jax (default: every one present)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    libs = None
    if a.libs is not None:
        libs = [x.strip() for x in a.libs.split(",") if x.strip()]
        if not libs:
            p.error(f"--libs {a.libs!r} names no library; pick among {','.join(LIB_DTYPES)} or leave it out")
        bad = [x for x in libs if x not in LIB_DTYPES]
        if bad:
            p.error(f"unknown libraries {bad}")
        if any(x != "numpy" for x in libs):
            gpu, why = gpu_status()
            if not gpu:
                out(f"{why}: only numpy can be checked.")
                return 1
    results = run_checks(libs, attention=attention, attention_backward=attention_backward, seed=a.seed,
                         out=out)
    n_fail = sum(r.status == "FAIL" for r in results)
    n_skip = sum(r.status == "SKIP" for r in results)
    n_pass = sum(r.status == "PASS" for r in results)
    out(f"{n_pass} passed, {n_fail} failed, {n_skip} skipped")
    return 0 if n_fail == 0 and n_pass > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
