"""Runs the Hopper forward at odd sizes (seqlens 1, 17, 1000; every tile configuration; persistent CTAs) for
compute-sanitizer: `compute-sanitizer --tool memcheck|racecheck python tests/sanitize_forward_sm90.py`.
CuPy only, so the sanitizer does not have to follow a deep-learning framework's start-up. The outputs'
memory is poisoned with NaN before each call, so an element the kernel never writes fails the isfinite check."""

import cupy as cp

import cuflash

from gpu_helpers import poison_cupy_pool  # tests/ is this script's directory, first on sys.path

rng = cp.random.default_rng(0)
for d in (64, 128, 256):
    for sq, sk in ((1, 1), (17, 17), (1000, 1000), (17, 1000)):
        for causal in (False, True):
            q = rng.standard_normal((2, sq, 2, d), dtype=cp.float32).astype(cp.float16)
            k = rng.standard_normal((2, sk, 1, d), dtype=cp.float32).astype(cp.float16)
            v = rng.standard_normal((2, sk, 1, d), dtype=cp.float32).astype(cp.float16)
            poison_cupy_pool([q.nbytes, 2 * 2 * sq * 4])
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            assert bool(cp.isfinite(out).all()), (d, sq, sk, causal)
            assert not bool(cp.isnan(lse).any()), (d, sq, sk, causal)
# More work tiles than SMs: persistent CTAs loop over several tiles each, of equal and unequal length.
q = rng.standard_normal((8, 1000, 8, 64), dtype=cp.float32).astype(cp.float16)
for causal in (False, True):
    poison_cupy_pool([q.nbytes])
    out = cuflash.attention(q, q, q, causal=causal)
    assert bool(cp.isfinite(out).all())
cp.cuda.Device().synchronize()
print("sanitize run done")
