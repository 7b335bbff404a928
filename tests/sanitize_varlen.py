"""Runs the variable-length forward and backward (both dQ modes) on packed sequences with NaN in the rows no
sequence covers, lengths 0, 1, 17, 1000 and a tail at every tile boundary, for compute-sanitizer:
`compute-sanitizer --tool memcheck|racecheck python tests/sanitize_varlen.py`. CuPy only. On Hopper this is
the Hopper kernels' variable-length builds (TMA rows offset per sequence, tail rows zeroed in shared memory)."""

import cupy as cp
import numpy as np

import cuflash

rng = np.random.default_rng(0)
lens_q, lens_k = [17, 0, 1, 1000, 129, 64], [20, 5, 0, 1000, 127, 200]
cu_q = cp.asarray(np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32))
cu_k = cp.asarray(np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32))
for d in (64, 128, 192, 256):
    for causal in (False, True):
        q = rng.standard_normal((sum(lens_q) + 3, 4, d)).astype(np.float16)
        k = rng.standard_normal((sum(lens_k) + 3, 2, d)).astype(np.float16)
        v = rng.standard_normal((sum(lens_k) + 3, 2, d)).astype(np.float16)
        for x in (q, k, v):
            x[-3:] = np.nan
        q, k, v = (cp.asarray(x) for x in (q, k, v))
        args = (cu_q, cu_k, max(lens_q), max(lens_k))
        out, lse = cuflash.attention_varlen(q, k, v, *args, causal=causal, return_lse=True)
        dout = cp.asarray(rng.standard_normal(q.shape).astype(np.float16))
        for deterministic in (False, True):
            grads = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, *args, causal=causal,
                                                      deterministic=deterministic)
            assert all(bool(cp.isfinite(g).all()) for g in grads), (d, causal, deterministic)
        assert bool(cp.isfinite(out).all()), (d, causal)
cp.cuda.Device().synchronize()
print("sanitize run done")
