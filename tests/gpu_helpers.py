"""Helpers for GPU tests: float64 references, FlashAttention's error rule, output poisoning."""

import numpy as np

from cuflash import reference


def to_np64(t):
    """Any torch tensor (bf16 included) to a float64 NumPy array."""
    return t.detach().double().cpu().numpy()


def naive_same_dtype(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                     alibi_slopes=None):
    """The same attention math in the input dtype with plain torch ops: the error yardstick of the rule."""
    import torch
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    g = hq // hk
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        dist = (i + sk - sq - j).abs().to(q.dtype)
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None].expand(b, hq)
        s = s - (slopes[:, :, None, None].to(q.dtype) * dist)
    vis = torch.from_numpy(reference.visible_mask(sq, sk, causal, window_size)).to(q.device)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def flash_rule(ours, ref, base, factor=2.0, atol=1e-5):
    """FlashAttention's acceptance rule: our max error <= factor x the same-dtype naive max error (+atol)."""
    ours_err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    base_err = float(np.max(np.abs(base - ref))) if base.size else 0.0
    assert np.isfinite(ours).all(), "output has NaN/inf (unwritten or broken element)"
    assert ours_err <= factor * base_err + atol, f"max error {ours_err:.3e} > {factor} x naive {base_err:.3e} + {atol}"
    return ours_err, base_err


def poison_torch_allocator(nbytes_list, device):
    """Fill freed caching-allocator blocks of these sizes with NaN so that an output element the kernel
    never writes shows up as NaN instead of a stale plausible value."""
    import torch
    blocks = [torch.full((n // 2 + 8,), float("nan"), dtype=torch.float16, device=device) for n in nbytes_list]
    del blocks


def run_sanitizer(script_name, tool):
    """Runs tests/<script_name> under compute-sanitizer's `tool`; asserts it finished and found nothing."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        pytest.skip("compute-sanitizer not installed")
    script = os.path.join(os.path.dirname(__file__), script_name)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([exe, "--tool", tool, "--error-exitcode", "9", sys.executable, script],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and "sanitize run done" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ERROR SUMMARY: 0 errors" in run.stdout + run.stderr or tool == "racecheck"
    assert "RACECHECK SUMMARY: 0 hazards" in run.stdout + run.stderr or tool == "memcheck"


def skip_unless_hopper():
    """Skips the calling test unless the current GPU has compute capability 9.0 (H100/H200)."""
    import cupy
    import pytest
    if int(cupy.cuda.Device().compute_capability) != 90:
        pytest.skip("needs a compute capability 9.0 GPU (H100/H200)")


def loaded_families():
    """Kernel families (fwd_sm90, bwd_sm80, ...) this process has loaded since jit._loaded was cleared."""
    from cuflash import jit
    return {name.split("_bf16")[0].split("_fp16")[0] for (name, *_rest) in jit._loaded}
