"""Runs the Hopper backward at odd sizes (seqlens 1, 17, 1000; every tile configuration; causal; GQA; deterministic turns
and the dropout build too) for
compute-sanitizer: `compute-sanitizer --tool memcheck|racecheck python tests/sanitize_backward_sm90.py`.
CuPy only, so the sanitizer does not have to follow a deep-learning framework's start-up. The gradients'
memory is poisoned with NaN before each call, so an element the kernels never write fails the isfinite check."""

import cupy as cp

import cuflash

from gpu_helpers import poison_cupy_pool  # tests/ is this script's directory, first on sys.path

rng = cp.random.default_rng(0)
for d in (64, 128, 192, 256):
    for sq, sk in ((1, 1), (17, 17), (1000, 1000), (17, 1000), (1000, 17)):
        for causal in (False, True):
            q = rng.standard_normal((2, sq, 2, d), dtype=cp.float32).astype(cp.float16)
            k = rng.standard_normal((2, sk, 1, d), dtype=cp.float32).astype(q.dtype)
            v = rng.standard_normal((2, sk, 1, d), dtype=cp.float32).astype(q.dtype)
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            dout = rng.standard_normal(out.shape, dtype=cp.float32).astype(q.dtype)
            for deterministic, p in ((False, 0.0), (True, 0.0), (False, 0.3)):
                poison_cupy_pool([q.nbytes, k.nbytes, v.nbytes])
                drop = dict(dropout_p=p, dropout_seed=7) if p else {}
                grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, deterministic=deterministic,
                                                   **drop)
                assert all(bool(cp.isfinite(g).all()) for g in grads), (d, sq, sk, causal, deterministic, p)
cp.cuda.Device().synchronize()
print("sanitize run done")
